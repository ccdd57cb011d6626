"""Plots for reports (matplotlib, headless). Every plot is written to a temporary file and renamed."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_depth_distribution(dist: Mapping[int, float], path: str | os.PathLike, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(dist), list(dist.values()), color="tab:blue")
    ax.set_xlabel("depth D (blocks run per step)")
    ax.set_ylabel("probability")
    ax.set_xticks(list(dist))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                xlabel: str, target: float | None, logx: bool, title: str) -> None:
    """Validation loss curves, one per run, with the scratch run's final loss as a dashed line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"scratch final loss {target:.3f}")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token, target depth)")
    ax.set_title(title)
    ys = [v for _, (_, y) in curves.items() for v in y]
    if ys and target is not None:  # the early, very high losses would flatten the interesting part
        ax.set_ylim(min(ys) - 0.05, min(max(ys), target + 1.5))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, path)


def plot_stage_depths(histograms: Mapping[str, Mapping[int, Mapping[int, int]]], path: str | os.PathLike) -> None:
    """For each sampling run, the observed depth histogram in each stage (keyed by physical blocks)."""
    runs = [r for r, h in histograms.items() if h]
    if not runs:
        return
    n_stages = max(len(h) for h in histograms.values())
    fig, axes = plt.subplots(len(runs), n_stages, figsize=(3.2 * n_stages, 2.6 * len(runs)), squeeze=False)
    for row, run in enumerate(runs):
        for col, (n, hist) in enumerate(sorted(histograms[run].items())):
            ax = axes[row][col]
            total = sum(hist.values())
            ax.bar(list(hist), [c / total for c in hist.values()], color="tab:orange")
            ax.set_xticks(list(hist))
            ax.set_title(f"{run}: {n} blocks", fontsize=9)
            ax.set_xlabel("depth run")
            ax.set_ylabel("fraction of steps")
        for col in range(len(histograms[run]), n_stages):
            axes[row][col].axis("off")
    fig.tight_layout()
    _save(fig, path)
