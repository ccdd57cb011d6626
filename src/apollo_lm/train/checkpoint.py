"""Checkpoints: one directory per checkpoint, written under a temporary name and renamed, keep the last k.

Each holds ``model.safetensors`` (weights by parameter name), ``optimizer.safetensors`` (AdamW moments and
step counts by parameter name), ``rng.pt`` (torch RNG states), ``state.json`` (step, tokens, FLOPs, wall
time, stage, physical blocks, depth-sampler state), ``config.json`` (the resolved run config) and
``model.json`` (the architecture).

A run sharded with FSDP (``--parallel fsdp``, ``--checkpoint-format dcp``, the default) writes no safetensors: every
rank writes its own shards of the weights and AdamW state with ``torch.distributed.checkpoint`` (DCP) into
``dcp/`` (``model.<name>`` and ``optim.state.<name>.<moment>``, the optimizer state keyed by parameter name by
``get_optimizer_state_dict``), then rank 0 writes the other files, ``state.json`` last (its ``checkpoint_format``
says ``dcp``) and renames the directory into place, so nothing is gathered. A sharded resume loads the shards
straight into the sharded model and optimizer (:func:`load_dcp_into`); everything else (eval, export, generate,
a DDP or single-process resume) reads them with :func:`read_checkpoint`, which returns whole tensors without a
process group, the same dicts as for safetensors. ``--checkpoint-format full`` gathers the whole tensors and writes
the single-process files instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .wrap import full

CKPT_RE = re.compile(r"^step_(\d{8})$")
FORMAT_FULL, FORMAT_DCP = "full", "dcp"
CHECKPOINT_FORMATS = (FORMAT_FULL, FORMAT_DCP)
DCP_DIR = "dcp"  # the sharded tensors of a DCP checkpoint, inside its directory


def model_state(model: nn.Module, cpu: bool = False, gather: bool = True) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name; tied weights appear once (under their first name).

    A model sharded with FSDP gives its whole tensors, gathered one by one (then every rank must call this),
    so the names and shapes are those of the unsharded model; ``cpu`` moves each gathered tensor to the CPU.
    ``gather=False`` keeps each rank's shards (what DCP writes and loads in place).
    """
    take = (lambda t: full(t.detach(), cpu)) if gather else (lambda t: t.detach())
    sd = {name: take(p) for name, p in model.named_parameters()}
    for name, b in model.named_buffers():
        if name not in sd:
            sd[name] = take(b)
    return sd


