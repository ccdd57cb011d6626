"""Keep the evidence of benchmark runs in the repository: what ``apollo compare`` reads, a few kB per run.

    python bench/archive.py bench/out/cpu10-wsd-lr2e-3-stack0.2-0.5/stack-wsd ...
    apollo compare bench/results/cpu10-wsd-lr2e-3/scratch-wsd bench/results/cpu10-wsd-lr2e-3-stack0.2-0.5/stack-wsd

``bench/out/`` is not committed (a run's ``metrics.jsonl`` has a line per step, its checkpoints megabytes) and is
lost with the machine. For each run directory this writes ``bench/results/<parent>/<run>/`` (``--to`` for another
root) with ``config.json``, ``model.json``, ``data.json``, the tokenizer's SHA-256 (what compare's data check
uses) and the metrics lines that carry a validation loss, the last line, and for runs that draw depths each
step's depth and block count (the depth histograms); ``apollo compare`` on archived runs gives the figures it
gives on the originals (tested), so BENCHMARKS.md's numbers can be checked without training again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from apollo_lm.errors import UserError  # noqa: E402
from apollo_lm.eval.compare import load_run_metrics, tokenizer_digest  # noqa: E402


def slim_rows(rows: list[dict], sampled: bool) -> list[dict]:
    """Evaluation rows whole, the last row whole, the first row that records a small model's FLOPs (bert2bert /
    ligo), and for sampling runs (step, depth, blocks) of every other row."""
    small = next((i for i, r in enumerate(rows) if r.get("small_flops") is not None), None)
    out = []
    for i, r in enumerate(rows):
        if r.get("val_loss") is not None or i == len(rows) - 1 or i == small:
            out.append(r)
        elif sampled and "depth" in r:
            out.append({k: r[k] for k in ("step", "depth", "n_blocks") if k in r})
    return out


def archive(run_dir: Path, dest: Path) -> Path:
    run = load_run_metrics(run_dir)  # refuses what is not a run with an evaluation
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.json", "model.json", "data.json"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, tmp / name)
    digest = tokenizer_digest(run)
    if digest is not None:
        (tmp / "tokenizer.sha256").write_text(digest + "\n")
    rows = slim_rows(run.rows, run.config.get("sampler") not in (None, "none"))
    (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (the --out of apollo train)")
    p.add_argument("--to", type=Path, default=ROOT / "bench" / "results",
                   help="root of the archive; each run goes to <root>/<its parent's name>/<its name>")
    a = p.parse_args(argv)
    try:
        for r in a.runs:
            r = r.resolve()
            print(archive(r, a.to / r.parent.name / r.name))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
