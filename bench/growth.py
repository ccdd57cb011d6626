"""Growth benchmark: scratch, stack, progressive and apollo (plus variants) on identical data, tokenizer, seed,
batch and token budget, then ``apollo compare``.

    python bench/growth.py --size cpu                   # 12 layers, 128 hidden, 2 CPU threads
    python bench/growth.py --size gpt-small             # the paper's GPT shape, on a GPU
    python bench/growth.py --size cpu --methods scratch stack --tag lr3e-3 -- --lr 3e-3

Each method runs in its own process. On the CPU size two run at once (``--jobs 2``), each with one thread pinned
to its own core: on the 2-core machine that trains 1.3x more tokens per second in all than one run on two
threads (BENCHMARKS.md, section 1), and every run's clock still counts only its own core. ``--jobs 1`` runs
them one after another with every thread. Wall-clock figures are comparable within one invocation only.
Results: bench/out/growth-<size>[-tag]/ (runs, compare.json, compare.md, plots); BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from apollo_lm.config import parse_amount  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "en"

# the shapes of the reference measurements (issue 6); budgets in tokens
SIZES = {
    "cpu": dict(train=["news.train.jsonl.xz"], valid=["news.valid.jsonl.xz"], args=[
        "--model", "gpt", "--n-layer", "12", "--n-embd", "128", "--n-head", "4", "--vocab-size", "2048",
        "--seq-len", "64", "--batch-size", "32", "--tokens", "3M", "--threads", "2", "--dtype", "fp32",
        # the best scratch rate of {3e-4, 1e-3, 1.5e-3, 2e-3, 3e-3} (BENCHMARKS.md, "Against a tuned scratch run");
        # the runs before 2026-11-30's sixth session used 1e-3: add -- --lr 1e-3 to repeat them
        "--lr", "2e-3"],
        # 20 evaluations instead of 30 (each costs about 5 steps); compiled blocks are no faster on this CPU
        evals=20),
    "gpt-small": dict(train=["wiki.train.jsonl.xz", "news.train.jsonl.xz"], valid=["wiki.valid.jsonl.xz",
                                                                                   "news.valid.jsonl.xz"], args=[
        "--model", "gpt", "--preset", "gpt-small", "--vocab-size", "8192", "--seq-len", "512", "--batch-size",
        "64", "--tokens", "60M", "--dtype", "bf16", "--compile", "--lr", "1e-3"], evals=30),
    "bert-small": dict(train=["wiki.train.jsonl.xz", "news.train.jsonl.xz"], valid=["wiki.valid.jsonl.xz",
                                                                                    "news.valid.jsonl.xz"], args=[
        "--model", "bert", "--preset", "bert-small", "--vocab-size", "8192", "--seq-len", "128", "--batch-size",
        "256", "--tokens", "60M", "--dtype", "bf16", "--compile", "--lr", "1e-3"], evals=30),
}

COMMON = ["--beta1", "0.9", "--beta2", "0.95", "--weight-decay", "0.1", "--warmup", "0.01",
          "--min-lr-ratio", "0.1", "--grad-clip", "1.0", "--eval-batches", "16", "--seed", "1337", "--no-progress",
          "--log-every", "1", "--save-every", "1000000"]

# one growth: 3 blocks grown once to 12 at 60 %, then a 30 % wsd decay (the default stack 2026-11-23..30; it missed
# scratch's loss with 10M tokens, so the default became 3 -> 6 -> 12 at 20/50 % (stack-wsd), then at 30/60 %
# (stack-wsd-late, the default from the third session of 2026-11-30), and at 20/50 % again from the fourteenth
# session of 2026-12-02 (30/60 % missed the tuned scratch run's loss at 10M tokens, 20/50 % never did))
ONESHOT3 = ["--stages", "3,12", "--grow-at", "0.6", "--schedule", "wsd", "--decay", "0.3"]
C = ["--schedule", "cosine"]  # the schedule of the runs measured before wsd became the default (2026-11-23)
SUM = ["--shared-grad", "sum"]  # sampling runs measured before averaged shared gradients became the default
W4 = ["--schedule", "wsd", "--grow-at", "0.1,0.2,0.5"]  # four stages 1 -> 3 -> 6 -> 12 grown at 10/20/50 %, wsd
# three-stage stacking 3 -> 6 -> 12 at 20/50 %, 20 % wsd decay (the default stack in the first two sessions of
# 2026-11-30 and again since 2026-12-02's fourteenth; in between it grew the same stages at 30/60 %: stack-wsd-late)
WSD2 = ["--schedule", "wsd", "--decay", "0.2"]  # warmup-stable-decay, 20 % decay: the default of multi-stage runs
STACKS3 = [*WSD2, "--stages", "3,6,12"]
STACK3 = [*STACKS3, "--grow-at", "0.2,0.5"]
STACK3_LATE = [*STACKS3, "--grow-at", "0.3,0.6"]  # the same stages at 30/60 %: the default 2026-11-30..12-02


def _staged3(first: str, second: str) -> list[str]:
    """Staged training's depth operator on the three stages 3 -> 6 -> 12, growing at these fractions, 20 % decay."""
    return ["--method", "staged", "--stages", f"depth:3->6@{first}, depth:6->12@{second}", *WSD2]


