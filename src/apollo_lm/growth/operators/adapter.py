"""What growth needs to know about a model family's parameters, and the width maps built from it.

Growth operators never import a model file (style.md, rule 1). Each family instead contributes a
:class:`FamilyAdapter`: a list of parameter-name patterns, each with a :class:`ParamSpec` saying, for every
tensor axis, whether it is one of the widths that growth changes and how:

* ``hidden``: the residual stream (``n_embd``), normalised by LayerNorm / RMSNorm;
* ``inner``: the MLP inner dimension;
* ``heads``: the query-head-structured axis (``n_head`` heads of ``head_size`` elements);
* ``kv``: the key/value-head-structured axis (``n_kv_head`` heads; equal to ``heads`` without grouped-query
  attention). A fused ``qkv`` output axis is three segments ``(heads, kv, kv)``.

An axis either *writes* its units (``share=False``: a grown copy of a unit repeats the original value) or
*reads* them (``share=True``: the copies of one input unit share the original weight, divided by the copy
count, as in Net2Net / bert2BERT FPI). The norm that feeds a tied output head is a reader on the hidden axis:
dividing it by the copy count is what keeps ``logits = norm(h) @ E^T`` unchanged when the embedding ``E`` is
copied (Shen et al. 2022 halve the final LayerNorm for the same reason). The spec also marks the projections
that write into the residual stream (``residual_out``; zeroed by staged depth growth) and the role of each
parameter (linear, bias, norm, embedding, head, head_norm, head_bias).

A new family needs only an adapter here: operators read nothing but these descriptions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

HIDDEN, INNER, HEADS, KV = "hidden", "inner", "heads", "kv"
KINDS = (HIDDEN, INNER, HEADS, KV)
# Axes normalised as a whole (LayerNorm / RMSNorm statistics): a width map on them preserves the function only
# if every old unit gets the same number of copies (then mean, variance and RMS are unchanged).
NORMALISED_KINDS = frozenset({HIDDEN})

Weights = dict[str, torch.Tensor]
OptimizerState = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Axis:
    """One grown tensor axis: its segments' kinds (one for a plain axis, three for a fused q/k/v axis)."""

    kinds: tuple[str, ...]
    share: bool = False  # True: the axis reads its units (copies divide the original weight)


@dataclass(frozen=True)
class ParamSpec:
    """How one parameter's axes grow. ``axes[i]`` is None for an axis growth leaves alone (e.g. vocabulary)."""

    axes: tuple[Axis | None, ...]
    role: str  # linear | bias | norm | embedding | head | head_norm | head_bias
    residual_out: bool = False  # writes into the residual stream (attention / MLP output projections)

    def grown_axes(self) -> list[int]:
        return [i for i, a in enumerate(self.axes) if a is not None]


def _ax(*kinds: str, share: bool = False) -> Axis:
    return Axis(tuple(kinds), share)


# the common building blocks of the three families' descriptions
def linear(out: Axis, inp: Axis, residual_out: bool = False) -> ParamSpec:
    """nn.Linear weight, stored (out_features, in_features)."""
    return ParamSpec((out, inp), "linear", residual_out)


def bias(out: Axis, residual_out: bool = False) -> ParamSpec:
    return ParamSpec((out,), "bias", residual_out)


NORM = ParamSpec((_ax(HIDDEN),), "norm")
HEAD_NORM = ParamSpec((_ax(HIDDEN, share=True),), "head_norm")
EMBEDDING = ParamSpec((None, _ax(HIDDEN)), "embedding")
# An untied head copies its columns like the embedding it would be tied to; the head norm does the dividing.
HEAD = ParamSpec((None, _ax(HIDDEN)), "head")
HEAD_BIAS = ParamSpec((None,), "head_bias")
QKV = _ax(HEADS, KV, KV)


