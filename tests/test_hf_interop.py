"""Hugging Face interop: exported directories load with ``AutoModelFor...``/``AutoTokenizer`` and give
apollo's logits (fp32, atol 1e-4); imported HF checkpoints give the HF logits; a run mid-way through growth
exports at its target depth; bad input is a one-line error."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from apollo_lm.config import ModelConfig
from apollo_lm.data.tokenizer import train_tokenizer
from apollo_lm.errors import UserError
from apollo_lm.eval.evaluate import load_run
from apollo_lm.interop.hf import export_model, hf_config, hf_model_class, import_hf, init_weights_from_hf
from apollo_lm.models import build_model
from apollo_lm.train.checkpoint import checkpoint_dirs, load_model_state, read_checkpoint

from .conftest import TINY, run_cli

FAMILIES = {"gpt": {}, "bert": {}, "llama": {"n_kv_head": 2, "tie_embeddings": False}, "llama-tied": {}}
ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizers(docs):
    return {f: train_tokenizer(docs[:300], f, 300) for f in ("gpt", "bert")}


def _family(name):
    return name.split("-")[0]


def tiny_model(name, tokenizer, n_layer=2):
    """A tiny model with every weight perturbed, so norms and biases are not trivially 1 and 0."""
    family = _family(name)
    cfg = ModelConfig(family=family, n_layer=n_layer, n_embd=32, n_head=4, vocab_size=tokenizer.get_vocab_size(),
                      block_size=64, **FAMILIES[name])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg


def _auto(family):
    return AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_logits_match(name, tokenizers, tmp_path):
    family = _family(name)
    tok = tokenizers["bert" if family == "bert" else "gpt"]
    model, cfg = tiny_model(name, tok)
    out = export_model(model, cfg, tok, tmp_path / "hf")
    hf = _auto(family).from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"gpt": "GPT2LMHeadModel", "bert": "BertForMaskedLM",
                                 "llama": "LlamaForCausalLM"}[family]
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "The quick brown fox jumps over the lazy dog."
    enc = hf_tok(text, return_tensors="pt")
    ours_ids = tok.encode(text).ids  # apollo's tokenizer, with its post-processor ([CLS] ... [SEP] for BERT)
    assert enc.input_ids[0].tolist() == ours_ids
    idx = enc.input_ids
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=ATOL, rtol=0)
        if family == "bert":  # padding and segments mean the same on both sides
            pair = hf_tok(["a short one", "a rather longer second sentence"], ["and b", "b"], padding=True,
                          return_tensors="pt")
            assert pair.attention_mask.min() == 0 and pair.token_type_ids.max() == 1
            theirs = hf(**pair).logits
            ours = model(pair.input_ids, token_type_ids=pair.token_type_ids, attention_mask=pair.attention_mask)[0]
            keep = pair.attention_mask.bool()
            torch.testing.assert_close(theirs[keep], ours[keep], atol=ATOL, rtol=0)
    if family == "bert":
        assert (hf_tok.cls_token, hf_tok.mask_token, hf_tok.pad_token_id) == ("[CLS]", "[MASK]", 0)
    else:
        assert hf_tok.eos_token == "<|endoftext|>" and hf.config.eos_token_id == tok.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_logits_match(name, tokenizers, tmp_path):
    """A checkpoint written by transformers itself (its own random init) imports with equal logits, and
    exporting the import gives the same tensors back."""
    family = _family(name)
    tok = tokenizers["bert" if family == "bert" else "gpt"]
    _, cfg = tiny_model(name, tok, n_layer=3)
    torch.manual_seed(1)
    hf = hf_model_class(family)(hf_config(cfg, tok)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "src")
    tok.save(str(tmp_path / "src" / "tokenizer.json"))
    model, mcfg, tok2 = import_hf(tmp_path / "src")
    assert mcfg == cfg and tok2.get_vocab() == tok.get_vocab()
    idx = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=ATOL, rtol=0)
    back = export_model(model, mcfg, tok2, tmp_path / "back")
    again = _auto(family).from_pretrained(back, dtype=torch.float32)
    theirs = hf.state_dict()
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=0)


def test_import_real_world_gpt2_layout(tmp_path, tokenizers):
    """A GPT-2 config with transformers' defaults (n_inner None, 1024 positions, dropouts) imports."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizers["gpt"]
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    model, mcfg, _ = import_hf(tmp_path)
    assert (mcfg.block_size, mcfg.mlp_ratio, model.training) == (1024, 4, False)


