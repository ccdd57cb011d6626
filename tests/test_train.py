"""Training end to end through the CLI: metrics, checkpoints, exact resume, eval, and bad input."""

import json
import subprocess
import sys

import pytest

from apollo_lm.train.checkpoint import checkpoint_dirs, read_checkpoint
from apollo_lm.train.metrics import read_metrics

from .conftest import TINY, run_cli

COMPARED = ("step", "tokens", "flops", "train_loss", "lr", "depth", "n_blocks", "stage", "val_loss",
            "val_loss_physical")


def _train(out, corpus_files, *extra):
    train, valid = corpus_files
    return run_cli("train", "--data", str(train), "--valid", str(valid), "--out", str(out), *TINY, *extra)


def _same_metrics(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert {k: ra.get(k) for k in COMPARED} == {k: rb.get(k) for k in COMPARED}


@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_train_writes_run_and_loss_falls(tmp_path, corpus_files, model):
    out = tmp_path / "run"
    assert _train(out, corpus_files, "--model", model, "--steps", "30", "--eval-every", "15", "--lr", "3e-3") == 0
    for name in ("config.json", "model.json", "tokenizer.json", "data.json", "metrics.jsonl"):
        assert (out / name).is_file()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(r["wall"] <= r["wall_total"] for r in rows)
    ck = read_checkpoint(checkpoint_dirs(out)[-1])
    assert ck["state"]["step"] == 30 and ck["state"]["tokens"] == 30 * 4 * 32
    assert abs(ck["state"]["flops"] - rows[-1]["flops"]) < 1


@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_resume_equals_uninterrupted(tmp_path, corpus_files, model):
    args = ("--model", model, "--steps", "12", "--eval-every", "4", "--save-every", "5", "--dropout", "0.1")
    assert _train(tmp_path / "full", corpus_files, *args) == 0
    assert _train(tmp_path / "part", corpus_files, *args, "--stop-after", "7") == 0
    assert len(read_metrics(tmp_path / "part" / "metrics.jsonl")) == 7
    assert run_cli("train", "--resume", str(tmp_path / "part"), "--no-progress") == 0
    _same_metrics(read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "part" / "metrics.jsonl"))


def test_resume_after_a_crash_rewinds_metrics(tmp_path, corpus_files):
    """A run that died after its last checkpoint has metrics past it; resume rewrites them identically."""
    args = ("--steps", "10", "--save-every", "4", "--eval-every", "5")
    assert _train(tmp_path / "full", corpus_files, *args) == 0
    assert _train(tmp_path / "crash", corpus_files, *args, "--stop-after", "6") == 0
    # simulate a crash at step 6: the step-6 checkpoint is lost, the metrics up to 6 remain
    import shutil
    shutil.rmtree(checkpoint_dirs(tmp_path / "crash")[-1])
    assert run_cli("train", "--resume", str(tmp_path / "crash"), "--no-progress") == 0
    _same_metrics(read_metrics(tmp_path / "full" / "metrics.jsonl"),
                  read_metrics(tmp_path / "crash" / "metrics.jsonl"))


