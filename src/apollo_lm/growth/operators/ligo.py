"""LiGO: a learned linear growth operator (Wang et al. 2023, "Learning to Grow Pretrained Models for Efficient
Transformer Training").

The large model's parameters are a linear function of the small model's, factored as width then depth
(paper Sec. 3.2, ``M = L_depth R_width``):

* width: for every kind of width (residual stream, MLP inner, heads, kv heads) a learned *out* expansion
  ``A_kind`` (new x old) for axes that write units and an *in* expansion ``B_kind`` for axes that read them;
  a weight becomes ``W' = A_out W B_in^T`` (per q/k/v segment of a fused projection), a vector ``v' = A v``.
  The factors are shared by all layers (the paper ties width expansions across layers so that every layer
  sees the residual stream in the same basis);
* depth: for every block parameter role (e.g. ``attn.c_attn.weight``) learned coefficients ``w`` (new blocks x
  old blocks) with ``W'_l = sum_j w[l, j] W~_j`` over the width-expanded old blocks.

Initialisation (the brief's "copy/stack plus small noise"): ``A`` is the one-hot copy map ``i -> i mod n``,
``B`` the same divided by the copy counts (Net2Net, so the width part alone preserves the function; the
norm feeding a tied head is a reading axis and gets ``B``), ``w`` the stacking map ``l -> l mod n``; each factor
plus N(0, ``noise_std``) noise, which breaks the symmetry between copies. With ``noise_std = 0`` the operator
equals :func:`copy_stack`, i.e. bert2BERT FPI with the cyclic map followed by StackBERT stacking.

The factors are trained for ``steps`` steps (paper: 100) of Adam on a loss closure the caller provides:
``loss_fn(weights)`` evaluates the *large* model with the given name-keyed weights on a training batch (the
training loop does this with ``torch.func.functional_call``; growth never sees a model). Only the operator
is trained; the small weights are fixed. The grown model then starts with a fresh optimizer, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..expand import block_index, count_blocks
from .adapter import (
    HIDDEN,
    INNER,
    FamilyAdapter,
    GrowthResult,
    Weights,
    adapter_for,
    cyclic_maps,
    map_segments,
    matmul_axis,
)
from .bert2bert import stack, widen

LossFn = Callable[[Weights], torch.Tensor]


def _key(role: str) -> str:
    return role.replace(".", "__")  # ParameterDict keys may not contain dots


class LiGO(nn.Module):
    """The growth operator: ``operator()`` returns the grown, differentiable name-keyed weights."""

    def __init__(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], n_embd: int, n_layer: int,
                 noise_std: float = 1e-3, generator: torch.Generator | None = None):
        super().__init__()
        self.adapter: FamilyAdapter = adapter_for(config)
        self.config = dict(config)
        self.small = {name: t.detach() for name, t in weights.items()}
        self.sizes = self.adapter.kind_sizes(self.small, config)
        self.new_sizes = self.adapter.new_sizes(self.sizes, config, n_embd)
        self.n_old = count_blocks(self.small, self.adapter.block_prefix)
        self.n_layer = n_layer
        if n_layer < self.n_old:
            raise ValueError(f"LiGO grows: {self.n_old} blocks cannot become {n_layer}")
        dtype = next(iter(self.small.values())).dtype
        device = next(iter(self.small.values())).device

        def noisy(m: torch.Tensor) -> nn.Parameter:
            noise = torch.randn(m.shape, generator=generator, dtype=m.dtype) * noise_std if noise_std else 0.0
            return nn.Parameter((m + noise).to(device))

        maps = cyclic_maps(self.adapter, config, self.sizes, self.new_sizes)
        self.out_factors = nn.ParameterDict({k: noisy(m.copy_matrix(dtype)) for k, m in maps.items()})
        self.in_factors = nn.ParameterDict({k: noisy(m.share_matrix(dtype)) for k, m in maps.items()})
        roles = sorted({b[1] for b in (block_index(n, self.adapter.block_prefix) for n in self.small) if b})
        stacking = torch.zeros(n_layer, self.n_old, dtype=dtype)
        stacking[torch.arange(n_layer), torch.arange(n_layer) % self.n_old] = 1.0
        self.depth = nn.ParameterDict({_key(r): noisy(stacking) for r in roles})

    def widen(self, name: str, t: torch.Tensor) -> torch.Tensor:
        def expand(p: torch.Tensor, axis: int, kind: str, share: bool) -> torch.Tensor:
            return matmul_axis(p, axis, (self.in_factors if share else self.out_factors)[kind])

        return map_segments(t, self.adapter.spec(name), self.sizes, expand)

    def forward(self) -> Weights:
        prefix = self.adapter.block_prefix
        out: Weights = {}
        by_role: dict[str, list[torch.Tensor | None]] = {}
        for name, t in self.small.items():
            b = block_index(name, prefix)
            if b is None:
                out[name] = self.widen(name, t)
            else:
                by_role.setdefault(b[1], [None] * self.n_old)[b[0]] = self.widen(name, t)
        for role, blocks in by_role.items():
            stacked = torch.stack(blocks)  # type: ignore[arg-type]  # (n_old, *shape)
            grown = torch.tensordot(self.depth[_key(role)], stacked, dims=([1], [0]))  # (n_layer, *shape)
            for layer in range(self.n_layer):
                out[f"{prefix}.{layer}.{role}"] = grown[layer]
        return out

    def grown_config(self) -> dict[str, Any]:
        return self.adapter.grown_config(self.config, n_embd=self.new_sizes[HIDDEN], n_layer=self.n_layer,
                                         inner=self.new_sizes.get(INNER))


def train_operator(operator: LiGO, loss_fn: LossFn, steps: int = 100, lr: float = 1e-3) -> list[float]:
    """Fit the operator's factors with Adam on ``loss_fn(operator())``; returns the loss before each step."""
    opt = torch.optim.Adam(operator.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(operator())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def grow(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], n_embd: int, n_layer: int,
         loss_fn: LossFn, steps: int = 100, lr: float = 1e-3, noise_std: float = 1e-3,
         generator: torch.Generator | None = None) -> GrowthResult:
    """LiGO end to end: build the operator, train it ``steps`` steps on ``loss_fn``, apply it.

    Returns the large weights, an empty optimizer state (fresh AdamW for the grown model) and the target
    config; ``info['losses']`` records the closure's value at each operator step and ``info['final_loss']``
    its value for the returned weights."""
    operator = LiGO(weights, config, n_embd, n_layer, noise_std, generator)
    losses = train_operator(operator, loss_fn, steps, lr)
    with torch.no_grad():
        grown = {name: t.detach().clone() for name, t in operator().items()}
        final = float(loss_fn(grown))
    return GrowthResult(grown, {}, operator.grown_config(),
                        {"operator": "ligo", "losses": losses, "final_loss": final, "loss_preserving": False})


def copy_stack(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], n_embd: int,
               n_layer: int) -> GrowthResult:
    """The growth LiGO starts from: FPI width with the cyclic map ``i -> i mod n``, then stacking depth."""
    adapter = adapter_for(config)
    sizes = adapter.kind_sizes(weights, config)
    maps = cyclic_maps(adapter, config, sizes, adapter.new_sizes(sizes, config, n_embd))
    wide = widen(weights, config, n_embd, "fpi", maps=maps)
    return stack(wide.weights, wide.config, n_layer)
