"""``apollo compare``: how much compute and time each method saved to reach training from scratch's loss.

For each method run: the FLOPs and training seconds (evaluation excluded) at which its validation loss at the
target depth first reaches the scratch run's final validation loss, linearly interpolated between the two
evaluations that straddle it; the savings ``1 - method / scratch`` for both; the final validation loss; and
both runs' losses at equal FLOPs (the smaller of the two totals). A method that never reaches the target is
reported as such.

Two other targets: ``target_loss`` with a scratch run measures both against a loss of your choosing (scratch's
cost is then where its own curve reaches it); ``target_loss`` without one, for a scratch run known only by its
final loss (a paper's table, a run on another machine), measures the savings against the scratch cost you give:
FLOPs, or ``"budget"``, what training the target model at full depth over each method run's own token budget
costs, and optionally seconds.
Reads only each run's ``config.json``, ``model.json``, ``data.json`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import UserError
from ..train.metrics import read_metrics


@dataclass
class Run:
    path: Path
    name: str
    config: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("val_loss") is not None]

    @property
    def label(self) -> str:
        c = self.config
        if c.get("method") == "apollo":
            return f"{self.name} (apollo, {c.get('sampler')})"
        return f"{self.name} ({c.get('method')})"


def recipe(c: dict[str, Any]) -> str:
    """A run's training recipe in a few words, for tables: the method, its sampler, stages and growth points, and
    whatever departs from the method's defaults that changes what is trained (layer map, summed gradients,
    late sampling, reset moments), then the schedule and peak learning rate."""
    method = c.get("method") or "?"
    parts = [method]
    sampled = c.get("sampler") not in (None, "none")
    if sampled:
        release = (RunConfig.lvps_low, RunConfig.lvps_high)  # the config's defaults: the release's constants
        lvps = (c.get("lvps_low", release[0]), c.get("lvps_high", release[1]))
        constants = f" {lvps[0]:g}/{lvps[1]:g}" if c["sampler"] == "lvps" and lvps != release else ""
        parts[0] += f" ({c['sampler']}{constants})"
    if method != "scratch":
        if c.get("stages"):
            parts.append(str(c["stages"]).replace(" ", "") + (f" at {c['grow_at']}" if c.get("grow_at") else ""))
        default_map = "stack" if method == "stack" else "interpolate"
        if c.get("layer_map") and c["layer_map"] != default_map and method in ("apollo", "progressive", "stack"):
            parts.append(f"{c['layer_map']} map")
        if c.get("shared_grad", "sum") == "sum" and sampled:
            parts.append("summed shared grads")  # the default until 2026-11-23, and the paper's code
        window = ([f"from {c['sample_from']:g}"] if c.get("sample_from") else []) + \
            ([f"until {c['sample_until']:g}"] if c.get("sample_until", 1) < 1 else [])
        if window:
            parts.append("sampling " + " ".join(window) + " of each stage")
        if sampled:  # options that only act on runs that draw depths
            if c.get("sample_min_blocks", 1) > 1:
                parts.append(f"sampling only with {c['sample_min_blocks']}+ blocks")
            if c.get("sample_to") == "next":
                parts.append("sampling up to the next stage's depth")
            if c.get("own_depth_weight"):
                parts.append(f"own-depth loss x{c['own_depth_weight']:g} on deep draws")
        if c.get("grow_optimizer_state") == "reset":
            parts.append("moments reset")
        if c.get("repeat_scale") == "uses":
            parts.append("repeats scaled by 1/uses")
        if c.get("stage_lr"):
            parts.append(f"stage lr x{c['stage_lr']}")
    if c.get("schedule"):
        parts.append(c["schedule"] + (f" (decay {c['decay']:g})" if c["schedule"] == "wsd" and c.get("decay") else ""))
    if c.get("lr") is not None:
        parts.append(f"lr {c['lr']:g}")
    return ", ".join(parts)


def load_run_metrics(path: str | os.PathLike) -> Run:
    p = Path(path)
    need = ["config.json", "model.json", "metrics.jsonl"]
    missing = [n for n in need if not (p / n).is_file()]
    if missing:
        raise UserError(f"{p} is not a finished run directory ({', '.join(missing)} missing): give the --out of "
                        "training runs")
    rows = read_metrics(p / "metrics.jsonl")
    data = json.loads((p / "data.json").read_text()) if (p / "data.json").is_file() else {}
    run = Run(p, p.name, json.loads((p / "config.json").read_text()), json.loads((p / "model.json").read_text()),
              data, rows)
    if not run.evals:
        raise UserError(f"{p} has no validation loss yet: train it at least to its first evaluation")
    return run


def tokenizer_digest(run: Run) -> str | None:
    """SHA-256 of the run's ``tokenizer.json``, or the digest bench/archive.py kept in its place."""
    tok, kept = run.path / "tokenizer.json", run.path / "tokenizer.sha256"
    if tok.is_file():
        return hashlib.sha256(tok.read_bytes()).hexdigest()
    return kept.read_text().strip() if kept.is_file() else None


