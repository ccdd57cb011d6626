"""The one place that wraps a model: device placement and per-block compilation.

Blocks are compiled one by one (``nn.Module.compile``), never the whole model, so that running a different
number of blocks (a sampled depth, or more blocks after growth) reuses the compiled block code instead of
recompiling. After growth the loop builds a fresh model and calls :func:`prepare_model` again.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..errors import UserError
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return dev


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default, plain fp32 on CPU."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def prepare_model(model: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    model.to(device)
    if compile:
        for block in model.blocks:
            block.compile(dynamic=False)
    return model
