"""``--parallel fsdp`` (FSDP2): 2 gloo processes on the CPU equal 1 process with 2 micro-batches, through growth
points, with Apollo's weight sharing (one block run at several depths in one forward) and with staged width and
depth growth; their DCP checkpoints (each rank writes its own shards) resume and are read by eval, export and a
DDP resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from apollo_lm.config import RunConfig
from apollo_lm.errors import UserError
from apollo_lm.train.checkpoint import checkpoint_dirs, latest_checkpoint, read_checkpoint
from apollo_lm.train.metrics import read_metrics

from safetensors.torch import load_file

from .conftest import run_cli
from .test_robust import GROWTH, _cmd

needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
CPU = ("--device", "cpu", "--threads", "1")


def _torchrun(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + (os.getpid() + 500) % 1000), "-m", "apollo_lm", *args], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]


def _same_metrics(one, two, loss_tol=1e-5, norm_tol=1e-4):
    """Equal depths, schedule and (within the tolerance) losses and gradient norms."""
    a_rows, b_rows = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in b_rows] == [r["step"] for r in a_rows]  # one line per step: rank 0 writes
    for a, b in zip(a_rows, b_rows):
        assert (a["depth"], a["n_blocks"], a["tokens"], a["flops"], a["lr"]) == \
            (b["depth"], b["n_blocks"], b["tokens"], b["flops"], b["lr"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=loss_tol)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=norm_tol)
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), abs=loss_tol)
    return a_rows, b_rows


def _same_run(one, two):
    """Equal metrics and equal final weights and AdamW state."""
    a_rows, b_rows = _same_metrics(one, two)
    ca, cb = read_checkpoint(checkpoint_dirs(one)[-1]), read_checkpoint(checkpoint_dirs(two)[-1])
    assert ca["model_config"] == cb["model_config"]
    for what in ("weights", "optimizer"):
        assert set(ca[what]) == set(cb[what])
        for k, v in ca[what].items():
            assert v.shape == cb[what][k].shape, k
            torch.testing.assert_close(cb[what][k], v, atol=2e-5, rtol=1e-4, msg=f"{what} {k}")
    return a_rows, b_rows


@needs_dist
def test_fsdp_apollo_two_processes_equal_one(tmp_path, corpus_files):
    """Weight sharing under FSDP: depths drawn above the physical block count reuse blocks in one forward;
    3 validation batches do not split evenly over 2 ranks (the rank with fewer runs an uncounted forward)."""
    args = ("--steps", "8", "--eval-every", "4", "--save-every", "4", "--eval-batches", "3", *CPU,
            *GROWTH, "--sampler", "us")  # uniform depths n..4: blocks run at several depths in most steps
    assert run_cli(*_cmd(corpus_files, tmp_path / "one", *args, "--grad-accum", "2")) == 0
    _torchrun(*_cmd(corpus_files, tmp_path / "two", *args, "--parallel", "fsdp"))
    _, rows = _same_run(tmp_path / "one", tmp_path / "two")
    assert [r["n_blocks"] for r in rows] == [1, 1, 2, 2, 4, 4, 4, 4]
    assert any(r["depth"] > r["n_blocks"] for r in rows), "no step shared a block across depths"
    last = checkpoint_dirs(tmp_path / "two")[-1]
    ck = read_checkpoint(last)  # whole tensors from the shards, without a process group (as _same_run did)
    assert ck["state"]["world_size"] == 2 and ck["config"]["parallel"] == "fsdp"
    assert ck["format"] == ck["state"]["checkpoint_format"] == "dcp"
    assert (last / "dcp" / ".metadata").is_file() and len(list((last / "dcp").glob("*.distcp"))) == 2
    assert not (last / "model.safetensors").exists() and not (last / "optimizer.safetensors").exists()
    assert not list((tmp_path / "two" / "checkpoints").glob(".tmp-*"))
    # resume from step 4: every rank loads its shards of the weights and AdamW state; the same end
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(checkpoint_dirs(tmp_path / "resumed")[-1])
    # a checkpoint killed before state.json was written is never resumed from (it is rewritten)
    shutil.copytree(checkpoint_dirs(tmp_path / "two")[-1], tmp_path / "resumed" / "checkpoints" / ".tmp-step_00000008")
    (tmp_path / "resumed" / "checkpoints" / ".tmp-step_00000008" / "state.json").unlink()
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000004"
    _torchrun("train", "--resume", str(tmp_path / "resumed"))
    _same_run(tmp_path / "two", tmp_path / "resumed")


@needs_dist
def test_fsdp_dcp_checkpoint_read_by_eval_export_and_ddp(tmp_path, corpus_files, capsys):
    """An FSDP run's DCP checkpoint, read without a process group: apollo eval and apollo export give what they
    give on the same single-process run; a resume with --parallel ddp loads it whole and ends the same."""
    args = ("--steps", "4", "--save-every", "2", "--eval-every", "4", *CPU, *GROWTH)
    assert run_cli(*_cmd(corpus_files, tmp_path / "one", *args, "--grad-accum", "2")) == 0
    _torchrun(*_cmd(corpus_files, tmp_path / "two", *args, "--parallel", "fsdp"))
    assert read_checkpoint(checkpoint_dirs(tmp_path / "two")[-1])["format"] == "dcp"
    capsys.readouterr()
    res = {}
    for run in ("one", "two"):
        assert run_cli("eval", str(tmp_path / run), "--data", str(corpus_files[1]), "--json") == 0
        res[run] = json.loads(capsys.readouterr().out)
        assert run_cli("export", str(tmp_path / run), "--to", str(tmp_path / f"hf-{run}")) == 0
        capsys.readouterr()
    assert res["two"]["loss"] == pytest.approx(res["one"]["loss"], abs=1e-5)
    assert res["two"]["tokens"] == res["one"]["tokens"]
    a, b = load_file(tmp_path / "hf-one" / "model.safetensors"), load_file(tmp_path / "hf-two" / "model.safetensors")
    assert set(a) == set(b)
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, atol=2e-5, rtol=1e-4, msg=k)
    # --parallel ddp may resume it: the whole weights and AdamW state, read from the shards
    shutil.copytree(tmp_path / "two", tmp_path / "ddp")
    shutil.rmtree(checkpoint_dirs(tmp_path / "ddp")[-1])
    _torchrun("train", "--resume", str(tmp_path / "ddp"), "--parallel", "ddp")
    _same_run(tmp_path / "two", tmp_path / "ddp")
    assert read_checkpoint(checkpoint_dirs(tmp_path / "ddp")[-1])["format"] == "full"


@needs_dist
def test_fsdp_staged_width_and_depth_two_processes_equal_one(tmp_path, corpus_files):
    """Operator growth under FSDP: the gathered weights and AdamW moments are widened and deepened, then every
    rank shards the grown model and its optimizer state again."""
    args = ("--steps", "8", "--eval-every", "4", "--save-every", "8", *CPU, "--n-layer", "4",
            "--method", "staged", "--stages", "width:16->32@0.25, depth:2->4@0.5")
    assert run_cli(*_cmd(corpus_files, tmp_path / "one", *args, "--grad-accum", "2")) == 0
    _torchrun(*_cmd(corpus_files, tmp_path / "two", *args, "--parallel", "fsdp"))
    _, rows = _same_run(tmp_path / "one", tmp_path / "two")
    assert [(r["n_embd"], r["n_blocks"]) for r in rows] == [(16, 2)] * 2 + [(32, 2)] * 2 + [(32, 4)] * 4


@needs_dist
def test_fsdp_bf16_mixed_precision_matches_autocast(tmp_path, corpus_files):
    """--dtype bf16 under FSDP computes with FSDP2's bf16 parameters on fp32 master weights (here on the CPU,
    as on GPUs); one process uses bf16 autocast instead: the same run to bf16 precision, fp32 checkpoints."""
    args = ("--steps", "4", "--eval-every", "4", *CPU, "--dtype", "bf16", "--model", "llama", "--method", "apollo",
            "--stages", "1,2", "--grow-at", "0.5", "--sampler", "us")
    assert run_cli(*_cmd(corpus_files, tmp_path / "one", *args, "--grad-accum", "2")) == 0
    # --checkpoint-format full: the whole tensors gathered into the single-process files
    _torchrun(*_cmd(corpus_files, tmp_path / "two", *args, "--parallel", "fsdp", "--checkpoint-format", "full"))
    _same_metrics(tmp_path / "one", tmp_path / "two", loss_tol=2e-2, norm_tol=5e-2)
    last = checkpoint_dirs(tmp_path / "two")[-1]
    ck = read_checkpoint(last)
    assert ck["format"] == "full" and (last / "model.safetensors").is_file() and not (last / "dcp").exists()
    assert {v.dtype for v in ck["weights"].values()} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_fsdp_nccl_bf16_compiled_blocks(tmp_path, corpus_files):
    """On 2 GPUs: NCCL, bf16 mixed precision and blocks compiled before sharding, through Apollo's growth."""
    args = ("--steps", "8", "--eval-every", "4", "--device", "cuda", "--dtype", "bf16", "--compile", *GROWTH,
            "--sampler", "us")
    assert run_cli(*_cmd(corpus_files, tmp_path / "one", *args, "--grad-accum", "2")) == 0
    _torchrun(*_cmd(corpus_files, tmp_path / "two", *args, "--parallel", "fsdp"))
    _same_metrics(tmp_path / "one", tmp_path / "two", loss_tol=3e-2, norm_tol=1e-1)


def test_parallel_option():
    assert RunConfig().parallel == "ddp"
    with pytest.raises(UserError, match="choose ddp"):
        RunConfig(parallel="zero3").validate()
    assert RunConfig().checkpoint_format == "dcp"
    with pytest.raises(UserError, match="choose dcp"):
        RunConfig(checkpoint_format="zip").validate()