@dataclass(frozen=True)
class FamilyAdapter:
    """A model family as growth sees it: parameter-name patterns and a few architectural facts.

    ``top`` patterns match whole names outside the blocks; ``block`` patterns match the rest of a name after
    ``{block_prefix}.{i}.`` (the layout :func:`apollo_lm.growth.expand.block_index` reads).
    """

    family: str
    top: tuple[tuple[str, ParamSpec], ...]
    block: tuple[tuple[str, ParamSpec], ...]
    pre_norm: bool  # x + f(norm(x)): a block with zero output projections is exactly the identity
    grouped_kv: bool = False  # n_kv_head in the config is honoured (otherwise kv heads = n_head)
    pin_inner_size: str | None = None  # config key that must hold the grown MLP inner size explicitly
    tie_config_key: str | None = None  # config key saying whether the head is tied (None: always tied)
    block_prefix: str = "blocks"
    _compiled: dict[str, list[tuple[re.Pattern[str], ParamSpec]]] = field(default_factory=dict, compare=False,
                                                                          repr=False)

    def spec(self, name: str) -> ParamSpec:
        """The description of parameter ``name``; a clear error for a name the adapter does not know."""
        if not self._compiled:
            self._compiled["top"] = [(re.compile(p), s) for p, s in self.top]
            self._compiled["block"] = [(re.compile(p), s) for p, s in self.block]
        m = re.match(rf"^{re.escape(self.block_prefix)}\.\d+\.(.+)$", name)
        table, rest = (self._compiled["block"], m.group(1)) if m else (self._compiled["top"], name)
        for pattern, spec in table:
            if pattern.fullmatch(rest):
                return spec
        raise KeyError(f"parameter {name!r} of model family {self.family!r} has no description in its growth "
                       f"adapter: add a pattern for it to apollo_lm/growth/operators/adapter.py")

    def ties_head(self, config: Mapping[str, Any]) -> bool:
        return True if self.tie_config_key is None else bool(config.get(self.tie_config_key, True))

    def head_size(self, config: Mapping[str, Any]) -> int:
        return int(config["n_embd"]) // int(config["n_head"])

    def kv_heads(self, config: Mapping[str, Any]) -> int:
        n_kv = config.get("n_kv_head") if self.grouped_kv else None
        return int(n_kv or config["n_head"])

    def units(self, config: Mapping[str, Any]) -> dict[str, int]:
        """Elements per unit of each kind: a head moves as a whole (its ``head_size`` elements)."""
        hs = self.head_size(config)
        return {HIDDEN: 1, INNER: 1, HEADS: hs, KV: hs}

    def kind_sizes(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, int]:
        """Sizes of the four kinds: hidden, heads and kv from the config, inner read off the weights; every
        described axis is checked against them so that a wrong adapter fails loudly, not silently."""
        hs = self.head_size(config)
        sizes = {HIDDEN: int(config["n_embd"]), HEADS: int(config["n_head"]) * hs, KV: self.kv_heads(config) * hs}
        for name, t in weights.items():
            for i, ax in enumerate(self.spec(name).axes):
                if ax is not None and ax.kinds == (INNER,):
                    sizes.setdefault(INNER, int(t.shape[i]))
        for name, t in weights.items():
            for i, ax in enumerate(self.spec(name).axes):
                if ax is None:
                    continue
                want = sum(sizes.get(k, -1) for k in ax.kinds)
                if t.shape[i] != want:
                    raise ValueError(f"{name}: axis {i} has size {t.shape[i]}, the {self.family} adapter expects "
                                     f"{'+'.join(ax.kinds)} = {want}; the config does not match these weights")
        return sizes

    def new_sizes(self, sizes: Mapping[str, int], config: Mapping[str, Any], n_embd_new: int) -> dict[str, int]:
        """Kind sizes after widening to ``n_embd_new`` with the head size kept (so heads grow in number).

        Every kind scales by ``n_embd_new / n_embd``; each must stay a whole number of its units."""
        ratio = Fraction(n_embd_new, int(config["n_embd"]))
        units = self.units(config)
        out = {}
        for kind, size in sizes.items():
            new = ratio * size
            if new.denominator != 1 or int(new) % units[kind] or new < size:
                raise ValueError(f"cannot widen {kind} from {size} to {new} ({int(config['n_embd'])} -> "
                                 f"{n_embd_new}): choose n_embd so that every width grows by a whole number of "
                                 f"{'heads of ' + str(units[kind]) if units[kind] > 1 else 'units'}")
            out[kind] = int(new)
        return out

    def grown_config(self, config: Mapping[str, Any], n_embd: int | None = None, n_layer: int | None = None,
                     inner: int | None = None) -> dict[str, Any]:
        """The ModelConfig dict of the grown model: head size kept, so heads (and kv heads) scale with width."""
        new = dict(config)
        if n_embd is not None and n_embd != config["n_embd"]:
            ratio = Fraction(n_embd, int(config["n_embd"]))
            new["n_embd"] = n_embd
            new["n_head"] = int(ratio * int(config["n_head"]))
            if self.grouped_kv and config.get("n_kv_head"):
                new["n_kv_head"] = int(ratio * int(config["n_kv_head"]))
        if inner is not None and self.pin_inner_size:
            new[self.pin_inner_size] = inner
        if n_layer is not None:
            new["n_layer"] = n_layer
        return new


