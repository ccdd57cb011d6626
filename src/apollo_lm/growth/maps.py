"""Layer maps g: {0..D-1} -> {0..n-1}: which physical block runs as logical layer t (method.md, paper Eq. 11-12)."""

from __future__ import annotations


def interpolate_map(n: int, depth: int) -> list[int]:
    """Apollo's interpolation map g(t) = floor(t n / D): neighbouring layers share a block (n=3, D=12 ->
    0,0,0,0,1,1,1,1,2,2,2,2)."""
    _check(n, depth)
    return [t * n // depth for t in range(depth)]


def stack_map(n: int, depth: int) -> list[int]:
    """StackBERT's stacking map g(t) = t mod n (n=3, D=12 -> 0,1,2,0,1,2,...)."""
    _check(n, depth)
    return [t % n for t in range(depth)]


MAPS = {"interpolate": interpolate_map, "stack": stack_map}


def layer_map(kind: str, n: int, depth: int) -> list[int]:
    return MAPS[kind](n, depth)


def _check(n: int, depth: int) -> None:
    if n < 1 or depth < n:
        raise ValueError(f"a layer map needs 1 <= n <= D, got n={n}, D={depth}")