def _data_identity(run: Run) -> tuple:
    """What the tokenized data is, by content: the tokenizer's file and the token counts of both splits. The token
    cache key is not used: it includes the files' modification times, which a copy of the same data changes."""
    return tokenizer_digest(run), run.data.get("train_tokens"), run.data.get("valid_tokens")


def _source_names(sources: list[str] | None) -> list[str] | None:
    """The input files by name, not by the path they were given as: the same file given relative to another
    directory, or a copy of it on another machine (a GPU's carried data), is the same input; what it holds is
    checked by ``_data_identity``. Hugging Face dataset specs (``hf:...``) stay whole."""
    if sources is None:
        return None
    return [s if s.startswith("hf:") else Path(s).name for s in sources]


def check_comparable(scratch: Run, other: Run) -> None:
    """Refuse runs that differ in data, tokenizer, target model or validation set."""
    checks = [
        ("training data", _source_names(scratch.data.get("train_sources")),
         _source_names(other.data.get("train_sources"))),
        ("validation set", (_source_names(scratch.data.get("valid_sources")), scratch.data.get("valid_fraction"),
                            scratch.config.get("eval_batches"), scratch.config.get("seq_len")),
         (_source_names(other.data.get("valid_sources")), other.data.get("valid_fraction"),
          other.config.get("eval_batches"), other.config.get("seq_len"))),
        ("tokenized data or tokenizer", _data_identity(scratch), _data_identity(other)),
        ("target model", {k: scratch.model.get(k) for k in ("family", "n_layer", "n_embd", "n_head", "vocab_size")},
         {k: other.model.get(k) for k in ("family", "n_layer", "n_embd", "n_head", "vocab_size")}),
    ]
    for what, a, b in checks:
        if a != b:
            raise UserError(f"{other.path} and {scratch.path} differ in {what} ({b} vs {a}): compare runs trained "
                            "on the same data, tokenizer, validation set and target model")


def _crossing(evals: list[dict[str, Any]], target: float) -> tuple[float, float] | None:
    """(FLOPs, seconds) where the validation loss first reaches ``target``, interpolated linearly."""
    prev = None
    for r in evals:
        if r["val_loss"] <= target:
            if prev is None or prev["val_loss"] == r["val_loss"]:
                return r["flops"], r["wall"]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - r["val_loss"])
            return (prev["flops"] + f * (r["flops"] - prev["flops"]), prev["wall"] + f * (r["wall"] - prev["wall"]))
        prev = r
    return None


def _loss_at_flops(evals: list[dict[str, Any]], flops: float) -> float | None:
    prev = None
    for r in evals:
        if r["flops"] >= flops:
            if prev is None:
                return r["val_loss"] if math.isclose(r["flops"], flops, rel_tol=1e-9) else None
            f = (flops - prev["flops"]) / (r["flops"] - prev["flops"])
            return prev["val_loss"] + f * (r["val_loss"] - prev["val_loss"])
        prev = r
    return None


def stage_depth_histograms(run: Run) -> dict[int, dict[int, int]]:
    """{physical blocks: {depth: steps}} for runs with a depth sampler (empty for the others)."""
    hist: dict[int, Counter] = {}
    for r in run.rows:
        if "depth" in r and "n_blocks" in r:
            hist.setdefault(r["n_blocks"], Counter())[r["depth"]] += 1
    if run.config.get("sampler") in (None, "none"):
        return {}
    return {n: dict(sorted(h.items())) for n, h in sorted(hist.items())}


def full_depth_budget_flops(run: Run) -> float:
    """What training ``run``'s target model from scratch over the run's own tokens costs: the analytic FLOPs of a
    full-depth step (method.md, the count training uses) per token, times the tokens the run trained on."""
    import torch

    from ..config import ModelConfig
    from ..models import build_model
    from ..train.flops import train_step_flops

    if run.config.get("flops") is not None:
        raise UserError(f"{run.path} was trained to a FLOPs budget (--flops), so its tokens are not what a scratch "
                        "run of that budget trains on: give --scratch-flops as a number (the scratch run's FLOPs)")
    cfg = ModelConfig.from_dict(run.model)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
        model = build_model(cfg, n_blocks=1)
    tokens = run.rows[-1]["tokens"]
    return train_step_flops(model, cfg.n_layer, int(run.config["seq_len"]), 1) * tokens