def test_init_weights_from_hf_for_a_deeper_run(tmp_path, tokenizers):
    """A 2-layer checkpoint seeds a 4-layer run's first stage (bert2BERT-style growth); shapes must agree."""
    tok = tokenizers["bert"]
    model, cfg = tiny_model("bert", tok)
    export_model(model, cfg, tok, tmp_path / "hf")
    deeper = ModelConfig(**{**cfg.to_dict(), "n_layer": 4, "block_size": 16})
    sd = init_weights_from_hf(tmp_path / "hf", deeper)
    assert {k.split(".")[1] for k in sd if k.startswith("blocks.")} == {"0", "1"}
    assert sd["position_embeddings.weight"].shape == (16, 32)
    grown = build_model(deeper, n_blocks=2)
    grown.load_state_dict(sd)
    wider = ModelConfig(**{**cfg.to_dict(), "n_embd": 64})
    with pytest.raises(UserError, match="n_embd 32 \\(run: 64\\)"):
        init_weights_from_hf(tmp_path / "hf", wider)


@pytest.mark.parametrize("repeat_scale", ["none", "uses"])
def test_export_mid_sampling_run_at_target_depth(tmp_path, corpus_files, caplog, capsys, repeat_scale):
    """A run stopped in its first stage (2 physical blocks, target depth 4) exports as a 4-layer model
    whose logits equal apollo's model run through the target-depth layer map (with --repeat-scale uses, each
    repeat at 1/uses strength: the copies' output projections divided by their number)."""
    train, valid = corpus_files
    run = tmp_path / "run"
    assert run_cli("train", *TINY, "--n-layer", "4", "--method", "apollo", "--stages", "2,4", "--grow-at", "0.5",
                   "--steps", "4", "--stop-after", "1", "--data", str(train), "--valid", str(valid),
                   "--out", str(run), "--repeat-scale", repeat_scale) == 0
    loaded = load_run(run)
    if repeat_scale == "uses":  # loaded as the plain 4-layer model it equals
        assert loaded.n_blocks == 2 and loaded.target_map is None and loaded.grown_from == [0, 0, 1, 1]
        small = build_model(loaded.mcfg, 2).eval()
        load_model_state(small, read_checkpoint(checkpoint_dirs(run)[-1])["weights"])
        idx = torch.randint(0, loaded.mcfg.vocab_size, (2, 32))
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(idx)[0], small(idx, layer_map=[0, 0, 1, 1],
                                                                   branch_scale=[0.5] * 4)[0])
    else:
        assert loaded.n_blocks == 2 and loaded.target_map == [0, 0, 1, 1]
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_cli("export", str(run), "--to", str(tmp_path / "hf")) == 0
    assert "mid-way through growth" in caplog.text and "[0, 0, 1, 1]" in caplog.text
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.n_layer == 4
    meta = json.loads((tmp_path / "hf" / "apollo_export.json").read_text())
    assert meta["materialized_layer_map"] == [0, 0, 1, 1] and meta["physical_blocks"] == 2
    assert meta["repeat_scale"] == repeat_scale
    idx = torch.randint(0, loaded.mcfg.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, loaded.model(idx, layer_map=loaded.target_map)[0], atol=ATOL,
                                   rtol=0)
    # the export was written under a temporary name and renamed: nothing is left behind
    assert not list(tmp_path.glob(".hf.tmp-*"))


def test_export_bad_input(tmp_path, capsys):
    assert run_cli("export", str(tmp_path), "--to", str(tmp_path / "out")) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert run_cli("export", str(tmp_path), "--to", str(tmp_path / "full")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err


def test_import_bad_input(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UserError, match="not supported"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1,
                                                      "n_head": 4, "vocab_size": 50, "activation_function": "relu"}))
    with pytest.raises(UserError, match="activation 'relu'"):
        import_hf(tmp_path)
