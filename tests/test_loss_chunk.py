"""The chunked output layer + cross-entropy (--loss-chunk) against the plain one: same loss, same gradients."""

import pytest
import torch

from apollo_lm.config import ModelConfig, RunConfig, UserError
from apollo_lm.models import build_model
from apollo_lm.models.loss import head_and_loss
from apollo_lm.train.metrics import read_metrics

from .conftest import TINY, run_cli


def _loss_and_grads(model, x, y, chunk, **kw):
    model.zero_grad(set_to_none=True)
    logits, loss = model(x, y, loss_chunk=chunk, **kw)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["gpt", "bert", "llama"])
def test_chunked_loss_matches_plain(family):
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, n_layer=2, n_embd=32, n_head=4, vocab_size=97, block_size=16)
    model = build_model(cfg)
    x = torch.randint(0, 97, (3, 16))
    y = torch.randint(0, 97, (3, 16))
    y[0, :5] = -100  # unscored positions (BERT's unmasked tokens) must count in neither sum nor mean
    y[2, 7] = -100
    lmap = [0, 1, 1, 0] if family != "bert" else None  # through a layer map too (weight sharing)
    logits, plain, g_plain = _loss_and_grads(model, x, y, 0, layer_map=lmap)
    assert logits is not None
    for chunk in (7, 48, 1000):  # not dividing the 48 positions, dividing them, larger than all
        none, chunked, g_chunked = _loss_and_grads(model, x, y, chunk, layer_map=lmap)
        assert none is None  # the point: no full logits tensor
        torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
        assert g_chunked.keys() == g_plain.keys()
        for name in g_plain:
            torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_with_bias_no_grad_and_bf16():
    torch.manual_seed(1)
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    y = torch.randint(0, 50, (2, 9))
    _, plain = head_and_loss(h, w, b, y, 0)
    gp = torch.autograd.grad(plain, (h, w, b))
    _, chunked = head_and_loss(h, w, b, y, 4)
    gc = torch.autograd.grad(chunked, (h, w, b))
    torch.testing.assert_close(chunked, plain)
    for a, c in zip(gp, gc):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation-style use: the loss only
        torch.testing.assert_close(head_and_loss(h, w, b, y, 4)[1], plain.detach())
    # under bf16 autocast the matmuls run in bf16 on both paths and the softmax in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain16 = head_and_loss(h, w, b, y, 0)
        _, chunked16 = head_and_loss(h, w, b, y, 5)
    gp16 = torch.autograd.grad(plain16, (h, w, b))
    gc16 = torch.autograd.grad(chunked16, (h, w, b))
    assert chunked16.dtype == torch.float32
    torch.testing.assert_close(chunked16, plain16, rtol=1e-3, atol=1e-3)
    for a, c in zip(gp16, gc16):
        assert c.dtype == a.dtype
        torch.testing.assert_close(c, a, rtol=2e-2, atol=2e-3)


def test_training_with_loss_chunk_matches_plain(tmp_path, corpus_files):
    train, valid = corpus_files
    common = ["train", "--data", str(train), "--valid", str(valid), *TINY, "--steps", "8", "--eval-every", "4",
              "--method", "apollo", "--n-layer", "4", "--stages", "2,4", "--grow-at", "0.5"]
    assert run_cli(*common, "--out", str(tmp_path / "plain")) == 0
    assert run_cli(*common, "--out", str(tmp_path / "chunked"), "--loss-chunk", "50") == 0
    a = read_metrics(tmp_path / "plain" / "metrics.jsonl")
    b = read_metrics(tmp_path / "chunked" / "metrics.jsonl")
    assert [r["depth"] for r in a] == [r["depth"] for r in b] and len(a) == 8
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], abs=2e-4)
        assert rb["flops"] == ra["flops"]
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], abs=2e-4)


def test_loss_chunk_must_not_be_negative():
    with pytest.raises(UserError, match="--loss-chunk"):
        RunConfig(loss_chunk=-1).validate()


def test_chunked_loss_does_the_same_matmul_flops():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(ModelConfig(family="gpt", n_layer=2, n_embd=32, n_head=4, vocab_size=97, block_size=16))
    x = torch.randint(0, 97, (2, 16))
    counts = []
    for chunk in (0, 10):
        with FlopCounterMode(display=False) as fc:
            model(x, x, loss_chunk=chunk)[1].backward()
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] > 0  # the same three output-layer matmuls, done in forward instead of backward
