"""Operator methods in the loop: staged training (width and depth, timed and @auto), bert2BERT and LiGO, with
exact resume across their growth points."""

import pytest

from apollo_lm.train.checkpoint import checkpoint_dirs, read_checkpoint
from apollo_lm.train.metrics import read_metrics

from .conftest import TINY, run_cli
from .test_train import _same_metrics


def _run(tmp_path, corpus_files, name, *extra, steps="16"):
    train, valid = corpus_files
    out = tmp_path / name
    assert run_cli("train", "--data", str(train), "--valid", str(valid), "--out", str(out), *TINY, "--n-layer", "4",
                   "--steps", steps, "--eval-every", "4", "--save-every", "5", "--lr", "3e-3", *extra) == 0
    return out


@pytest.mark.parametrize("model", ["gpt", "bert", "llama"])
def test_staged_width_then_depth(tmp_path, corpus_files, model):
    out = _run(tmp_path, corpus_files, "staged", "--model", model, "--method", "staged", "--stages",
               "width:16->32@0.25, depth:2->4@0.5")
    rows = read_metrics(out / "metrics.jsonl")
    assert [(r["n_embd"], r["n_blocks"]) for r in rows] == [(16, 2)] * 4 + [(32, 2)] * 4 + [(32, 4)] * 8
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert evals[-1] < evals[0]
    ck = read_checkpoint(checkpoint_dirs(out)[-1])
    assert ck["model_config"]["n_embd"] == 32 and ck["model_config"]["n_blocks"] == 4
    # FLOPs follow the model actually trained: the first stage (half width, half depth) is the cheapest
    per_step = [b["flops"] - a["flops"] for a, b in zip(rows, rows[1:])]
    assert per_step[0] < per_step[5] < per_step[-1]


@pytest.mark.parametrize("stop", ["3", "4", "9"])  # before, exactly at, and after the growth points
def test_staged_resume_across_growth(tmp_path, corpus_files, stop):
    args = ("--method", "staged", "--stages", "width:16->32@0.25, depth:2->4@0.5")
    full = _run(tmp_path, corpus_files, "full", *args)
    part = _run(tmp_path, corpus_files, "part", *args, "--stop-after", stop)
    assert run_cli("train", "--resume", str(part), "--no-progress") == 0
    _same_metrics(read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl"))


def test_staged_width_noise_in_the_loop(tmp_path, corpus_files):
    """--width-noise reaches the operator: the same run up to the growth, the same loss on the first grown step
    (the function is kept), a different run after it."""
    args = ("--method", "staged", "--stages", "width:16->32@0.25")
    rows = {n: read_metrics(_run(tmp_path, corpus_files, f"n{n}", *args, "--width-noise", n) / "metrics.jsonl")
            for n in ("0", "1")}
    plain, noisy = rows["0"], rows["1"]
    grown = next(i for i, r in enumerate(plain) if r["n_embd"] == 32)
    assert [r["train_loss"] for r in plain[:grown]] == [r["train_loss"] for r in noisy[:grown]]
    assert noisy[grown]["train_loss"] == pytest.approx(plain[grown]["train_loss"], abs=1e-4)
    assert max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(plain[grown + 2:], noisy[grown + 2:])) > 1e-4


def test_staged_auto_growth_fires_and_resumes(tmp_path, corpus_files):
    # a large margin makes the rule fire as soon as its window is full: the test checks the wiring, the rule
    # itself is tested in test_staged_schedule.py
    args = ("--method", "staged", "--stages", "depth:2->4@auto", "--auto-window", "4", "--auto-margin", "1e9")
    full = _run(tmp_path, corpus_files, "full", *args, steps="12")
    rows = read_metrics(full / "metrics.jsonl")
    assert rows[0]["n_blocks"] == 2 and rows[-1]["n_blocks"] == 4
    grown_at = next(r["step"] for r in rows if r["n_blocks"] == 4)
    assert grown_at == 5  # fires once the window of 4 losses is full, effective at the next step
    part = _run(tmp_path, corpus_files, "part", *args, "--stop-after", "5", steps="12")
    assert run_cli("train", "--resume", str(part), "--no-progress") == 0
    _same_metrics(rows, read_metrics(part / "metrics.jsonl"))


@pytest.mark.parametrize("model", ["gpt", "llama"])
@pytest.mark.parametrize("method", ["bert2bert", "ligo"])
def test_grow_from_a_small_model(tmp_path, corpus_files, method, model):
    out = _run(tmp_path, corpus_files, method, "--method", method, "--model", model, "--ligo-steps", "3")
    rows = read_metrics(out / "metrics.jsonl")
    assert [(r["n_embd"] if "n_embd" in r else None) for r in rows][:1] == [None]
    grown = next(i for i, r in enumerate(rows) if "small_flops" in r)
    assert rows[grown]["step"] == 5  # growth at 25 % of 16 steps, before step 5
    assert rows[grown]["small_flops"] == rows[grown - 1]["flops"]
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert evals[-1] < evals[0]
    if method == "ligo":  # the operator's training steps are counted in the all-in FLOPs
        step_cost = rows[grown + 1]["flops"] - rows[grown]["flops"]
        assert rows[grown]["flops"] - rows[grown - 1]["flops"] > 3 * step_cost * 0.9


def test_operator_methods_reject_bad_schedules(tmp_path, capsys):
    for extra, needle in [(("--method", "staged", "--stages", "width:12->32@0.5"), "whole factor"),
                          (("--method", "staged", "--stages", "depth:2->4@0.5", "--grow-at", "0.3"), "drop --grow-at"),
                          (("--method", "bert2bert", "--grow-at", "0.2,0.4"), "grows once"),
                          (("--method", "staged", "--stages", "depth:2->8@0.5"), "ends at 8")]:
        assert run_cli("train", "--out", str(tmp_path / "x"), *TINY, "--n-layer", "4", *extra) == 2, extra
        assert needle in capsys.readouterr().err
