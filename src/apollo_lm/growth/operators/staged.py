"""Staged training's growth operators (Shen et al. 2022, "Staged Training for Transformer Language Models").

Both take the whole training state (name-keyed weights, name-keyed AdamW state ``{'exp_avg', 'exp_avg_sq',
'step'}``, the ModelConfig dict) and return a new one (:class:`GrowthResult`) from which training continues
with the same learning-rate schedule.

Width (:func:`widen`, factor k, the paper's k = 2)
    Every hidden vector ``h`` becomes ``[h, ..., h]``. A matrix with two grown axes becomes block-diagonal
    ``kron(I_k, W)`` (per q/k/v segment of a fused projection, so the head count grows by k with the head size
    kept); vectors, norms and embeddings are repeated. Then ``W' [h, h] = [W h, W h]``, LayerNorm / RMSNorm
    of ``[h, h]`` equal ``[LN(h), LN(h)]`` (mean, variance and RMS of a repeated vector are unchanged; same eps),
    attention runs k copies of each head with the same scores (head size, hence 1/sqrt(hs), unchanged), and the
    model is k copies of itself side by side. The only place the copies meet is the tied output head:
    ``[n, n] @ [E, E]^T = k n @ E^T``, so the norm that feeds it is divided by k. That is method.md's "final
    LayerNorm halved" for pre-LN GPT (``ln_f``) and pre-norm Llama (RMSNorm ``norm``, tied or untied: an untied
    head is repeated like the embedding). For post-LN BERT the "final" LayerNorm is the one inside the MLM head
    (``head_ln``, just before the tied decoder), not the last block's ``ln_2``: halving ``ln_2`` would change
    the input of the head's dense layer and GELU, not just scale the logits.

    AdamW state is mapped by the same rule. By symmetry every copy of a weight gets ``1/k`` of the small model's
    gradient (the copies' gradients sum to it, Shen et al. Sec. 3), so exp_avg is divided by k and exp_avg_sq by
    k^2 (method.md: /2 and /4): then ``m / sqrt(v)`` and every later update of a copy equals the small model's.
    A parameter stored divided by k (the head norm) gets the *full* gradient, so its moments are copied
    unscaled (as in the authors' release). Step counts are kept (bias corrections continue).

    What "one AdamW step after growth equals the grown image of one step before" then means exactly (tested in
    tests/test_operators.py, without gradient clipping):
      * every repeated entry (diagonal blocks, vectors, embeddings, untied head) moves exactly as its source,
        with decoupled weight decay included (it is elementwise and linear), provided eps is negligible
        against sqrt(v) or scaled by 1/k with the gradients (AdamW's eps is the only non-homogeneous term);
      * the off-diagonal blocks start at zero with zero moments but receive gradient g/k, so they leave zero
        (Adam's first update of a fresh moment, about lr in size): the block structure is not kept;
      * the head norm, stored as c/k, moves by the small model's full update, not by 1/k of it (Adam's
        update is invariant to the gradient's scale, so no moment scaling can fix it; a 1/k learning rate on
        that one parameter would);
      * a gradient-norm clip that triggers breaks it (the grown gradient norm differs from the small one).
    The function is therefore preserved exactly at the growth point, and training continues from the same
    per-weight update sizes, which is the paper's training-dynamics argument; bitwise equality of the next
    step does not hold for the whole network and we do not claim it.

    Symmetry. Swapping the k copies (rows and columns alike) maps the grown parameters to themselves, and the
    loss is invariant under that swap, so every gradient, every AdamW update and hence every later state is
    symmetric too: in exact arithmetic, and without dropout, the copies never separate and the wide model keeps
    the small one's capacity. In floating point only rounding error separates them, from about 1e-8 of the
    weights' size, growing about tenfold every 25 to 50 steps (measured on the cpu size of bench/growth.py:
    1 % apart only some 250 steps after the growth; BENCHMARKS.md). The authors' code trains with dropout,
    which breaks the symmetry at once. ``noise`` breaks it without dropout and without changing the function:
    every matrix that reads a repeated vector (both axes grown) gets noise whose k column blocks sum to zero in
    each row (:func:`split_noise`), i.e. each input unit's weight is split unevenly among its copies, as
    lossless expansion methods do (LEMON, Wang et al. 2024). The outputs are unchanged, their input gradients
    are not, and the copies drift apart from the first step. The same noise acts as a gain on whatever differs
    between the copies, rounding error included: at ``noise`` 2 or more that gain, compounded over the layers,
    turns fp32 rounding into O(1) logit changes on some models (in float64 the function is still kept), so the
    tool's default is 1 (measured in BENCHMARKS.md, "Staged training's width operator").

Depth (:func:`deepen`, factor k, the paper's k = 2)
    After each old block, k - 1 new blocks that copy it except for their residual-output projections (attention
    and MLP output weights and biases), which are zero, with zero AdamW state and step 0. In a pre-norm block
    ``x + f(norm(x))`` a zero output projection makes the block the identity, so GPT and Llama keep their loss
    exactly. In post-LN BERT ``LN(x + f(x))`` the new block computes ``ln_2(ln_1(x))``, a re-normalisation that
    is not the identity (unless every preceding LayerNorm had unit gain and zero bias), so BERT's loss is not
    preserved; no setting of the new block's LayerNorm parameters fixes it for all inputs. The result's
    ``info['loss_preserving']`` says which case applies. The copied (non-zero) weights give the zero output
    projections non-zero gradients, so the new blocks start learning at once (an all-zero block would not).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..expand import block_index, count_blocks
from .adapter import INNER, GrowthResult, OptimizerState, ParamSpec, Weights, adapter_for


def _per_segment(t: torch.Tensor, spec: ParamSpec, sizes: Mapping[str, int],
                 fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A matrix with both axes grown, rebuilt from ``fn(block)`` of each (output segment, input segment) block
    (one block, or three per fused q/k/v axis), in row-major order."""
    out_ax, in_ax = spec.axes[0], spec.axes[1]
    assert out_ax is not None and in_ax is not None
    rows = []
    for row in t.split([sizes[kind] for kind in out_ax.kinds], dim=0):
        rows.append(torch.cat([fn(b) for b in row.split([sizes[kind] for kind in in_ax.kinds], dim=1)], dim=1))
    return torch.cat(rows, dim=0)


