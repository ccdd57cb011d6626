"""Shared fixtures: a small real-English corpus (Python's own docs), an isolated token cache, tiny options."""

from __future__ import annotations

import json

import pytest
import torch

from apollo_lm.data.readers import default_corpus

torch.set_num_threads(2)

# options for a model and run that train in about a second on a laptop CPU
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--vocab-size", "300",
        "--batch-size", "4", "--eval-batches", "2", "--no-progress", "--warmup", "0.1", "--method", "scratch"]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """The test session gets its own token cache so tests never see a user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("APOLLO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return default_corpus()


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory, docs):
    """A training JSON Lines file and a validation text file of real English prose (shared: tokenized once)."""
    tmp_path = tmp_path_factory.mktemp("corpus")
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": d}) for d in docs[:1500]))
    valid = tmp_path / "valid.txt"
    valid.write_text("\n\n".join(docs[1500:1700]))
    return train, valid


def run_cli(*args: str) -> int:
    from apollo_lm.cli import main

    return main(list(args))
