"""Metrics: one JSON Lines file per run, one object per logged step; plots and reports read only this file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the usable part
    return out


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Keep the records up to ``last_step`` (a resumed run rewrites what came after its checkpoint)."""
    p = Path(path)
    if not p.exists():
        return
    keep = [r for r in read_metrics(p) if r.get("step", 0) <= last_step]
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, p)


def require_logger_packages(targets: list[str]) -> None:
    """Fail before anything is written when a requested logger's package is missing."""
    from ..errors import UserError

    for target, module, package in (("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                    ("wandb", "wandb", "wandb")):
        if target in targets:
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"--log-to {target} needs the {package} package: pip install {package}") from None


class ExternalLoggers:
    """Optional mirrors of the metrics to TensorBoard and Weights & Biases (off unless asked for with --log-to).

    The JSON Lines file stays the record that reports and comparisons read; these are for watching a run."""

    def __init__(self, targets: list[str], run_dir: Path, config: dict[str, Any]):
        self._tb = None
        self._wandb = None
        require_logger_packages(targets)
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in targets:
            import hashlib

            import wandb  # type: ignore
            run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]  # same id when resumed
            self._wandb = wandb.init(project=config.get("wandb_project") or "apollo-lm", name=run_dir.name,
                                     id=run_id, resume="allow", dir=str(run_dir), config=config)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
