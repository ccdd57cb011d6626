"""Depth samplers (method.md; paper Table 1, Eq. 7-10): one depth D in {n..L} per optimizer step.

All draw from a ``numpy.random.Generator`` owned by the caller, whose state is checkpointed, so a resumed
run draws the same depths as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

X_MIN = 1e-6
SAMPLERS = ("lvps", "es", "us", "fs", "none")


@dataclass(frozen=True)
class DepthSampler:
    kind: str  # lvps | es | us | fs | none
    target_depth: int  # L
    low: float = 0.6  # curve value at x = 1 (the release's 0.6)
    high: float = 0.4  # offset: curve value at x_min is L/n + high (the release's 0.4)

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.kind!r}; choose one of {', '.join(SAMPLERS)}")

    def curve(self, x: np.ndarray | float, n: int) -> np.ndarray:
        """y(x) before clamping, for r = L / n."""
        r = self.target_depth / n
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "lvps":  # inverse-proportional: y(x_min) = r + high, y(1) = low
            c = ((r + self.high) * X_MIN - self.low) / (self.low - (r + self.high))
            m = self.low * (c + 1.0)
            return m / (x + c)
        if self.kind == "es":  # logistic: mass at both ends
            return (r + self.high - self.low) / (1.0 + np.exp(20.0 * (x - 0.5))) + self.low
        raise ValueError(f"sampler {self.kind} has no curve")

    def sample(self, n: int, rng: np.random.Generator) -> int:
        L = self.target_depth
        if not 1 <= n <= L:
            raise ValueError(f"physical blocks n={n} must lie in 1..{L}")
        if self.kind == "none" or n == L:
            return n
        if self.kind == "fs":
            return L
        if self.kind == "us":
            return int(rng.integers(n, L + 1))
        x = rng.uniform(X_MIN, 1.0)
        y = float(np.clip(self.curve(x, n), 1.0, L / n))
        return int(math.floor(y * n + 1e-9))

    def distribution(self, n: int, draws: int = 200_000, seed: int = 0) -> dict[int, float]:
        """Observed frequency of each depth n..L over ``draws`` draws."""
        rng = np.random.default_rng(seed)
        counts = np.zeros(self.target_depth + 1, dtype=np.int64)
        for _ in range(draws):
            counts[self.sample(n, rng)] += 1
        return {d: counts[d] / draws for d in range(n, self.target_depth + 1)}

    def mean_depth(self, n: int, draws: int = 20_000, seed: int = 0) -> float:
        return sum(d * p for d, p in self.distribution(n, draws, seed).items())


def rng_state(rng: np.random.Generator) -> dict:
    """JSON-able state of a generator (for checkpoints)."""
    return rng.bit_generator.state


def rng_from_state(state: dict) -> np.random.Generator:
    bg = getattr(np.random, state["bit_generator"])()
    bg.state = state
    return np.random.Generator(bg)