# ---------------------------------------------------------------------------------------------- families
GPT_ADAPTER = FamilyAdapter(
    family="gpt",
    top=(
        (r"wte\.weight", EMBEDDING),
        (r"wpe\.weight", EMBEDDING),
        (r"ln_f\.(weight|bias)", HEAD_NORM),
        (r"lm_head\.weight", HEAD),
    ),
    block=(
        (r"ln_[12]\.(weight|bias)", NORM),
        (r"attn\.c_attn\.weight", linear(QKV, _ax(HIDDEN, share=True))),
        (r"attn\.c_attn\.bias", bias(QKV)),
        (r"attn\.c_proj\.weight", linear(_ax(HIDDEN), _ax(HEADS, share=True), residual_out=True)),
        (r"attn\.c_proj\.bias", bias(_ax(HIDDEN), residual_out=True)),
        (r"mlp\.c_fc\.weight", linear(_ax(INNER), _ax(HIDDEN, share=True))),
        (r"mlp\.c_fc\.bias", bias(_ax(INNER))),
        (r"mlp\.c_proj\.weight", linear(_ax(HIDDEN), _ax(INNER, share=True), residual_out=True)),
        (r"mlp\.c_proj\.bias", bias(_ax(HIDDEN), residual_out=True)),
    ),
    pre_norm=True,
)

BERT_ADAPTER = FamilyAdapter(
    family="bert",
    top=(
        (r"(word|position|token_type)_embeddings\.weight", EMBEDDING),
        (r"emb_ln\.(weight|bias)", NORM),
        (r"head_dense\.weight", linear(_ax(HIDDEN), _ax(HIDDEN, share=True))),
        (r"head_dense\.bias", bias(_ax(HIDDEN))),
        (r"head_ln\.(weight|bias)", HEAD_NORM),  # the norm right before the tied decoder
        (r"head_bias", HEAD_BIAS),
    ),
    block=(
        (r"ln_[12]\.(weight|bias)", NORM),
        (r"attn\.qkv\.weight", linear(QKV, _ax(HIDDEN, share=True))),
        (r"attn\.qkv\.bias", bias(QKV)),
        (r"attn\.proj\.weight", linear(_ax(HIDDEN), _ax(HEADS, share=True), residual_out=True)),
        (r"attn\.proj\.bias", bias(_ax(HIDDEN), residual_out=True)),
        (r"mlp\.fc\.weight", linear(_ax(INNER), _ax(HIDDEN, share=True))),
        (r"mlp\.fc\.bias", bias(_ax(INNER))),
        (r"mlp\.proj\.weight", linear(_ax(HIDDEN), _ax(INNER, share=True), residual_out=True)),
        (r"mlp\.proj\.bias", bias(_ax(HIDDEN), residual_out=True)),
    ),
    pre_norm=False,  # post-LN: x = LN(x + f(x)), so a zero f is not the identity
)