def compare(scratch: Run | None, runs: list[Run], target_loss: float | None = None,
            scratch_flops: float | str | None = None, scratch_wall: float | None = None) -> dict[str, Any]:
    """The report of ``apollo compare`` as a dict (``compare.json``). With a scratch run and no ``target_loss``
    the target is its final validation loss; see the module's text for the other two cases."""
    if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
        raise UserError(f"--target-loss must be a positive validation loss, got {target_loss}")
    if scratch is not None:
        if scratch_flops is not None or scratch_wall is not None:
            raise UserError("--scratch-flops / --scratch-wall stand in for a scratch run: give them without one "
                            "(with --target-loss), or give the scratch run and not them")
        for r in runs:
            check_comparable(scratch, r)
        final = scratch.evals[-1]
        if target_loss is None:
            target, ref = final["val_loss"], (final["flops"], final["wall"])
        else:
            target, ref = target_loss, _crossing(scratch.evals, target_loss)
            if ref is None:
                lowest = min(e["val_loss"] for e in scratch.evals)
                raise UserError(f"the scratch run {scratch.path} never reaches --target-loss {target_loss:g} (its "
                                f"lowest validation loss is {lowest:.4f}): choose a target it reaches")
        source = "scratch final loss" if target_loss is None else "given"
    else:
        if target_loss is None or scratch_flops is None:
            raise UserError("without a scratch run give --target-loss (its final validation loss) and --scratch-flops "
                            "(its training FLOPs, or 'budget')")
        target, source, final = target_loss, "given", None
    if isinstance(scratch_flops, float) and not (math.isfinite(scratch_flops) and scratch_flops > 0):
        raise UserError(f"--scratch-flops must be a positive number of FLOPs or 'budget', got {scratch_flops}")
    if scratch_wall is not None and not (math.isfinite(scratch_wall) and scratch_wall > 0):
        raise UserError(f"--scratch-wall must be a positive number of seconds, got {scratch_wall}")
    top_flops = ref[0] if scratch is not None else (scratch_flops if isinstance(scratch_flops, float) else None)
    top_wall = ref[1] if scratch is not None else scratch_wall
    out: dict[str, Any] = {"scratch": str(scratch.path) if scratch else None,
                           "scratch_recipe": recipe(scratch.config) if scratch else None,
                           "target_loss": target, "target_source": source, "scratch_flops": top_flops,
                           "scratch_wall": top_wall, "methods": {}}
    names = [r.name for r in runs]
    for r in runs:
        name = r.name if names.count(r.name) == 1 else str(r.path)
        ref_flops = top_flops if top_flops is not None else full_depth_budget_flops(r)
        cross = _crossing(r.evals, target)
        entry = {
            "run": str(r.path), "method": r.config.get("method"), "sampler": r.config.get("sampler"),
            "recipe": recipe(r.config),
            "reached": cross is not None,
            "flops_to_target": cross[0] if cross else None, "wall_to_target": cross[1] if cross else None,
            "scratch_flops": ref_flops, "scratch_wall": top_wall,
            "flops_saving": 1 - cross[0] / ref_flops if cross else None,
            "wall_saving": 1 - cross[1] / top_wall if cross and top_wall else None,
            "final_val_loss": r.evals[-1]["val_loss"],
            "total_flops": r.evals[-1]["flops"], "total_wall": r.evals[-1]["wall"],
        }
        if scratch is not None:
            equal = min(final["flops"], r.evals[-1]["flops"])  # both runs' losses at the smaller of their totals
            entry.update({
                "equal_flops": equal,
                "loss_at_equal_flops": _loss_at_flops(r.evals, equal),
                "scratch_loss_at_equal_flops": _loss_at_flops(scratch.evals, equal),
                # read off scratch's curve before the end of its schedule (before its decay under WSD): higher
                # than a scratch run given only that budget would end at, so this favours the method
                "scratch_mid_run_at_equal_flops": equal < final["flops"],
            })
        small = next((row["small_flops"] for row in r.rows if row.get("small_flops") is not None), None)
        if small is not None:  # bert2bert / ligo: the papers count from the grown model on
            entry["small_model_flops"] = small
            entry["flops_saving_excluding_small"] = 1 - (cross[0] - small) / ref_flops if cross else None
        out["methods"][name] = entry
    return out


def _pct(x: float | None) -> str:
    return "did not reach" if x is None else f"{100 * x:.1f} %"


