"""AdamW with name-keyed state, and learning-rate schedules as functions of the position in the budget."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .wrap import full, shard_like


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only (not biases or norms), fused where supported."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **kwargs)


def named_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module,
                          cpu: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name: {'exp_avg', 'exp_avg_sq', 'step'}} for every parameter that has state; whole tensors
    under FSDP (gathered: every rank must call this), on the CPU when ``cpu``."""
    out = {}
    for name, p in model.named_parameters():
        st = opt.state.get(p)
        if st:
            out[name] = {k: full(v, cpu) for k, v in st.items() if torch.is_tensor(v)}
    return out


def load_named_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module,
                               state: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, p in model.named_parameters():
        st = state.get(name)
        if st is None:
            continue
        new = {}
        for k, v in st.items():
            if k == "step":  # AdamW keeps step counts on the CPU unless fused or capturable
                new[k] = v.detach().to(dtype=torch.float32, device=p.device if _fused(opt) else "cpu").clone()
            else:  # sharded like the parameter under FSDP
                new[k] = shard_like(v.detach().to(device=p.device, dtype=p.dtype).clone(), p)
        opt.state[p] = new


def _fused(opt: torch.optim.Optimizer) -> bool:
    return bool(opt.defaults.get("fused"))


def flatten_optimizer_state(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """For safetensors: {'name.exp_avg': tensor, ...}; step counts become 0-d float tensors."""
    return {f"{name}::{k}": v.detach().reshape(v.shape).contiguous() for name, st in state.items()
            for k, v in st.items()}


def unflatten_optimizer_state(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        name, k = key.rsplit("::", 1)
        out.setdefault(name, {})[k] = v
    return out


def lr_at(progress: float, peak: float, warmup: float, min_ratio: float, schedule: str = "cosine",
          decay: float = 0.2) -> float:
    """Learning rate for a step that ends at ``progress`` in (0, 1] of the budget.

    Linear warmup over the first ``warmup`` fraction, then cosine to ``min_ratio * peak`` at the end, or
    warmup-stable-decay: constant until the last ``decay`` fraction, then linear to ``min_ratio * peak``.
    """
    p = min(max(progress, 0.0), 1.0)
    lo = peak * min_ratio
    if warmup > 0 and p < warmup:
        return peak * p / warmup
    if schedule == "wsd":
        start = 1.0 - decay
        if p <= start or decay <= 0:
            return peak
        return peak - (peak - lo) * (p - start) / decay
    q = (p - warmup) / max(1e-12, 1.0 - warmup)
    return lo + (peak - lo) * 0.5 * (1.0 + math.cos(math.pi * q))
