"""The one place that wraps a model: device placement, per-block compilation and FSDP2 sharding.

Blocks are compiled one by one (``nn.Module.compile``), never the whole model, so that running a different
number of blocks (a sampled depth, or more blocks after growth) reuses the compiled block code instead of
recompiling. After growth the loop builds a fresh model and calls :func:`prepare_model` (and, under
``--parallel fsdp``, :func:`shard_model`) again.

Under FSDP2 the parameters of the sharded model are DTensors: :func:`full` gathers one into an ordinary tensor
(a collective: every rank must call it, in the same order), so that weights and optimizer state keep their
single-process names and shapes for growth and for ``--checkpoint-format full``; the default FSDP checkpoint
(DCP, ``train/checkpoint.py``) writes each rank's shards without gathering.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


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


def shard_model(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2: ``fully_shard`` each block, then the root (embeddings, final norm, head); in place.

    Blocks keep their gathered parameters from forward to backward (``reshard_after_forward=False``): with
    Apollo's layer map one block runs at several depths in one forward, and keeping it gathered costs one
    all-gather per block and step instead of two per use (both give the same gradients: tested). Gradients
    and optimizer state stay sharded. ``param_dtype`` (bf16) computes in that precision on the fp32 sharded
    master weights and reduces gradients in fp32. ``mesh``: the 1-D device mesh of all ranks.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    for block in model.blocks:  # compiled blocks (prepare_model) are sharded after compilation
        fully_shard(block, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # the root returns the loss and logits, which the loop never modifies in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters a forward without backward (evaluation) leaves behind, so that the model's
    parameters are the sharded ones the optimizer updates."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full(t: torch.Tensor, cpu: bool = False) -> torch.Tensor:
    """The whole tensor of a (sharded) DTensor, an ordinary tensor as it is; on the CPU when ``cpu``."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.cpu() if cpu else t


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (a whole tensor, the same on every rank) sharded like the DTensor ``like``, an ordinary tensor when
    ``like`` is one; no communication: each rank keeps its own slice."""
    if not _is_dtensor(like):
        return t
    from torch.distributed.tensor import DTensor, distribute_tensor
    d = distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    # the local slice is a view of the whole tensor: copy it so that the whole one can be freed
    return DTensor.from_local(d.to_local().clone(), d.device_mesh, d.placements, run_check=False, shape=d.shape,
                              stride=d.stride())