def _options(args: list[str]) -> dict[str, str | None]:
    """``--flag value`` pairs (a flag followed by another flag, or last, has the value None); the last one wins."""
    out: dict[str, str | None] = {}
    for i, x in enumerate(args):
        if x.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[x] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def _last(args: list[str], flag: str) -> str:
    """The value of the last ``flag`` in ``args`` (later options override earlier ones, as in argparse)."""
    return _options(args)[flag]


METHODS = {
    # the tool's defaults (warmup-stable-decay; stack = 3 -> 6 -> 12 at 20/50 %, 20 % decay, since 2026-12-02, and
    # at 10/30 % past a family's long-budget threshold, config.py's STACK_LONG_BUDGET_TPP (since 2026-12-06; Llama's
    # was lower in 12-07's second and third sessions); at 30/60 % from 2026-11-30 to 12-02: runs of `stack` from
    # those days repeat with `stack-wsd-late`)
    "scratch": ["--method", "scratch"],
    "stack": ["--method", "stack"],
    "progressive": ["--method", "progressive"],
    "apollo": ["--method", "apollo"],
    # warmup-stable-decay (decay over the last 20 %) with the later 10/20/50 % growth points, and stacking
    # 3 -> 6 -> 12 at 20/50 % (the default stack, spelled out)
    "scratch-wsd": ["--method", "scratch", "--schedule", "wsd", "--decay", "0.2"],
    "stack-wsd": ["--method", "stack", *STACK3],
    # the same three stages grown later, at 30/60 %: the default stack from 2026-11-30 to 12-02, spelled out
    "stack-wsd-late": ["--method", "stack", *STACK3_LATE],
    # and earlier, at 10/30 %: what `stack` grows at past the family's threshold (config.STACK_LONG_BUDGET_TPP)
    "stack-wsd-early": ["--method", "stack", *STACKS3, "--grow-at", "0.1,0.3"],
    "progressive-wsd": ["--method", "progressive", *W4],
    "apollo-wsd": ["--method", "apollo", *W4, *SUM],
    # one growth late in the stable phase, as zero/one-layer progressive training does (Bu 2025): one block
    # copied to all 12 at 60 %, or 3 blocks stacked 4 times (the default stack 2026-11-23..30), then 10 % stable and a
    # 30 % decay
    "oneshot-wsd": ["--method", "progressive", "--stages", "1,12", "--grow-at", "0.6", "--schedule", "wsd",
                    "--decay", "0.3"],
    "oneshot3-wsd": ["--method", "stack", *ONESHOT3],
    # depth sampling under WSD: shared gradients averaged over a block's uses instead of summed (the sum's scale
    # swings with the depth drawn, up to 12x in the 1-block stage, which AdamW's second moment and clipping see);
    # and LVPS on top of the winning one-growth stack schedule (3 blocks run at sampled depths 3..12 through the
    # stacking map for 60 %, then stacked to 12), with mean gradients, and sampling only in the stage's 2nd half
    "apollo-wsd-mean": ["--method", "apollo", *W4, "--shared-grad",
                        "mean"],
    "apollo-oneshot3": ["--method", "apollo", "--layer-map", "stack", *ONESHOT3, *SUM],
    "apollo-oneshot3-mean": ["--method", "apollo", "--layer-map", "stack", *ONESHOT3, "--shared-grad", "mean"],
    "apollo-oneshot3-mean-late": ["--method", "apollo", "--layer-map", "stack", *ONESHOT3, "--shared-grad", "mean",
                                  "--sample-from", "0.5"],
    # LVPS drawing depths only up to the next stage's physical depth (1 block: 1..3, 3 blocks: 3..6, 6: 6..12):
    # the blocks practise the network the coming growth builds, not the 12-layer one, at less cost
    "apollo-wsd-next": ["--method", "apollo", *W4, "--sample-to", "next"],
    # and sampling only in the second half of each stage (the first half trains the physical depth alone)
    "apollo-wsd-late": ["--method", "apollo", *W4, "--sample-from", "0.5"],
    # LVPS that also trains the physical blocks at their own depth on every deep draw (--own-depth-weight)
    "apollo-wsd-own": ["--method", "apollo", *W4, "--own-depth-weight",
                       "1"],
    "apollo-oneshot3-own": ["--method", "apollo", "--layer-map", "stack", *ONESHOT3, "--shared-grad", "mean",
                            "--own-depth-weight", "1"],
    "apollo-oneshot3-own-late": ["--method", "apollo", "--layer-map", "stack", *ONESHOT3, "--shared-grad", "mean",
                                 "--own-depth-weight", "1", "--sample-from", "0.5"],
    # the best sampling recipe of the one-growth schedule (late LVPS + own-depth pass) on the four-stage schedule,
    # against progressive-wsd on equal growth points, and on the default three-stage stacking schedule
    "apollo-wsd-own-late": ["--method", "apollo", *W4,
                            "--own-depth-weight", "1", "--sample-from", "0.5"],
    "apollo-stack3-own-late": ["--method", "apollo", "--layer-map", "stack", *STACK3, "--own-depth-weight", "1",
                               "--sample-from", "0.5"],
    # the reverse of late sampling, on the then default's schedule (3 -> 6 -> 12 at 30/60 %, stacking map): LVPS in the
    # first half of each stage, then the blocks train at their own depth up to the growth (which the runs above
    # found decides the final loss), so the deep draws' lessons come early and the own depth is repaired after
    "apollo-stack-early": ["--method", "apollo", "--layer-map", "stack", *STACK3_LATE, "--sample-until", "0.5"],
    # the paper's sampler ablation (its BERT-Base ranking: LVPS > ES > US > none > FS) on the four-stage schedule,
    # mean shared gradients: edge, uniform and full sampling, and LVPS with the curve's low end at 0.3 instead of
    # the release's 0.6 (82 to 92 % of the steps at the physical depth instead of 61 to 77 %, measured); none is
    # progressive-wsd, LVPS is apollo-wsd-mean
    "apollo-wsd-es": ["--method", "apollo", *W4, "--sampler", "es"],
    "apollo-wsd-us": ["--method", "apollo", *W4, "--sampler", "us"],
    "apollo-wsd-fs": ["--method", "apollo", *W4, "--sampler", "fs"],
    "apollo-wsd-lvps0.3": ["--method", "apollo", *W4, "--lvps-low", "0.3"],
    # a causal test of the plateau finding of that ablation (deep draws of the single block of the 1-block stage
    # delay the escape from the unigram plateau): LVPS only in the stages with 3 or more blocks, the 1-block stage
    # trained at depth 1 as in progressive-wsd
    "apollo-wsd-min3": ["--method", "apollo", *W4, "--sample-min-blocks", "3"],
    # the then default's stages and growth points (3 -> 6 -> 12 at 30/60 %, 20 % wsd decay) grown by staged's
    # function-preserving depth operator (each block followed by a new one that starts as the identity, zero
    # output projections and zero moments) instead of stacking copies
    "staged-depth-wsd": _staged3("0.3", "0.6"),
    # the same operator later (35/70 %), and as one growth 3 -> 12 (each block followed by three identity blocks)
    "staged-depth-wsd-late": _staged3("0.35", "0.7"),
    "staged-one-wsd": ["--method", "staged", "--stages", "depth:3->12@0.7", *WSD2],
    # two late growths 3 -> 6 -> 12 at 50/80 % (the same FLOPs as one growth at 70 %; the short-budget schedule
    # of the README since 2026-12-02), by stacking and by staged's depth operator
    "stack-wsd-5080": ["--method", "stack", *STACKS3, "--grow-at", "0.5,0.8"],
    "staged-depth-wsd-5080": _staged3("0.5", "0.8"),
    # staged training's width operator: all 12 layers at half width (64 hidden, 2 heads) until 50 %, then doubled;
    # symmetry-breaking noise: the tool's default (--width-noise 1); `-- --width-noise 0` for the paper's operator
    "staged-width-wsd": ["--method", "staged", "--stages", "width:64->128@0.5", *WSD2],
    # --repeat-scale uses on the four-stage schedule: a block run as k layers adds 1/k of its branch each time
    # (finer steps of one residual flow), and growth divides the copies' output projections by their number, so
    # growth keeps the small model's function; without sampling, and with LVPS and mean shared gradients (both the
    # tool's defaults for these methods since 2026-12-01), or summed ones (the runs in folders named apollo-wsd-rs
    # of that day, made when --repeat-scale uses summed them by default)
    "progressive-wsd-rs": ["--method", "progressive", *W4, "--repeat-scale", "uses"],
    "apollo-wsd-rs": ["--method", "apollo", *W4, "--repeat-scale", "uses"],
    "apollo-wsd-rs-sum": ["--method", "apollo", *W4, "--repeat-scale", "uses", "--shared-grad", "sum"],
    # cosine-schedule runs of BENCHMARKS.md section 1 (the paper's schedule: one cosine over the run)
    "scratch-cos": ["--method", "scratch", *C],
    "stack-cos": ["--method", "stack", "--stages", "3,6,12", "--grow-at", "0.1,0.25", *C],
    "progressive-cos": ["--method", "progressive", *C],
    "apollo-cos": ["--method", "apollo", *C, *SUM],
    "progressive-late": ["--method", "progressive", "--grow-at", "0.1,0.2,0.5", *C],
    "apollo-late": ["--method", "apollo", "--grow-at", "0.1,0.2,0.5", *C, *SUM],
    "apollo-reset": ["--method", "apollo", "--grow-optimizer-state", "reset", *C, *SUM],
    "apollo-us": ["--method", "apollo", "--sampler", "us", *C, *SUM],
    "apollo-mean": ["--method", "apollo", "--shared-grad", "mean", *C],
    "apollo-sample-late": ["--method", "apollo", "--sample-from", "0.5", *C, *SUM],
    # progressive depth growth with staged training's function-preserving depth operator (new blocks start as
    # the identity, zero projections) instead of interpolation copies
    "staged-depth-late": ["--method", "staged", "--stages",
                          "depth:1->3@0.1, depth:3->6@0.2, depth:6->12@0.5", *C],
    "staged-depth": ["--method", "staged", "--stages", "depth:1->3@0.05, depth:3->6@0.1, depth:6->12@0.25", *C],
    "apollo-late-mean": ["--method", "apollo", "--grow-at", "0.1,0.2,0.5", "--shared-grad", "mean", *C],
    # the map type alone: interpolation stages 1,3,6,12 grown (and, for apollo, shared) by stacking
    "progressive-stack": ["--method", "progressive", "--layer-map", "stack", *C],
    "apollo-stack": ["--method", "apollo", "--layer-map", "stack", *C, *SUM],
    "stack-late": ["--method", "stack", "--stages", "3,6,12", "--grow-at", "0.2,0.5", *C],
    # the former default's schedule (3 -> 6 -> 12 at 20/50 %, stacking) with Apollo's depth sampling on top
    "apollo-stack-late": ["--method", "apollo", "--layer-map", "stack", "--stages", "3,6,12", "--grow-at", "0.2,0.5",
                          *C, *SUM],
}

