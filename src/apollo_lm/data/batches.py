"""Batches drawn deterministically from (seed, step, micro-batch): resume needs no data-loader state.

Causal LM: random contiguous windows of ``T + 1`` tokens (inputs and next-token targets).
Masked LM: windows of ``T`` tokens starting with [CLS]; 15 % of the non-special positions are chosen, of
which 80 % become [MASK], 10 % a random token and 10 % stay unchanged (Devlin et al. 2019); targets are -100
everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .tokenizer import SpecialIds

IGNORE = -100
_VALID_STREAM = 0x5EED  # validation batches do not depend on the run seed: every run sees the same ones


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) int64 input ids
    y: torch.Tensor  # (B, T) int64 targets, IGNORE where not scored

    def to(self, device: torch.device | str) -> Batch:
        nb = str(device).startswith("cuda")
        return Batch(self.x.to(device, non_blocking=nb), self.y.to(device, non_blocking=nb))


class Batcher:
    """Draws training batches for step ``s`` and a fixed list of validation batches."""

    def __init__(self, tokens: np.ndarray, family: str, seq_len: int, batch_size: int, ids: SpecialIds,
                 vocab_size: int, seed: int, mask_prob: float = 0.15):
        self.tokens = tokens
        self.family = family
        self.T = seq_len
        self.B = batch_size
        self.ids = ids
        self.vocab_size = vocab_size
        self.seed = seed
        self.mask_prob = mask_prob
        self._special = np.array(ids.specials, dtype=np.int64)

    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *stream])

    def _windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        idx = starts[:, None] + np.arange(length)[None, :]
        return np.asarray(self.tokens[idx], dtype=np.int64)

    def get(self, step: int, micro: int = 0) -> Batch:
        return self._make(self._rng(1, step, micro))

    def _make(self, rng: np.random.Generator, starts: np.ndarray | None = None) -> Batch:
        if self.family == "bert":
            n = self.T - 1  # position 0 holds [CLS]
            if starts is None:
                starts = rng.integers(0, len(self.tokens) - n + 1, size=self.B)
            body = self._windows(starts, n)
            x = np.concatenate([np.full((len(starts), 1), self.ids.cls, dtype=np.int64), body], axis=1)
            x, y = self._mask(x, rng)
        else:
            if starts is None:
                starts = rng.integers(0, len(self.tokens) - self.T, size=self.B)
            w = self._windows(starts, self.T + 1)
            x, y = w[:, :-1], w[:, 1:]
        return Batch(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))

    def _mask(self, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        can = ~np.isin(x, self._special)
        chosen = (rng.random(x.shape) < self.mask_prob) & can
        y = np.where(chosen, x, IGNORE)
        r = rng.random(x.shape)
        to_mask = chosen & (r < 0.8)
        to_random = chosen & (r >= 0.8) & (r < 0.9)
        x = x.copy()
        x[to_mask] = self.ids.mask
        x[to_random] = rng.integers(0, self.vocab_size, size=int(to_random.sum()))
        return x, y

    def fixed_batches(self, n_batches: int) -> list[Batch]:
        """``n_batches`` validation batches spread evenly over the token array (same for every run)."""
        length = self.T - 1 if self.family == "bert" else self.T + 1
        n_windows = n_batches * self.B
        last = len(self.tokens) - length
        starts = np.linspace(0, max(0, last), num=n_windows).astype(np.int64)
        rng = np.random.default_rng([_VALID_STREAM])
        return [self._make(rng, starts[i * self.B:(i + 1) * self.B]) for i in range(n_batches)]