def load_model_state(model: nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load weights saved by :func:`model_state`; a mismatch is a :class:`UserError` naming the difference."""
    expected = model_state(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else
                  f"shape of {wrong[0]} is {tuple(sd[wrong[0]].shape)}, the model has "
                  f"{tuple(expected[wrong[0]].shape)}")
        raise UserError(f"{what} does not fit this model ({detail}): it was written for a different model; "
                        "use the run directory it belongs to")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(sd[k].to(dtype=p.dtype, device=p.device))


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    _atomic_json(Path(path), obj)


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / "state.json").is_file()]
    return sorted(out, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _temp_dir(run_dir: str | os.PathLike, step: int) -> tuple[Path, Path]:
    root = Path(run_dir) / "checkpoints"
    return root / f".tmp-step_{step:08d}", root / f"step_{step:08d}"


def _fresh_temp_dir(tmp: Path) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()


def _write_failed(run_dir: str | os.PathLike, final: Path, e: BaseException) -> UserError:
    kept = latest_checkpoint(run_dir)
    why = e.strerror if isinstance(e, OSError) and e.strerror else e
    return UserError(f"could not write checkpoint {final} ({why}); "
                     + (f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists")
                     + ": free disk space or fix the permissions of the run directory, then resume with "
                     f"`apollo train --resume {run_dir}`")


@contextlib.contextmanager
def _writing(run_dir: str | os.PathLike, tmp: Path, final: Path) -> Iterator[None]:
    """Writing into ``tmp``: on any failure it is removed, and an OSError (disk full, permissions) becomes one
    :class:`UserError` that names the checkpoint kept."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(run_dir, final, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(run_dir: str | os.PathLike, tmp: Path, final: Path, rng: dict[str, Any], state: dict[str, Any],
            config: dict[str, Any], model_config: dict[str, Any], keep: int) -> Path:
    """The small files, ``state.json`` last (it marks the directory complete), the rename into place, pruning."""
    with _writing(run_dir, tmp, final):
        torch.save(rng, tmp / "rng.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / "model.json").write_text(json.dumps(model_config, indent=1))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # written last: marks it complete
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(run_dir: str | os.PathLike, step: int, weights: dict[str, torch.Tensor],
                    optimizer: dict[str, torch.Tensor] | None, rng: dict[str, Any], state: dict[str, Any],
                    config: dict[str, Any], model_config: dict[str, Any], keep: int) -> Path:
    """The single-process format (whole tensors in safetensors files), written by one process."""
    tmp, final = _temp_dir(run_dir, step)
    with _writing(run_dir, tmp, final):
        _fresh_temp_dir(tmp)
        save_file({k: v.contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
        if optimizer is not None:
            save_file({k: v.contiguous().cpu() for k, v in optimizer.items()}, tmp / "optimizer.safetensors")
    return _finish(run_dir, tmp, final, rng, state | {"checkpoint_format": FORMAT_FULL}, config, model_config, keep)


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What DCP writes and loads: the model's own (sharded) parameters and buffers under the names of
    :func:`model_state` (tied weights once), and the optimizer state keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return {"model": model_state(model, gather=False), "optim": get_optimizer_state_dict(model, optimizer)}


def save_dcp_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        rng: dict[str, Any], state: dict[str, Any], config: dict[str, Any],
                        model_config: dict[str, Any], keep: int, is_main: bool) -> Path | None:
    """A sharded (FSDP) checkpoint; every rank calls this. Each rank writes its own shards into ``dcp/`` of the
    temporary directory; after a barrier rank 0 writes the other files and renames the directory into place (and
    returns its path; the other ranks return None)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    tmp, final = _temp_dir(run_dir, step)
    failed: BaseException | None = None
    if is_main:
        try:
            _fresh_temp_dir(tmp)
            (tmp / DCP_DIR).mkdir()
        except OSError as e:
            failed = e
    why = [None if failed is None else str(failed.strerror or failed)]
    dist.broadcast_object_list(why, src=0)  # also the barrier: the directory exists before any rank writes
    if why[0] is None:
        try:
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp / DCP_DIR)
        except Exception as e:  # DCP raises on every rank when one rank's write fails
            failed = e
        dist.barrier()  # every rank's shards are written (and rank 0's .metadata) before the rename
    if failed is not None or why[0] is not None:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(run_dir, final, failed or OSError(why[0])) from None
    if not is_main:
        return None
    return _finish(run_dir, tmp, final, rng, state | {"checkpoint_format": FORMAT_DCP}, config, model_config, keep)


def load_dcp_into(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint's shards straight into a sharded model and its optimizer (every rank calls this;
    nothing is gathered). The model must have the checkpoint's architecture."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    sd = _dcp_state(model, optimizer)
    dcp.load(sd, checkpoint_id=Path(path) / DCP_DIR)  # in place, into each rank's shards of the parameters
    set_optimizer_state_dict(model, optimizer, sd["optim"])


def _read_dcp_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Whole tensors of a DCP checkpoint, without a process group: the weights by name and the flat optimizer
    state (``name::moment``), as the safetensors files give them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if isinstance(m, TensorStorageMetadata) and (k.startswith("model.") or k.startswith("optim.state."))}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, storage_reader=reader, no_dist=True)
    weights = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    optim = {}
    for k, v in sd.items():
        if k.startswith("optim.state."):
            name, moment = k[len("optim.state."):].rsplit(".", 1)
            optim[f"{name}::{moment}"] = v
    return weights, optim


def read_checkpoint(path: str | os.PathLike, dcp_tensors: bool = True) -> dict[str, Any]:
    """Everything in a checkpoint directory, either format (whole tensors, no process group needed); a damaged
    one is a :class:`UserError`. ``dcp_tensors=False`` leaves out a DCP checkpoint's weights and optimizer state
    (None): a sharded resume loads them with :func:`load_dcp_into`."""
    p = Path(path)
    try:
        out = {
            "state": json.loads((p / "state.json").read_text()),
            "config": json.loads((p / "config.json").read_text()),
            "model_config": json.loads((p / "model.json").read_text()),
            "weights": None,
            "optimizer": None,
            "rng": torch.load(p / "rng.pt", weights_only=False) if (p / "rng.pt").exists() else None,
        }
        out["format"] = out["state"].get("checkpoint_format", FORMAT_FULL)
        if out["format"] == FORMAT_DCP:
            if not (p / DCP_DIR / ".metadata").is_file():
                raise FileNotFoundError(2, "missing", str(p / DCP_DIR / ".metadata"))
            if dcp_tensors:
                out["weights"], out["optimizer"] = _read_dcp_tensors(p / DCP_DIR)
        else:
            out["weights"] = load_file(p / "model.safetensors")
            if (p / "optimizer.safetensors").exists():
                out["optimizer"] = load_file(p / "optimizer.safetensors")
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {p} is incomplete ({Path(e.filename).name} is missing): resume from an "
                        "earlier checkpoint by deleting this one") from None
    except Exception as e:
        raise UserError(f"checkpoint {p} is damaged ({type(e).__name__}: {e}): delete it to resume from the "
                        "previous checkpoint") from None
    return out
