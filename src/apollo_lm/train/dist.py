"""Process groups for ``torchrun``: PyTorch's own engine, nothing else.

A run launched by ``torchrun --nproc_per_node N -m apollo_lm train ...`` finds RANK / WORLD_SIZE /
LOCAL_RANK in its environment. Rank r draws micro-batch ``micro * world + r`` of each step, so the N ranks of
a step see disjoint batches and together see exactly what one process with ``grad_accum * N`` would see.
Every rank draws the same depth from the same seeded stream; only rank 0 writes files. The model is replicated
with DDP (``--parallel ddp``) or sharded with FSDP2 (``--parallel fsdp``, :func:`.wrap.shard_model`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU); a plain run gets rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return DistInfo(rank, world, local)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(info: DistInfo, values: list[float], device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def same_on_all_ranks(info: DistInfo, value: int, device: torch.device) -> bool:
    """True when every rank holds ``value`` (checks that the depth streams agree)."""
    if not info.enabled:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == value and int(-t[1]) == value


def destroy(info: DistInfo) -> None:
    """End the process group once every rank is done with its collectives (called after a finished run only: a
    rank that failed takes torchrun's other ranks down with it)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
