"""Checkpoints: one directory per checkpoint, written under a temporary name and renamed, keep the last k.

Each holds ``model.safetensors`` (weights by parameter name), ``optimizer.safetensors`` (AdamW moments and
step counts by parameter name), ``rng.pt`` (torch RNG states), ``state.json`` (step, tokens, FLOPs, wall
time, stage, physical blocks, depth-sampler state), ``config.json`` (the resolved run config) and
``model.json`` (the architecture). A run sharded with FSDP gathers the whole tensors first, so its checkpoints are
the same files a single process writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .wrap import full

CKPT_RE = re.compile(r"^step_(\d{8})$")


def model_state(model: nn.Module, cpu: bool = False) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name; tied weights appear once (under their first name).

    A model sharded with FSDP gives its whole tensors, gathered one by one (then every rank must call this),
    so the names and shapes are those of the unsharded model; ``cpu`` moves each gathered tensor to the CPU.
    """
    sd = {name: full(p.detach(), cpu) for name, p in model.named_parameters()}
    for name, b in model.named_buffers():
        if name not in sd:
            sd[name] = full(b.detach(), cpu)
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


def save_checkpoint(run_dir: str | os.PathLike, step: int, weights: dict[str, torch.Tensor],
                    optimizer: dict[str, torch.Tensor] | None, rng: dict[str, Any], state: dict[str, Any],
                    config: dict[str, Any], model_config: dict[str, Any], keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
        if optimizer is not None:
            save_file({k: v.contiguous().cpu() for k, v in optimizer.items()}, tmp / "optimizer.safetensors")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / "model.json").write_text(json.dumps(model_config, indent=1))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # written last: marks it complete
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(run_dir)
        raise UserError(f"could not write checkpoint {final} ({e.strerror or e}); "
                        + (f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists")
                        + ": free disk space or fix the permissions of the run directory, then resume with "
                        f"`apollo train --resume {run_dir}`") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Everything in a checkpoint directory; a damaged one is a :class:`UserError`."""
    p = Path(path)
    try:
        out = {
            "state": json.loads((p / "state.json").read_text()),
            "config": json.loads((p / "config.json").read_text()),
            "model_config": json.loads((p / "model.json").read_text()),
            "weights": load_file(p / "model.safetensors"),
            "optimizer": load_file(p / "optimizer.safetensors") if (p / "optimizer.safetensors").exists()
            else None,
            "rng": torch.load(p / "rng.pt", weights_only=False) if (p / "rng.pt").exists() else None,
        }
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {p} is incomplete ({Path(e.filename).name} is missing): resume from an "
                        "earlier checkpoint by deleting this one") from None
    except Exception as e:
        raise UserError(f"checkpoint {p} is damaged ({type(e).__name__}: {e}): delete it to resume from the "
                        "previous checkpoint") from None
    return out
