"""The Llama-style family: causality, rotary relative positions, GQA as shared key/value heads, the layer-map
forward, growth by copying blocks, analytic FLOPs, and training end to end through the CLI."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from apollo_lm.config import MODEL_FAMILIES, ModelConfig, RunConfig
from apollo_lm.errors import UserError
from apollo_lm.growth.expand import expand_state
from apollo_lm.growth.maps import layer_map
from apollo_lm.models import build_model
from apollo_lm.models.llama import apply_rotary, mlp_hidden_size, rotary_tables
from apollo_lm.train.checkpoint import load_model_state, model_state
from apollo_lm.train.flops import train_step_flops

from .conftest import TINY, run_cli


def tiny(n_layer=3, **kw):
    return ModelConfig(family="llama", n_layer=n_layer, n_embd=32, n_head=4, vocab_size=101, block_size=16, **kw)


def test_registered_and_shapes():
    assert "llama" in MODEL_FAMILIES
    torch.manual_seed(0)
    m = build_model(tiny())
    x, y = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    logits, loss = m(x, y)
    assert logits.shape == (2, 16, 101)
    assert abs(loss.item() - torch.log(torch.tensor(101.0)).item()) < 0.5  # near uniform at init
    assert not any(n.endswith("bias") for n, _ in m.named_parameters())  # no biases anywhere
    assert list(model_state(m)) == [n for n, _ in m.named_parameters()]  # no buffers: growth copies names only
    assert m.lm_head.weight is m.wte.weight
    untied = build_model(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight and "lm_head.weight" in model_state(untied)


def test_causal():
    torch.manual_seed(0)
    m = build_model(tiny()).eval()
    x = torch.randint(0, 101, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 101
    torch.testing.assert_close(m(x)[0][:, :10], m(y)[0][:, :10])
    assert not torch.allclose(m(x)[0][:, 10:], m(y)[0][:, 10:])


def test_rotary_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rotary_tables(12, 8, 10000.0, torch.device("cpu"), torch.float32)

    def score(m, n):
        return (apply_rotary(q, cos[m], sin[m]) * apply_rotary(k, cos[n], sin[n])).sum()

    torch.testing.assert_close(score(5, 2), score(9, 6))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity rotation


def test_grouped_query_attention_equals_repeated_key_value_heads():
    """GQA with 2 key/value heads is multi-head attention whose heads 2j, 2j+1 share key/value weights."""
    torch.manual_seed(0)
    gqa = build_model(tiny(n_kv_head=2)).eval()
    mha = build_model(tiny()).eval()
    sd = model_state(gqa)
    hs = 32 // 4
    for i in range(3):
        for p in ("k_proj", "v_proj"):
            w = sd[f"blocks.{i}.attn.{p}.weight"].view(2, hs, 32)
            sd[f"blocks.{i}.attn.{p}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    load_model_state(mha, sd)
    x = torch.randint(0, 101, (2, 16))
    torch.testing.assert_close(gqa(x)[0], mha(x)[0])
    assert gqa.block_matmul_params() == mha.block_matmul_params() - 2 * 32 * 16


def test_layer_map_forward_and_growth_preserve_function():
    """Expanding n -> n' blocks by the interpolation map (growth.expand) gives the network the smaller
    model ran through that map: growth is function preserving for this family too."""
    torch.manual_seed(0)
    small = build_model(tiny(n_layer=6), n_blocks=3).eval()
    x = torch.randint(0, 101, (2, 16))
    g = layer_map("interpolate", 3, 6)
    before, _ = small(x, layer_map=g)
    big = build_model(tiny(n_layer=6)).eval()
    load_model_state(big, expand_state(model_state(small), 3, 6, "interpolate"))
    torch.testing.assert_close(big(x)[0], before)
    torch.testing.assert_close(small(x, layer_map=[0, 1, 2])[0], small(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("lmap", [None, [0, 0, 1, 2, 2]])
def test_analytic_flops_match_flop_counter(lmap):
    """block_matmul_params counts q, o, GQA-sized k, v and the three SwiGLU matrices (within 5 %)."""
    cfg = ModelConfig(family="llama", n_layer=3, n_embd=64, n_head=4, vocab_size=512, block_size=64, n_kv_head=2)
    m = build_model(cfg)
    B, T = 2, 64
    x = torch.randint(0, 512, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _, loss = m(x, x, layer_map=lmap)
        loss.backward()
    ours = train_step_flops(m, len(lmap) if lmap else 3, T, B * T)
    assert abs(fc.get_total_flops() / ours - 1) < 0.05, (fc.get_total_flops(), ours)
    assert mlp_hidden_size(cfg) == 192  # 2/3 of 4 * 64, a multiple of 32: SwiGLU ~ GPT's MLP in weights


def test_config_validation():
    with pytest.raises(UserError, match="divisor"):
        RunConfig(model="llama", n_head=4, n_kv_head=3).validate()
    with pytest.raises(UserError, match="llama only"):
        RunConfig(model="gpt", n_head=4, n_kv_head=2).validate()
    m = RunConfig(model="llama", n_kv_head=2, tie_embeddings=False).resolved().model_config()
    assert (m.family, m.n_kv_head, m.tie_embeddings) == ("llama", 2, False)


def test_train_llama_with_growth_then_eval(tmp_path, corpus_files, capsys):
    train, valid = corpus_files
    out = tmp_path / "run"
    rc = run_cli("train", *TINY, "--model", "llama", "--n-layer", "4", "--n-kv-head", "1", "--no-tie-embeddings",
                 "--method", "apollo", "--stages", "2,4", "--grow-at", "0.5", "--steps", "4",
                 "--data", str(train), "--valid", str(valid), "--out", str(out))
    assert rc == 0
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["n_blocks"] for r in lines] == [2, 2, 4, 4]
    assert all(r["train_loss"] == r["train_loss"] for r in lines)  # finite, not NaN
    model_json = json.loads(next((out / "checkpoints").iterdir()).joinpath("model.json").read_text())
    assert model_json["family"] == "llama" and model_json["n_kv_head"] == 1 and not model_json["tie_embeddings"]
    capsys.readouterr()
    assert run_cli("eval", str(out), "--data", str(valid), "--json", "--max-tokens", "2000") == 0
    assert json.loads(capsys.readouterr().out)["objective"] == "causal_lm"