# Every apollo / progressive variant above was measured with the paper's unscaled repeats, before
# --repeat-scale uses became those methods' default (2026-12-01): pinned, so that BENCHMARKS.md's commands
# still reproduce them. The plain names follow the tool's defaults; the -rs variants name their scaling.
FOLLOW_DEFAULTS = {"progressive", "apollo", "progressive-wsd-rs", "apollo-wsd-rs", "apollo-wsd-rs-sum"}
for _name, _opts in METHODS.items():
    if (_name not in FOLLOW_DEFAULTS and _last(_opts, "--method") in ("apollo", "progressive")
            and "--repeat-scale" not in _opts and "stack" not in _opts):
        _opts += ["--repeat-scale", "none"]


def overridden(extra: list[str], name: str) -> list[str]:
    """The options given after ``--`` that method ``name``'s own options override (they come later on its command
    line, so that a named variant keeps its meaning), each as a line saying so."""
    mine, theirs = _options(extra), _options(METHODS[name])
    return [f"{name} sets {flag} {theirs[flag]}, which overrides {flag} {mine[flag]} given after --"
            for flag in mine if flag in theirs and theirs[flag] != mine[flag]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="cpu")
    p.add_argument("--methods", nargs="+", default=["scratch", "stack", "progressive", "apollo"],
                   choices=tuple(METHODS))
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with the *.jsonl.xz splits")
    p.add_argument("--tag", default="", help="suffix for the output folder (e.g. lr3e-3)")
    p.add_argument("--out", default=None)
    p.add_argument("--eval-every", type=int, default=None, help="default: 20 evaluations per run (cpu), 30 (GPU sizes)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at once, each pinned to cpu_count/jobs cores (default: 2 on cpu, 1 on GPU sizes)")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: options passed to every run (e.g. --lr 3e-3); a named variant's own options "
                   "override them, and a warning names each one overridden")
    a = p.parse_args()
    size = SIZES[a.size]
    data = Path(a.data_dir)
    missing = [f for f in size["train"] + size["valid"] if not (data / f).exists()]
    if missing:
        print(f"error: {data} lacks {missing}: give --data-dir", file=sys.stderr)
        return 2
    out = Path(a.out or ROOT / "bench" / "out" / f"growth-{a.size}{'-' + a.tag if a.tag else ''}")
    out.mkdir(parents=True, exist_ok=True)
    extra = [x for x in a.extra if x != "--"]
    for name in a.methods:
        for line in overridden(extra, name):
            print(f"warning: {line}; pick a method without it (e.g. scratch for scratch-wsd)", file=sys.stderr)
    base = [*COMMON, *size["args"], "--data", *[str(data / f) for f in size["train"]], "--valid",
            *[str(data / f) for f in size["valid"]], *extra]
    if a.eval_every is None:
        # the size's evaluation count over the budget actually run (options after -- override the size's)
        tokens = parse_amount(_last(base, "--tokens"), "--tokens")
        bsz, seq = int(_last(base, "--batch-size")), int(_last(base, "--seq-len"))
        a.eval_every = max(1, int(tokens / (bsz * seq) / size["evals"]))
    base += ["--eval-every", str(a.eval_every)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = [out / name for name in a.methods]
    todo = []
    for name in a.methods:
        run_dir = out / name
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "checkpoints").exists():
            print(f"[{name}] exists, skipping (delete {run_dir} to rerun)", flush=True)
        else:
            todo.append(name)
    jobs = a.jobs or (2 if a.size == "cpu" else 1)
    rc = _run_all(todo, base, out, env, jobs=jobs)
    if rc:
        return rc
    if "scratch" not in a.methods:
        print("no scratch run: nothing to compare against", file=sys.stderr)
        return 0
    scratch = out / "scratch"
    others = [r for r in runs if r != scratch]
    if not others:
        print("only the scratch run: nothing to compare it with", file=sys.stderr)
        return 0
    cmd = [sys.executable, "-m", "apollo_lm", "compare", str(scratch), *map(str, others), "--out",
           str(out / "compare")]
    subprocess.run(cmd, env=env, check=True)
    meta = {"size": a.size, "methods": a.methods, "jobs": jobs, "args": base, "date": time.strftime("%Y-%m-%d"),
            "device": _device()}
    (out / "bench.json").write_text(json.dumps(meta, indent=1))
    return 0


