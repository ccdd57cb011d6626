"""Never lose a run: DDP equals one process, SIGKILL at any moment resumes exactly, failed checkpoint writes
keep the previous checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from apollo_lm.train.checkpoint import checkpoint_dirs
from apollo_lm.train.metrics import read_metrics

from .conftest import TINY, run_cli

GROWTH = ("--n-layer", "4", "--method", "apollo", "--stages", "1,2,4", "--grow-at", "0.25,0.5")


def _cmd(corpus_files, out, *extra):
    train, valid = corpus_files
    return ["train", "--data", str(train), "--valid", str(valid), "--out", str(out), *TINY, *extra]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_equal_one(tmp_path, corpus_files):
    """2 gloo ranks with batch B equal 1 process with 2 micro-batches of B: same depths, losses, growth (with the
    own-depth pass on deep draws, whose gradients are reduced once with the deep pass's averaged ones)."""
    # the uniform sampler draws deeper than the physical blocks on most early steps, which the own-depth pass needs
    args = ("--steps", "8", "--eval-every", "4", "--threads", "1", *GROWTH, "--sampler", "us", "--own-depth-weight",
            "0.5")
    assert run_cli(*_cmd(corpus_files, tmp_path / "one", *args, "--grad-accum", "2")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), "-m", "apollo_lm",
                        *_cmd(corpus_files, tmp_path / "two", *args)], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [x["n_blocks"] for x in two] == [1, 1, 2, 2, 4, 4, 4, 4]
    assert any("own_depth_loss" in x for x in one)  # some steps were drawn deeper than the physical blocks
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert (a["depth"], a["tokens"], a["flops"]) == (b["depth"], b["tokens"], b["flops"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), abs=1e-5)
    ck = json.loads((checkpoint_dirs(tmp_path / "two")[-1] / "state.json").read_text())
    assert ck["world_size"] == 2
    # resuming a 2-process run in one process is refused with the fix
    shutil.rmtree(checkpoint_dirs(tmp_path / "two")[-1])
    assert run_cli("train", "--resume", str(tmp_path / "two")) == 2


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, corpus_files):
    args = ("--steps", "40", "--eval-every", "5", "--save-every", "3", *GROWTH)
    assert run_cli(*_cmd(corpus_files, tmp_path / "full", *args)) == 0
    proc = subprocess.Popen([sys.executable, "-m", "apollo_lm", *_cmd(corpus_files, tmp_path / "killed", *args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(read_metrics(metrics)) < 17):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(read_metrics(metrics)) < 40, "the run finished before it could be killed"
    assert run_cli("train", "--resume", str(tmp_path / "killed"), "--no-progress") == 0
    full, resumed = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(metrics)
    # the killed run's first part came from another process, whose CPU kernels may round differently in the
    # last bits: exact in steps, depths, FLOPs and schedule, and equal losses to float32 precision
    assert len(full) == len(resumed)
    for a, b in zip(full, resumed):
        assert (a["step"], a["depth"], a["n_blocks"], a["flops"], a["lr"]) == \
            (b["step"], b["depth"], b["n_blocks"], b["flops"], b["lr"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))


def test_sigterm_writes_a_checkpoint(tmp_path, corpus_files):
    proc = subprocess.Popen([sys.executable, "-m", "apollo_lm", *_cmd(corpus_files, tmp_path / "t", "--steps",
                                                                        "100000", "--save-every", "100000")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(read_metrics(metrics)) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "SIGTERM" in err
    step = read_metrics(metrics)[-1]["step"]
    assert checkpoint_dirs(tmp_path / "t")[-1].name == f"step_{step:08d}"


def test_failed_checkpoint_write_keeps_the_previous(tmp_path, corpus_files, monkeypatch, capsys):
    from apollo_lm.train import checkpoint as ck

    real = ck.save_file
    calls = {"n": 0}

    def disk_full(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (model + optimizer files) succeeds, the second fails
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", disk_full)
    assert run_cli(*_cmd(corpus_files, tmp_path / "full", "--steps", "6", "--save-every", "3")) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step_00000003" in err
    assert [p.name for p in checkpoint_dirs(tmp_path / "full")] == ["step_00000003"]
    assert not list((tmp_path / "full" / "checkpoints").glob(".tmp-*"))


def test_output_to_a_closed_pipe_exits_quietly():
    """`apollo depths ... | head -1`: when the reader has gone, the command stops without a traceback (exit 141,
    as a tool killed by SIGPIPE reports in the shell)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        r = subprocess.run([sys.executable, "-m", "apollo_lm", "depths", "--blocks", "3", "--depth", "12", "--draws",
                            "1000"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