def test_eval_command(tmp_path, corpus_files, capsys):
    out = tmp_path / "run"
    assert _train(out, corpus_files, "--steps", "5") == 0
    capsys.readouterr()
    assert run_cli("eval", str(out), "--data", str(corpus_files[1]), "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["loss"] > 0 and res["perplexity"] == pytest.approx(__import__("math").exp(res["loss"]))
    assert 0 < res["bits_per_byte"] < res["loss"] * 1.5 and res["bytes"] > res["tokens"]
    assert run_cli("eval", str(out), "--data", str(corpus_files[1])) == 0
    assert "bits per byte" in capsys.readouterr().out


def test_default_corpus_and_config_file(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 3\nbatch_size: 2\nlr: 0.002\n")
    out = tmp_path / "d"
    assert run_cli("train", "--config", str(cfg), "--out", str(out), *TINY) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 3 and saved["lr"] == 0.002 and saved["batch_size"] == 4  # flag beats file
    assert saved["data"] == []  # the built-in corpus


@pytest.mark.parametrize("extra, needle", [
    (("--n-embd", "30", "--n-head", "4"), "not divisible"),
    (("--lr", "-0.1"), "--lr must be a positive number"),
    (("--data", "/nonexistent/x.txt"), "does not exist"),
    (("--seq-len", "100000"), "fewer than one sequence"),
    (("--stages", "1,2"), "growth method"),
    (("--method", "apollo", "--n-layer", "4", "--stages", "1,2,3"), "target depth"),
    (("--method", "apollo", "--grow-at", "0.5,0.4,0.9"), "increase"),
    (("--method", "progressive", "--stages", "1,2", "--n-layer", "2", "--grow-at", "20s", "--steps", "10"),
     "inside the budget"),
    (("--stage-lr", "2,1"), "needs a growth method"),
    (("--method", "stack", "--stages", "1,2", "--grow-at", "0.5", "--stage-lr", "2,0"), "must be positive"),
    (("--method", "stack", "--stages", "1,2", "--grow-at", "0.5", "--stage-lr", "2,x"), "comma-separated"),
    (("--method", "stack", "--stages", "1,2", "--grow-at", "0.5", "--stage-lr", "2,1,1"), "one per stage"),
    (("--method", "staged", "--stages", "depth:1->2@0.5", "--stage-lr", "2"), "one per stage"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, extra, needle):
    out = tmp_path / "bad"
    assert run_cli("train", "--out", str(out), *TINY, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert not out.exists()  # nothing half-written


def test_existing_run_and_foreign_checkpoint(tmp_path, corpus_files, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, corpus_files, "--steps", "2") == 0
    assert _train(a, corpus_files, "--steps", "2") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _train(b, corpus_files, "--steps", "2", "--n-embd", "64") == 0
    # put b's checkpoint into a: a checkpoint of a different model
    import shutil
    shutil.rmtree(checkpoint_dirs(a)[-1])
    shutil.copytree(checkpoint_dirs(b)[-1], a / "checkpoints" / "step_00000002")
    capsys.readouterr()
    assert run_cli("train", "--resume", str(a)) == 2
    assert "different model" in capsys.readouterr().err
    assert run_cli("train", "--resume", str(a), "--lr", "1") == 2
    assert "cannot change: --lr" in capsys.readouterr().err
    (checkpoint_dirs(b)[-1] / "model.safetensors").write_bytes(b"garbage")
    assert run_cli("eval", str(b), "--data", str(corpus_files[1])) == 2
    assert "damaged" in capsys.readouterr().err


def test_cli_errors_have_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "apollo_lm", "train", "--data", str(tmp_path / "none.jsonl"),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: data file")


def test_non_finite_steps_are_skipped_then_stop(tmp_path, corpus_files, caplog):
    """A NaN loss skips the update; K in a row stop the run naming the step, the last checkpoint stays."""
    import torch

    from apollo_lm.config import RunConfig
    from apollo_lm.errors import UserError
    from apollo_lm.train.loop import start_run

    train, valid = corpus_files
    cfg = RunConfig(method="scratch", data=[str(train)], valid=[str(valid)], n_layer=2, n_embd=32, n_head=2, seq_len=32,
                    vocab_size=300, batch_size=4, eval_batches=1, progress=False, steps=12, save_every=3,
                    max_bad_steps=3).resolved()
    trainer = start_run(cfg, tmp_path / "nan")
    forward = trainer.model.forward
    poisoned = {5, 8, 9, 10}  # optimizer steps (1-based) whose loss is NaN

    def maybe_nan(*a, **k):
        logits, loss = forward(*a, **k)
        return logits, loss * float("nan") if trainer.state.step + 1 in poisoned else loss

    trainer.model.forward = maybe_nan
    with pytest.raises(UserError, match=r"3 steps in a row up to step 10 .*step_00000009"):
        trainer.train()
    rows = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("skipped")] == [5, 8, 9]
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    assert all(torch.isfinite(p).all() for p in before.values())  # no NaN reached the weights
    assert [p.name for p in checkpoint_dirs(tmp_path / "nan")] == ["step_00000006", "step_00000009"]


def test_grad_accumulation_and_token_budget(tmp_path, corpus_files):
    out = tmp_path / "acc"
    assert _train(out, corpus_files, "--tokens", "1k", "--grad-accum", "2") == 0
    rows = read_metrics(out / "metrics.jsonl")
    # 1000 tokens at 2 x 4 x 32 = 256 tokens per step: 4 steps
    assert [r["tokens"] for r in rows] == [256, 512, 768, 1024]


def test_foreign_tokenizer_is_refused(tmp_path, corpus_files, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, corpus_files, "--steps", "2") == 0
    assert _train(b, corpus_files, "--steps", "2", "--vocab-size", "400") == 0
    (a / "tokenizer.json").write_text((b / "tokenizer.json").read_text())
    capsys.readouterr()
    assert run_cli("train", "--resume", str(a)) == 2
    assert "not this run's tokenizer" in capsys.readouterr().err
    assert run_cli("eval", str(a), "--data", str(corpus_files[1])) == 2
    assert "not this run's tokenizer" in capsys.readouterr().err


def test_external_loggers(tmp_path, corpus_files, capsys, monkeypatch):
    """--log-to mirrors metrics to TensorBoard when installed; a missing package is a clear error."""
    import builtins

    real_import = builtins.__import__

    def no_pkg(name, *a, **k):
        if name in ("wandb", "torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pkg)
    assert _train(tmp_path / "w", corpus_files, "--steps", "2", "--log-to", "wandb") == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before anything was written
    monkeypatch.setattr(builtins, "__import__", real_import)
    pytest.importorskip("tensorboard")
    assert _train(tmp_path / "tb", corpus_files, "--steps", "3", "--log-to", "tensorboard") == 0
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("method, growth", [("stack", ("--stages", "1,2", "--grow-at", "6s")),
                                            ("staged", ("--stages", "depth:1->2@6s",))])
def test_stage_lr_scales_each_stage(tmp_path, corpus_files, method, growth):
    """--stage-lr multiplies the schedule's learning rate by each stage's value and changes nothing else."""
    base = ("--method", method, *growth, "--steps", "10", "--eval-every", "5", "--schedule", "wsd", "--decay", "0.3")
    assert _train(tmp_path / "plain", corpus_files, *base) == 0
    assert _train(tmp_path / "scaled", corpus_files, *base, "--stage-lr", "3,0.5") == 0
    plain, scaled = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("plain", "scaled"))
    assert [r["stage"] for r in scaled] == [0] * 6 + [1] * 4
    for a, b in zip(plain, scaled):
        assert b["lr"] == pytest.approx(a["lr"] * (3 if a["stage"] == 0 else 0.5), rel=1e-9)
    assert scaled[0]["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=1e-6)  # same data, same init
    assert scaled[-1]["train_loss"] != pytest.approx(plain[-1]["train_loss"], rel=1e-6)


def test_plan_line_predicts_stages_and_flops(tmp_path, corpus_files, caplog):
    """The 'plan:' line a new run logs gives the target's parameters, tokens per parameter, each stage's steps
    and the FLOPs as a fraction of full-depth training: what the run then measures against a scratch run."""
    import logging
    import re

    common = ("--n-layer", "4", "--steps", "10", "--eval-every", "10")
    with caplog.at_level(logging.INFO, logger="apollo_lm"):
        assert _train(tmp_path / "stack", corpus_files, *common, "--method", "stack", "--stages", "1,2,4",
                      "--grow-at", "0.2,0.5") == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="apollo_lm"):
        assert _train(tmp_path / "scratch", corpus_files, *common) == 0
    scratch_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    assert "blocks for steps" not in scratch_line  # nothing to plan for scratch but its size and budget
    assert "1 block for steps 0-1, 2 blocks for steps 2-4, 4 blocks for steps 5-9" in line
    # 4 blocks of 32 hidden (12 d^2 + 13 d weights each) + 300 x 32 tied embeddings + 32 x 32 positions + ln_f
    params = 4 * (12 * 32 * 32 + 13 * 32) + 300 * 32 + 32 * 32 + 2 * 32
    assert f"{params / 1e6:.3g}M parameters" in line
    assert f"1.28e+03 tokens, {1280 / params:.2g} per parameter" in line
    flops = {d: read_metrics(tmp_path / d / "metrics.jsonl")[-1]["flops"] for d in ("stack", "scratch")}
    planned = float(re.search(r": ([0-9.]+) % of the FLOPs", line).group(1))
    assert planned == pytest.approx(100 * flops["stack"] / flops["scratch"], abs=0.06)


def test_stacking_points_follow_the_budget(tmp_path, corpus_files, caplog):
    """Three stacking stages without --grow-at grow at 20/50 % up to five training tokens per parameter (three for
    Llama) and at 10/30 % beyond; BERT past two warns; the chosen points are saved in config.json (a resume reads
    them from there); given points are kept."""
    import logging

    from apollo_lm.cli import build_config, build_parser
    from apollo_lm.config import STACK_LONG_BUDGET_TPP, stack_grow_at_for_budget
    from apollo_lm.train.loop import start_run

    assert stack_grow_at_for_budget(STACK_LONG_BUDGET_TPP["gpt"]) == [0.2, 0.5]
    assert stack_grow_at_for_budget(7.5) == [0.1, 0.3]
    train, valid = corpus_files

    def grow_at(name, *extra):
        argv = ["train", "--data", str(train), "--valid", str(valid), "--out", str(tmp_path / name), *TINY,
                "--n-layer", "4", "--method", "stack", "--stages", "1,2,4", *extra]
        trainer = start_run(build_config(build_parser().parse_args(argv)), tmp_path / name)  # set up, not trained
        return json.loads((tmp_path / name / "config.json").read_text())["grow_at"], trainer.plan()["params"]

    # 4 blocks of 32 hidden and a 300-token vocabulary: about 61k parameters, 128 tokens a step
    with caplog.at_level(logging.INFO, logger="apollo_lm"):
        points, n_params = grow_at("long", "--tokens", "1M")
    assert points == "0.1,0.3"
    assert any(r.getMessage().startswith(f"growth points 0.1,0.3 for {1e6 / n_params:.2g} tokens per parameter")
               for r in caplog.records)
    steps = int(4 * n_params / 128)  # four tokens per parameter: the longest budget 20/50 % was measured to win at
    assert grow_at("short", "--steps", str(steps))[0] == "0.2,0.5"
    assert grow_at("given", "--tokens", "1M", "--grow-at", "0.2,0.5")[0] == "0.2,0.5"
    # a FLOPs budget counts the tokens that training at full depth would take (about 6 FLOPs per parameter each)
    assert grow_at("flops-short", "--flops", f"{6 * 2 * n_params ** 2:.6g}")[0] == "0.2,0.5"
    assert grow_at("flops-long", "--flops", f"{6 * 10 * n_params ** 2:.6g}")[0] == "0.1,0.3"
    # Llama: 20/50 % reached scratch at one and two tokens per parameter but not at 3.0 or reliably at 3.7, where
    # 10/30 % did, so its threshold is 2.5 tokens per parameter; BERT keeps GPT's five but warns past two
    assert stack_grow_at_for_budget(2.0, "llama") == [0.2, 0.5]
    assert stack_grow_at_for_budget(3.0, "llama") == [0.1, 0.3]
    assert stack_grow_at_for_budget(3.5) == stack_grow_at_for_budget(3.5, "bert") == [0.2, 0.5]
    three = str(int(3 * n_params / 128))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="apollo_lm"):
        assert grow_at("gpt-3", "--steps", three)[0] == "0.2,0.5"
        points, n_llama = grow_at("llama-1", "--model", "llama", "--steps", "200")
        assert points == "0.2,0.5"
        assert grow_at("llama-2", "--model", "llama", "--steps", str(int(2 * n_llama / 128)))[0] == "0.2,0.5"
        assert grow_at("llama-3", "--model", "llama", "--steps", str(int(3 * n_llama / 128)))[0] == "0.1,0.3"
        assert grow_at("bert-1", "--model", "bert", "--steps", "200")[0] == "0.2,0.5"
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert grow_at("bert-3", "--model", "bert", "--steps", three)[0] == "0.2,0.5"
    assert any("of a llama model grow at 0.2,0.5 up to 2.5 tokens per parameter" in r.getMessage()
               for r in caplog.records)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "bert family" in warned[0] and "--method scratch" in warned[0]