def _run_all(names: list[str], base: list[str], out: Path, env: dict, jobs: int) -> int:
    """Run each method's training; ``jobs`` at once, each pinned to its own share of the cores (in the order
    given, so put the longest, scratch, first)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    jobs = max(1, min(jobs, len(cores), len(names) or 1))
    per = len(cores) // jobs
    slots = [cores[i * per:(i + 1) * per] for i in range(jobs)]
    pin = jobs > 1 and hasattr(os, "sched_setaffinity")
    run_env = dict(env, OMP_NUM_THREADS=str(per)) if jobs > 1 else env
    free, running, queue = list(range(jobs)), {}, list(names)
    while queue or running:
        # start the next run only once every running one has its data ready (it writes metrics.jsonl after
        # tokenizing), so that the tokenizer and token cache are built once, not raced for
        ready = all((out / n / "metrics.jsonl").exists() for n in running)
        while queue and free and ready:
            name, slot = queue.pop(0), free.pop(0)
            cmd = [sys.executable, "-m", "apollo_lm", "-q", "train", *base, *METHODS[name], "--out", str(out / name)]
            if jobs > 1:
                cmd += ["--threads", str(per)]
            print(f"[{name}] {' '.join(cmd[2:])}" + (f"  (cores {slots[slot]})" if jobs > 1 else ""), flush=True)
            proc = subprocess.Popen(cmd, env=run_env,
                                    preexec_fn=(lambda c=slots[slot]: os.sched_setaffinity(0, c)) if pin else None)
            running[name] = (proc, slot, time.time())
            ready = jobs == 1
        time.sleep(1)
        for name, (proc, slot, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            free.append(slot)
            if proc.returncode:
                print(f"[{name}] failed with exit code {proc.returncode}", file=sys.stderr)
                for other, _, _ in running.values():
                    other.terminate()
                return proc.returncode
            print(f"[{name}] {time.time() - t0:.0f} s", flush=True)
    return 0


def _device() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    import platform
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    raise SystemExit(main())