LLAMA_ADAPTER = FamilyAdapter(
    family="llama",
    top=(
        (r"wte\.weight", EMBEDDING),
        (r"norm\.weight", HEAD_NORM),
        (r"lm_head\.weight", HEAD),  # present only when untied
    ),
    block=(
        (r"(attn|mlp)_norm\.weight", NORM),
        (r"attn\.q_proj\.weight", linear(_ax(HEADS), _ax(HIDDEN, share=True))),
        (r"attn\.[kv]_proj\.weight", linear(_ax(KV), _ax(HIDDEN, share=True))),
        (r"attn\.o_proj\.weight", linear(_ax(HIDDEN), _ax(HEADS, share=True), residual_out=True)),
        (r"mlp\.(gate|up)_proj\.weight", linear(_ax(INNER), _ax(HIDDEN, share=True))),
        (r"mlp\.down_proj\.weight", linear(_ax(HIDDEN), _ax(INNER, share=True), residual_out=True)),
    ),
    pre_norm=True,
    grouped_kv=True,
    pin_inner_size="intermediate_size",  # its default (2/3 of 4d, rounded to 32) does not double exactly
    tie_config_key="tie_embeddings",
)

ADAPTERS: dict[str, FamilyAdapter] = {a.family: a for a in (GPT_ADAPTER, BERT_ADAPTER, LLAMA_ADAPTER)}


def register_adapter(adapter: FamilyAdapter) -> None:
    """Make a new family growable: operators look adapters up by ``config['family']``."""
    ADAPTERS[adapter.family] = adapter


def adapter_for(config_or_family: Mapping[str, Any] | str) -> FamilyAdapter:
    family = config_or_family if isinstance(config_or_family, str) else str(config_or_family["family"])
    if family not in ADAPTERS:
        raise KeyError(f"no growth adapter for model family {family!r} (known: {', '.join(sorted(ADAPTERS))}); "
                       "describe its parameters with a FamilyAdapter and register_adapter()")
    return ADAPTERS[family]


# ---------------------------------------------------------------------------------------------- results
@dataclass
class GrowthResult:
    """A grown training state: name-keyed weights, name-keyed AdamW state, and the new ModelConfig dict.

    An empty ``optimizer_state`` means the grown model starts with a fresh optimizer (AdamW then creates
    zero moments and step 0 on the first step)."""

    weights: Weights
    optimizer_state: OptimizerState
    config: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- width maps
