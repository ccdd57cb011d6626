"""bench/probe_context.py: its attention replacements compute what they claim, on a real (tiny) trained run."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from .conftest import TINY, run_cli


def _bench():
    path = Path(__file__).parents[1] / "bench" / "probe_context.py"
    spec = importlib.util.spec_from_file_location("bench_probe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_weights_match_sdpa_and_replacements():
    bench = _bench()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    for mask, causal in ((None, False), (None, True), (keep, False)):
        w = bench._weights(q, k, mask, causal)
        assert torch.allclose(w.sum(-1), torch.ones(2, 3, 5))
        assert torch.allclose(w @ v, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal),
                              atol=1e-6)
    with bench.attention("self"):
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), v)
    with bench.attention("uniform"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        assert torch.allclose(out[0], v[0, :, :3].mean(1, keepdim=True).expand(3, 5, 4), atol=1e-6)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert torch.allclose(causal[:, :, 2], v[:, :, :3].mean(2), atol=1e-6)  # position 2 averages 0..2
    assert F.scaled_dot_product_attention is bench._SDPA  # restored on exit


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_probe_reproduces_the_run_loss(tmp_path, corpus_files, family):
    bench = _bench()
    train, valid = corpus_files
    run = tmp_path / family
    assert run_cli("train", "--data", str(train), "--valid", str(valid), "--out", str(run), "--model", family,
                   "--steps", "12", "--eval-every", "12", *TINY) == 0
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line][-1]
    out_json = tmp_path / "probe.json"
    assert bench.main([str(run), "--json", str(out_json)]) == 0
    (r,) = json.loads(out_json.read_text())
    # the same fixed validation batches as training's evaluation
    assert r["loss"] == pytest.approx(last["val_loss"], abs=1e-5)
    assert len(r["layers"]) == 2 and r["heads"] == 4
    assert 0 < r["min_entropy"] <= r["mean_entropy"] <= math.log(32) + 1e-5
    assert 0 < r["max_neighbour_share"] <= 1
    assert r["unigram"] > 0 and r["uniform"] > 0 and r["self"] > 0
    assert r["self"] != pytest.approx(r["loss"], abs=1e-6)  # the replacement took effect
