"""GLUE side by side: fine-tune several pretrained runs (e.g. scratch and apollo from ``bench/growth.py``) on the
same GLUE tasks with the same settings and seeds, and write one table.

    python bench/growth.py --size bert-small --methods scratch apollo stack          # pretrain (GPU)
    python bench/glue.py bench/out/growth-bert-small/{scratch,apollo,stack} --seeds 1 2 3

Each (run, task, seed) fine-tunes from the run's final checkpoint (``apollo glue``'s code, in this process). The
score of a task is its metric (the mean of F1 and accuracy for MRPC, of Pearson and Spearman for STS-B) averaged
over the seeds; the table also gives the spread (max - min over seeds), since the small tasks (RTE, MRPC, CoLA)
move by points between seeds. Results: OUT/glue.json and OUT/glue.md (default: next to the first run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_GLUE = ROOT.parent / "shared" / "data" / "glue"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="pretrained run directories, compared column by column")
    p.add_argument("--task", default="all", help="SST-2, CoLA, MRPC, RTE, STS-B or all")
    p.add_argument("--data-dir", default=str(DEFAULT_GLUE))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output folder (default: RUN0/../glue)")
    a = p.parse_args(argv)

    from apollo_lm.config import UserError
    from apollo_lm.eval.glue import run_glue
    from apollo_lm.train.checkpoint import write_json

    runs = [Path(r) for r in a.runs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        names = [str(r) for r in runs]
    out = Path(a.out) if a.out else runs[0].parent / "glue"
    kw = dict(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, max_len=a.max_len, max_train=a.max_train,
              max_eval=a.max_eval, device=a.device)
    results: dict[str, dict] = {}
    t0 = time.time()
    try:
        for name, run in zip(names, runs):
            per_seed = {}
            for seed in a.seeds:
                r = run_glue(run, a.task, data_dir=a.data_dir, seed=seed, **kw)
                per_seed[seed] = r
                print(f"[{name} seed {seed}] " + ", ".join(f"{t} {v['score']:.1f}" for t, v in r["tasks"].items()),
                      flush=True)
            results[name] = {"run": str(run), "checkpoint_step": next(iter(per_seed.values()))["checkpoint_step"],
                             "seeds": {str(s): {t: v["metrics"] for t, v in r["tasks"].items()}
                                       for s, r in per_seed.items()},
                             "tasks": _summary(per_seed)}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = format_table(results)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "glue.json", {"settings": {**kw, "task": a.task, "seeds": a.seeds}, "runs": results,
                                   "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d")})
    tmp = out / "glue.md.tmp"
    tmp.write_text(table + "\n")
    os.replace(tmp, out / "glue.md")
    print(f"wrote {out / 'glue.json'} and {out / 'glue.md'}")
    return 0


def _summary(per_seed: dict[int, dict]) -> dict[str, dict]:
    """Per task: mean score over seeds, spread, and the mean of each metric."""
    tasks = next(iter(per_seed.values()))["tasks"]
    summary = {}
    for t in tasks:
        scores = [r["tasks"][t]["score"] for r in per_seed.values()]
        metrics = {m: sum(r["tasks"][t]["metrics"][m] for r in per_seed.values()) / len(per_seed)
                   for m in tasks[t]["metrics"]}
        summary[t] = {"score": sum(scores) / len(scores), "spread": max(scores) - min(scores), "metrics": metrics}
    if len(tasks) > 1:
        summary["average"] = {"score": sum(v["score"] for v in summary.values()) / len(tasks), "spread": None,
                              "metrics": {}}
    return summary


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    tasks = list(next(iter(results.values()))["tasks"])
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        cells = []
        for n in names:
            v = results[n]["tasks"][t]
            cell = f"{v['score']:.1f}"
            if v["spread"] is not None and len(results[n]["seeds"]) > 1:
                cell += f" (±{v['spread'] / 2:.1f})"
            if len(v["metrics"]) > 1:
                cell += " [" + ", ".join(f"{k} {x:.1f}" for k, x in v["metrics"].items()) + "]"
            cells.append(cell)
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