def _repeat_block_diag(t: torch.Tensor, spec: ParamSpec, sizes: Mapping[str, int], k: int) -> torch.Tensor:
    """The staged-training width image of one tensor, before any value scaling."""
    grown = spec.grown_axes()
    if not grown:
        return t.clone()
    if len(grown) == 1:
        axis = grown[0]
        ax = spec.axes[axis]
        assert ax is not None
        parts = t.split([sizes[kind] for kind in ax.kinds], dim=axis)
        return torch.cat([torch.cat([p] * k, dim=axis) for p in parts], dim=axis)
    if grown != [0, 1] or t.dim() != 2:
        raise ValueError(f"staged width growth handles matrices and vectors, got axes {grown} of shape "
                         f"{tuple(t.shape)}")
    eye = torch.eye(k, dtype=t.dtype, device=t.device)
    return _per_segment(t, spec, sizes, lambda b: torch.kron(eye, b))  # [[W, 0], [0, W]] per segment


def split_noise(t: torch.Tensor, spec: ParamSpec, sizes: Mapping[str, int], k: int, scale: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise for a block-diagonal matrix that leaves its function on repeated inputs unchanged.

    For each (output segment, input segment) block ``b``, Gaussian noise of standard deviation ``scale`` times
    the RMS of ``b``, centred over the k input copies: ``W' [x, ..., x] = W x`` because the k column blocks of
    each noise row sum to zero. Added to ``kron(I_k, b)`` it splits each input unit's weight unevenly among its
    copies, so the copies stop being a symmetry of the network (see :func:`widen`)."""
    def noise(b: torch.Tensor) -> torch.Tensor:
        o, i = b.shape
        z = torch.randn(k * o, k, i, generator=generator, dtype=torch.float32)
        z = ((z - z.mean(dim=1, keepdim=True)) * (scale * float(b.float().pow(2).mean().sqrt()))).to(t.dtype)
        z[:, -1] = -z[:, :-1].sum(dim=1)  # the zero sum in t's own precision (exact for k = 2)
        return z.reshape(k * o, k * i)

    return _per_segment(t.cpu(), spec, sizes, noise).to(t.device)


def value_scale(spec: ParamSpec, k: int) -> float:
    """A lone reading axis (the head norm) is divided by k; block-diagonal matrices need no division."""
    grown = spec.grown_axes()
    if len(grown) == 1 and spec.axes[grown[0]].share:  # type: ignore[union-attr]
        return 1.0 / k
    return 1.0


def moment_scale(spec: ParamSpec, k: int) -> float:
    """Gradient of one copy = g / (k * value_scale): the copies, each scaled by c, sum to the old weight."""
    if not spec.grown_axes():
        return 1.0
    return 1.0 / (k * value_scale(spec, k))


def widen(weights: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Mapping[str, torch.Tensor]],
          config: Mapping[str, Any], factor: int = 2, noise: float = 0.0,
          generator: torch.Generator | None = None) -> GrowthResult:
    """Width x``factor`` of the whole training state (see the module docstring for what is preserved).

    ``weights`` and ``optimizer_state`` are keyed by parameter name (``model_state`` and
    ``named_optimizer_state`` of the training loop); ``config`` is ``ModelConfig.to_dict()``. Returns the grown
    weights, AdamW state and config (n_embd, n_head and n_kv_head times ``factor``, head size kept).

    With ``noise = 0`` this is the paper's operator, and the grown model is k copies of the small one side by
    side: swapping the copies maps every parameter to itself, so every gradient and AdamW update is symmetric
    too, and only rounding error (or dropout) separates them.
    ``noise > 0`` adds :func:`split_noise` (that many times each block's RMS) to every matrix whose input is a
    repeated vector: the function is still preserved (exactly in exact arithmetic; the module docstring says
    what rounding does above ``noise`` 1), but the input gradients of those matrices differ between copies,
    and the copies drift apart from the first step. AdamW state is mapped as without noise."""
    if factor < 2 or int(factor) != factor:
        raise ValueError(f"width growth needs a whole factor >= 2, got {factor}")
    if noise < 0:
        raise ValueError(f"width growth noise must be >= 0, got {noise}")
    adapter = adapter_for(config)
    sizes = adapter.kind_sizes(weights, config)
    new_weights: Weights = {}
    new_state: OptimizerState = {}
    for name, t in weights.items():
        spec = adapter.spec(name)
        new_weights[name] = _repeat_block_diag(t, spec, sizes, factor) * value_scale(spec, factor)
        if noise and len(spec.grown_axes()) == 2:
            new_weights[name] += split_noise(t, spec, sizes, factor, noise, generator)
        st = optimizer_state.get(name)
        if not st:
            continue
        s = moment_scale(spec, factor)
        mapped = {}
        for key, v in st.items():
            if key == "step" or v.shape != t.shape:  # step counts (and any scalar) carry over as they are
                mapped[key] = v.clone()
            else:  # exp_avg scales like the gradient, exp_avg_sq (and max_exp_avg_sq) like its square
                mapped[key] = _repeat_block_diag(v, spec, sizes, factor) * (s * s if "sq" in key else s)
        new_state[name] = mapped
    new_config = adapter.grown_config(config, n_embd=int(config["n_embd"]) * factor,
                                      inner=sizes[INNER] * factor if INNER in sizes else None)
    return GrowthResult(new_weights, new_state, new_config,
                        {"operator": "staged-width", "factor": factor, "loss_preserving": True, "noise": noise})


def deepen(weights: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Mapping[str, torch.Tensor]],
           config: Mapping[str, Any], factor: int = 2) -> GrowthResult:
    """Depth x``factor``: after each old block i (now block i*factor), factor-1 new blocks that copy it with zero
    residual-output projections and zero AdamW state. Loss-preserving for pre-norm families only
    (``info['loss_preserving']``); see the module docstring for post-LN BERT."""
    if factor < 2 or int(factor) != factor:
        raise ValueError(f"depth growth needs a whole factor >= 2, got {factor}")
    adapter = adapter_for(config)
    prefix = adapter.block_prefix
    n_old = count_blocks(weights, prefix)
    new_weights: Weights = {}
    new_state: OptimizerState = {}
    for name, t in weights.items():
        b = block_index(name, prefix)
        st = optimizer_state.get(name)
        if b is None:
            new_weights[name] = t.clone()
            if st:
                new_state[name] = {key: v.clone() for key, v in st.items()}
            continue
        i, rest = b
        zero_out = adapter.spec(name).residual_out
        for r in range(factor):
            new_name = f"{prefix}.{i * factor + r}.{rest}"
            new_weights[new_name] = torch.zeros_like(t) if (r and zero_out) else t.clone()
            if not st:
                continue
            if r == 0:
                new_state[new_name] = {key: v.clone() for key, v in st.items()}
            else:
                new_state[new_name] = {key: torch.zeros_like(v) for key, v in st.items()}
    new_config = adapter.grown_config(config, n_layer=n_old * factor)
    return GrowthResult(new_weights, new_state, new_config,
                        {"operator": "staged-depth", "factor": factor, "loss_preserving": adapter.pre_norm})