def _target_line(result: dict[str, Any]) -> str:
    loss = f"**{result['target_loss']:.4f}**"
    if result.get("scratch"):
        sr = f" ({result['scratch_recipe']})" if result.get("scratch_recipe") else ""
        cost = f"{result['scratch_flops']:.3g} FLOPs, {result['scratch_wall']:.1f} s"
        if result.get("target_source", "scratch final loss") == "scratch final loss":
            return f"Target: scratch run `{result['scratch']}`{sr} final validation loss {loss} ({cost})"
        return f"Target: validation loss {loss} (given), which scratch run `{result['scratch']}`{sr} reaches at {cost}"
    if result["scratch_flops"] is not None:
        flops = f"{result['scratch_flops']:.3g} FLOPs (given)"
    else:
        budgets = sorted({f"{m['scratch_flops']:.3g}" for m in result["methods"].values()})
        flops = f"{' / '.join(budgets)} FLOPs (the target model at full depth over the run's own tokens)"
    wall = f"{result['scratch_wall']:.1f} s (given)" if result["scratch_wall"] else "no time given"
    return f"Target: validation loss {loss} (given; no scratch run), savings against scratch's cost of {flops}, {wall}"


def to_markdown(result: dict[str, Any]) -> str:
    lines = [_target_line(result), "",
             "| method | run | reached | FLOPs saving | wall-clock saving | final val loss "
             "| loss vs scratch's at equal FLOPs |",
             "|---|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        label = m["recipe"]
        a, b = m.get("loss_at_equal_flops"), m.get("scratch_loss_at_equal_flops")
        las = "n/a" if a is None or b is None else f"{a:.4f} vs {b:.4f} at {m['equal_flops']:.3g}"
        saving = _pct(m["flops_saving"])
        if "flops_saving_excluding_small" in m:
            saving += f" ({_pct(m['flops_saving_excluding_small'])} without the small model)"
        if m.get("scratch_mid_run_at_equal_flops") and las != "n/a":
            las += " (scratch mid-run)"
        wall = "n/a" if m["reached"] and m["wall_saving"] is None else _pct(m["wall_saving"])
        lines.append(f"| {label} | {name} | {'yes' if m['reached'] else 'no'} | {saving} | "
                     f"{wall} | {m['final_val_loss']:.4f} | {las} |")
    if any(m.get("scratch_mid_run_at_equal_flops") for m in result["methods"].values()):
        lines += ["", "Scratch mid-run: its loss at equal FLOPs is read off its curve before the end of its "
                  "learning-rate schedule, which is higher than a scratch run given only that budget would end at; "
                  "the saving to reach scratch's final loss is the like-for-like figure."]
    return "\n".join(lines)


def write_report(scratch: Run | None, runs: list[Run], result: dict[str, Any], out_dir: Path) -> None:
    from .plots import plot_curves, plot_stage_depths

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "compare.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_dir / "compare.json")
    (out_dir / "compare.md.tmp").write_text(to_markdown(result) + "\n")
    os.replace(out_dir / "compare.md.tmp", out_dir / "compare.md")
    all_runs = [scratch, *runs] if scratch else runs
    flops = {r.label: ([e["flops"] for e in r.evals], [e["val_loss"] for e in r.evals]) for r in all_runs}
    wall = {r.label: ([e["wall"] for e in r.evals], [e["val_loss"] for e in r.evals]) for r in all_runs}
    target = result["target_loss"]
    plot_curves(flops, out_dir / "loss_vs_flops.png", "training FLOPs (log scale)", target, True,
                "Validation loss against compute")
    plot_curves(wall, out_dir / "loss_vs_wall.png", "training wall-clock seconds (evaluation excluded)", target,
                False, "Validation loss against time")
    plot_stage_depths({r.name: stage_depth_histograms(r) for r in runs}, out_dir / "depths.png")


def compare_runs(scratch_dir: str | None, run_dirs: list[str], out: str | None, as_json: bool = False,
                 target_loss: float | None = None, scratch_flops: float | str | None = None,
                 scratch_wall: float | None = None) -> int:
    scratch = load_run_metrics(scratch_dir) if scratch_dir else None
    runs = [load_run_metrics(d) for d in run_dirs]
    result = compare(scratch, runs, target_loss, scratch_flops, scratch_wall)
    out_dir = Path(out) if out else (scratch or runs[0]).path.parent / "compare"
    write_report(scratch, runs, result, out_dir)
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        print(to_markdown(result))
        print(f"\nwritten: {out_dir}/compare.json, compare.md, loss_vs_flops.png, loss_vs_wall.png"
              + (", depths.png" if (out_dir / "depths.png").exists() else ""))
    return 0
