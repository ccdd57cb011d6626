"""apollo train --init-from: continue or grow a transformers checkpoint."""

import pytest
import torch

from apollo_lm.train.checkpoint import checkpoint_dirs, read_checkpoint
from apollo_lm.train.metrics import read_metrics

from .conftest import TINY, run_cli


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus_files):
    base = tmp_path_factory.mktemp("hf")
    train, valid = corpus_files
    assert run_cli("train", "--data", str(train), "--valid", str(valid), "--out", str(base / "run"), *TINY,
                   "--steps", "6") == 0
    assert run_cli("export", str(base / "run"), "--to", str(base / "hf")) == 0
    return base


def test_continue_training_from_hf(tmp_path, corpus_files, exported):
    train, valid = corpus_files
    out = tmp_path / "cont"
    # no model options: architecture, sequence length and tokenizer come from the checkpoint
    assert run_cli("train", "--data", str(train), "--valid", str(valid), "--out", str(out), "--init-from",
                   str(exported / "hf"), "--method", "scratch", "--steps", "1", "--lr", "1e-12", "--warmup", "0",
                   "--no-progress",
                   "--batch-size", "4", "--eval-batches", "1") == 0
    before = read_checkpoint(checkpoint_dirs(exported / "run")[-1])["weights"]
    after = read_checkpoint(checkpoint_dirs(out)[-1])["weights"]
    assert set(before) == set(after)
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-6, rtol=0)
    from tokenizers import Tokenizer

    text = "Exceptions are raised when an error is detected."
    ours, theirs = (Tokenizer.from_file(str(p / "tokenizer.json")) for p in (out, exported / "run"))
    assert ours.encode(text).ids == theirs.encode(text).ids and ours.get_vocab() == theirs.get_vocab()


def test_grow_a_shallow_hf_model(tmp_path, corpus_files, exported, capsys):
    train, valid = corpus_files
    common = ("--data", str(train), "--valid", str(valid), "--init-from", str(exported / "hf"), "--n-layer", "4",
              "--steps", "8", "--no-progress", "--batch-size", "4", "--eval-batches", "1")
    assert run_cli("train", *common, "--out", str(tmp_path / "g"), "--method", "progressive", "--stages", "2,4",
                   "--grow-at", "0.5") == 0
    rows = read_metrics(tmp_path / "g" / "metrics.jsonl")
    assert [r["n_blocks"] for r in rows] == [2] * 4 + [4] * 4
    capsys.readouterr()
    assert run_cli("train", *common, "--out", str(tmp_path / "bad"), "--method", "progressive") == 2
    assert "has 2 layers but this run's first stage has 1" in capsys.readouterr().err
    assert run_cli("train", "--init-from", str(tmp_path), "--out", str(tmp_path / "x")) == 2
    assert "no config.json" in capsys.readouterr().err
