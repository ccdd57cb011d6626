"""bert2BERT width expansion (Chen et al. 2022, "bert2BERT: Towards Reusable Pretrained Language Models").

Width goes from ``n_embd`` to ``n_embd_new`` with the head size kept (heads grow in number); every kind of
width (residual stream, MLP inner, heads, kv heads) scales by the same ratio. A map ``g`` per kind says which
old unit each new unit copies: ``g(i) = i`` for the old units, a random old unit for each new one (paper
Eq. 4; see :func:`~.adapter.random_maps` for the balanced draw on the normalised residual stream).

FPI, function-preserving initialisation (paper Sec. 3.2, after Net2Net, Chen et al. 2016)
    A writing axis copies: row ``i`` of the new weight is row ``g(i)`` of the old one. A reading axis divides:
    column ``j`` is column ``g(j)`` of the old weight divided by ``C_{g(j)}``, the number of copies of that
    unit, so the copies' contributions sum to the old one (``sum_j W[:, g(j)] x[g(j)] / C_{g(j)} = W x``).
    Norms on the residual stream copy their parameters; their statistics are unchanged because every
    residual unit has the same number of copies when the width grows by a whole factor (otherwise the
    mean/variance over the grown vector shift and FPI is only approximately preserving, as in the paper).
    Heads copy whole heads with their q, k and v, so attention scores are those of the source head. The tied
    output head sees each residual unit ``C`` times; the norm feeding it is a reading axis and divides by ``C``
    (the same reason staged training halves its final norm), so the logits are unchanged.

AKI, advanced knowledge initialisation (paper Sec. 3.3)
    The same in-dimension (reading) expansion for every layer, but the new *output* units of layer ``l`` take
    their values from layer ``l + 1``: ``U^l = [W^l_old_rows ; W^{l+1}[g(new), :]]`` after both are FPI-expanded
    along their inputs. Parameters outside the blocks (embeddings, final norms, head) follow FPI, and the top
    block, which has no next layer, falls back to FPI (our choice; the paper leaves it open). AKI breaks the
    symmetry between copies and is not function-preserving; it is tested for this formula.

Depth: stacking (StackBERT, Gong et al. 2019): the grown blocks are the old blocks repeated in order,
``g(t) = t mod n`` (:func:`stack`). Stacking is not function-preserving either.

The papers start the grown model with a fresh optimizer, so :func:`grow` returns an empty AdamW state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..expand import block_index, count_blocks, expand_state
from .adapter import (
    INNER,
    FamilyAdapter,
    GrowthResult,
    ParamSpec,
    Weights,
    WidthMap,
    adapter_for,
    gather_axis,
    map_segments,
    random_maps,
)

METHODS = ("fpi", "aki")


def fpi_tensor(t: torch.Tensor, spec: ParamSpec, sizes: Mapping[str, int],
               maps: Mapping[str, WidthMap]) -> torch.Tensor:
    """One parameter under FPI: writers repeat ``g``, readers also divide by the copy counts."""
    return map_segments(t, spec, sizes, lambda p, axis, kind, share: gather_axis(p, axis, maps[kind], share))


def new_unit_mask(spec: ParamSpec, axis: int, sizes: Mapping[str, int], new_sizes: Mapping[str, int],
                  device: torch.device) -> torch.Tensor:
    """Boolean mask along a grown ``axis``: True at the positions of new units (index >= old size, per segment)."""
    ax = spec.axes[axis]
    assert ax is not None
    return torch.cat([torch.arange(new_sizes[k], device=device) >= sizes[k] for k in ax.kinds])


def widen(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], n_embd: int, method: str = "fpi",
          generator: torch.Generator | None = None, maps: Mapping[str, WidthMap] | None = None) -> GrowthResult:
    """bert2BERT width expansion of name-keyed ``weights`` to ``n_embd`` by FPI or AKI.

    ``maps`` (kind -> :class:`WidthMap`) fixes the unit choice; by default it is drawn with ``generator``.
    The result's ``info['maps']`` holds the maps used; its optimizer state is empty (fresh AdamW)."""
    if method not in METHODS:
        raise ValueError(f"unknown bert2BERT width method {method!r}: use one of {', '.join(METHODS)}")
    adapter = adapter_for(config)
    sizes = adapter.kind_sizes(weights, config)
    new_sizes = adapter.new_sizes(sizes, config, n_embd)
    if maps is None:
        maps = random_maps(adapter, config, sizes, new_sizes, generator)
    grown: Weights = {name: fpi_tensor(t, adapter.spec(name), sizes, maps) for name, t in weights.items()}
    if method == "aki":
        grown = _advanced_knowledge(grown, adapter, sizes, new_sizes)
    new_config = adapter.grown_config(config, n_embd=n_embd, inner=new_sizes.get(INNER))
    return GrowthResult(grown, {}, new_config, {"operator": f"bert2bert-{method}", "maps": dict(maps),
                                                "loss_preserving": method == "fpi"})


def _advanced_knowledge(fpi: Weights, adapter: FamilyAdapter, sizes: Mapping[str, int],
                        new_sizes: Mapping[str, int]) -> Weights:
    """AKI from the FPI-expanded weights: new output units of block l come from block l + 1."""
    prefix = adapter.block_prefix
    n = count_blocks(fpi, prefix)
    out = dict(fpi)
    for name, t in fpi.items():
        b = block_index(name, prefix)
        if b is None or b[0] + 1 >= n:
            continue
        upper = fpi[f"{prefix}.{b[0] + 1}.{b[1]}"]
        spec = adapter.spec(name)
        value = t
        for axis, ax in enumerate(spec.axes):
            if ax is None or ax.share:
                continue
            shape = [1] * t.dim()
            shape[axis] = -1
            mask = new_unit_mask(spec, axis, sizes, new_sizes, t.device).view(shape)
            value = torch.where(mask, upper, value)
        out[name] = value
    return out


def stack(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], n_layer: int) -> GrowthResult:
    """StackBERT depth growth: block ``t`` of the result copies old block ``t mod n``."""
    adapter = adapter_for(config)
    n_old = count_blocks(weights, adapter.block_prefix)
    grown = expand_state(dict(weights), n_old, n_layer, "stack", prefix=adapter.block_prefix)
    return GrowthResult(grown, {}, adapter.grown_config(config, n_layer=n_layer),
                        {"operator": "stack", "loss_preserving": n_layer == n_old})


def grow(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], n_embd: int, n_layer: int,
         method: str = "aki", generator: torch.Generator | None = None) -> GrowthResult:
    """bert2BERT: width by FPI or AKI (the paper's full method uses AKI), then depth by stacking.

    Returns the grown weights, an empty optimizer state (the paper trains the grown model with a fresh
    optimizer) and the target config."""
    wide = widen(weights, config, n_embd, method, generator)
    deep = stack(wide.weights, wide.config, n_layer)
    deep.info = wide.info | {"operator": f"bert2bert-{method}+stack",
                             "loss_preserving": wide.info["loss_preserving"] and deep.info["loss_preserving"]}
    return deep