@dataclass(frozen=True)
class WidthMap:
    """For one kind: new element ``i`` copies old element ``source[i]``; ``counts[j]`` copies of old ``j``."""

    source: torch.Tensor  # (new_size,) int64
    old_size: int

    @property
    def new_size(self) -> int:
        return int(self.source.numel())

    @property
    def counts(self) -> torch.Tensor:
        return torch.bincount(self.source, minlength=self.old_size)

    def copy_matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(new, old) one-hot: ``M @ x`` repeats ``x`` along the new axis (a writer's expansion)."""
        m = torch.zeros(self.new_size, self.old_size, dtype=dtype)
        m[torch.arange(self.new_size), self.source] = 1.0
        return m

    def share_matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(new, old) one-hot divided by copy counts: ``x' @ M`` sums back to ``x`` (a reader's expansion)."""
        return self.copy_matrix(dtype) / self.counts.to(dtype)[self.source][:, None]


def _elements(unit_source: torch.Tensor, unit: int, old_units: int) -> WidthMap:
    """Element map of a unit map: element u*unit + c of the new axis copies g(u)*unit + c."""
    src = (unit_source[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)
    return WidthMap(src, old_units * unit)


def cyclic_maps(adapter: FamilyAdapter, config: Mapping[str, Any], sizes: Mapping[str, int],
                new_sizes: Mapping[str, int]) -> dict[str, WidthMap]:
    """New unit ``u`` copies old unit ``u mod n``: every unit copied equally, heads keep their kv group.

    For a factor of two this is exactly the duplication ``[h, h]`` of Shen et al. (2022)."""
    units = adapter.units(config)
    out = {}
    for kind, size in sizes.items():
        old_u, new_u = size // units[kind], new_sizes[kind] // units[kind]
        out[kind] = _elements(torch.arange(new_u) % old_u, units[kind], old_u)
    return out


def random_maps(adapter: FamilyAdapter, config: Mapping[str, Any], sizes: Mapping[str, int],
                new_sizes: Mapping[str, int], generator: torch.Generator | None = None) -> dict[str, WidthMap]:
    """bert2BERT's map (Chen et al. 2022, Eq. 4): g(i) = i for the old units, a random old unit for each new one.

    On normalised kinds (the residual stream) the new units are drawn as successive random permutations so that
    every old unit gets the same number of copies whenever the width grows by a whole factor; LayerNorm and
    RMSNorm statistics are then unchanged and FPI stays exactly function-preserving. Other kinds draw with
    replacement, as the paper does. Query heads follow their key/value heads (a query head's copy keeps its
    group), so grouped-query attention stays consistent.
    """
    units = adapter.units(config)
    out = {}
    old_units = {k: s // units[k] for k, s in sizes.items()}
    new_units = {k: s // units[k] for k, s in new_sizes.items()}
    unit_maps: dict[str, torch.Tensor] = {}
    for kind in (HIDDEN, INNER, KV):
        if kind not in sizes:
            continue
        n_old, n_new = old_units[kind], new_units[kind]
        if kind in NORMALISED_KINDS:
            extra = [torch.randperm(n_old, generator=generator) for _ in range(-(-(n_new - n_old) // n_old))]
            tail = torch.cat(extra)[: n_new - n_old] if extra else torch.zeros(0, dtype=torch.long)
        else:
            tail = torch.randint(0, n_old, (n_new - n_old,), generator=generator)
        unit_maps[kind] = torch.cat([torch.arange(n_old), tail])
    if HEADS in sizes:
        group = old_units[HEADS] // old_units[KV]
        j = torch.arange(new_units[HEADS])
        unit_maps[HEADS] = unit_maps[KV][j // group] * group + j % group
    for kind, m in unit_maps.items():
        out[kind] = _elements(m, units[kind], old_units[kind])
    return out


# ---------------------------------------------------------------------------------------------- tensor helpers
def map_segments(t: torch.Tensor, spec: ParamSpec, sizes: Mapping[str, int],
                 fn: Callable[[torch.Tensor, int, str, bool], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn(segment, axis, kind, share)`` to each segment of each grown axis, one axis after another."""
    for axis, ax in enumerate(spec.axes):
        if ax is None:
            continue
        parts = t.split([sizes[k] for k in ax.kinds], dim=axis) if len(ax.kinds) > 1 else (t,)
        t = torch.cat([fn(p, axis, k, ax.share) for p, k in zip(parts, ax.kinds)], dim=axis)
    return t


def gather_axis(t: torch.Tensor, axis: int, wmap: WidthMap, share: bool) -> torch.Tensor:
    """Expand one axis by index: a writer repeats, a reader also divides by the copy count (Net2Net)."""
    out = t.index_select(axis, wmap.source.to(t.device))
    if share:
        shape = [1] * t.dim()
        shape[axis] = -1
        out = out / wmap.counts.to(device=t.device, dtype=t.dtype)[wmap.source.to(t.device)].view(shape)
    return out


def matmul_axis(t: torch.Tensor, axis: int, m: torch.Tensor) -> torch.Tensor:
    """Apply a (new, old) matrix along ``axis``: out[..., i, ...] = sum_j m[i, j] t[..., j, ...]."""
    return torch.movedim(torch.tensordot(m, t, dims=([1], [axis])), 0, axis)
