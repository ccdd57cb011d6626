"""Analytic FLOPs (method.md): a training step costs 3x its forward pass; the forward pass costs, per token,
2 N_active + 4 D T d, with N_active the matrix parameters run this step (a shared block counts once per use)
plus the output head, D the depth actually run, T the sequence length and d the hidden size."""

from __future__ import annotations

import torch.nn as nn


def forward_flops_per_token(model: nn.Module, depth: int, seq_len: int) -> float:
    n_active = depth * model.block_matmul_params() + model.head_matmul_params()
    return 2.0 * n_active + 4.0 * depth * seq_len * model.config.n_embd


def train_step_flops(model: nn.Module, depth: int, seq_len: int, tokens: int) -> float:
    """FLOPs of one optimizer step over ``tokens`` tokens at depth ``depth``."""
    return 3.0 * forward_flops_per_token(model, depth, seq_len) * tokens


# peak dense bf16 FLOP/s by device name, for MFU (only reported when the device is known)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None
