"""Expansion at a stage boundary: build n' physical blocks from n, on name-keyed state dicts.

New block j starts as a copy of old block g(j), g the stage's map computed with D = n' (interpolation:
floor(j n / n'); stacking: j mod n). The same map moves the optimizer's per-parameter state: ``copy`` gives
block j the AdamW moments and step count of its source, ``reset`` starts every block parameter afresh (the
authors' release). Parameters outside the blocks (embeddings, norms, head) keep their state either way.
Nothing here imports a model: blocks are found by the ``{prefix}.{i}.`` key prefix.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from .maps import layer_map


def block_index(name: str, prefix: str = "blocks") -> tuple[int, str] | None:
    """'blocks.3.attn.c_attn.weight' -> (3, 'attn.c_attn.weight'); None for non-block names."""
    m = re.match(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else None


def count_blocks(names, prefix: str = "blocks") -> int:
    idx = [b[0] for b in (block_index(k, prefix) for k in names) if b is not None]
    return max(idx) + 1 if idx else 0


def source_blocks(kind: str, n_old: int, n_new: int) -> list[int]:
    """Which old block each new block copies: the map of type ``kind`` at depth n'."""
    return layer_map(kind, n_old, n_new)


def expand_state(state: Mapping[str, Any], n_old: int, n_new: int, kind: str, prefix: str = "blocks",
                 copy_blocks: bool = True, clone=None) -> dict[str, Any]:
    """Expand a name-keyed state (weights, or per-parameter optimizer state) from n_old to n_new blocks.

    Non-block entries pass through unchanged. Block entries of new block j come from old block g(j) when
    ``copy_blocks``; otherwise block entries are dropped (the caller starts them afresh). ``clone`` copies a
    value (default: ``.clone()`` for tensors, dict copy of cloned tensors for optimizer state).
    """
    if n_new < n_old:
        raise ValueError(f"cannot shrink from {n_old} to {n_new} blocks")
    clone = clone or _clone
    src = source_blocks(kind, n_old, n_new)
    by_block: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for name, value in state.items():
        b = block_index(name, prefix)
        if b is None:
            out[name] = value
        else:
            by_block.setdefault(b[0], {})[b[1]] = value
    if copy_blocks:
        for j in range(n_new):
            for rest, value in by_block.get(src[j], {}).items():
                out[f"{prefix}.{j}.{rest}"] = clone(value)
    return out


def repeat_scales(lmap: Sequence[int]) -> list[float]:
    """--repeat-scale uses: logical layer t scales its residual branches by 1 / (uses of block lmap[t])."""
    uses = Counter(lmap)
    return [1.0 / uses[i] for i in lmap]


def split_repeated_outputs(state: Mapping[str, Any], src: Sequence[int], residual_out: tuple[str, ...],
                           prefix: str = "blocks") -> dict[str, Any]:
    """Divide the residual-stream outputs (parameter names starting with one of ``residual_out``) of every block
    copy by its number of copies: new block j copied old block src[j]. The copies in sequence then compute what
    the old block computed run that many times with ``repeat_scales``, so with the interpolation map a grown
    model at its own depth is the small one at that depth (--repeat-scale uses)."""
    uses = Counter(src)
    out = dict(state)
    for name, value in state.items():
        b = block_index(name, prefix)
        if b is not None and b[1].startswith(residual_out) and uses[src[b[0]]] > 1:
            out[name] = value / uses[src[b[0]]]
    return out


def _clone(value: Any) -> Any:
    if hasattr(value, "clone"):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value
