"""Growth operators on the whole training state: what each one preserves, and the exact formulas it follows.

Tiny models (2 blocks, width 16, 2 heads) in fp32 on the CPU; every test takes well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from apollo_lm.config import ModelConfig
from apollo_lm.growth.operators import adapter_for, bert2bert, ligo, staged
from apollo_lm.growth.operators.adapter import random_maps
from apollo_lm.growth.operators.staged import moment_scale
from apollo_lm.models import build_model
from apollo_lm.train.checkpoint import load_model_state, model_state
from apollo_lm.train.optim import build_optimizer, load_named_optimizer_state, named_optimizer_state

VOCAB, T = 50, 12
LR, WD, BETAS = 1e-3, 0.1, (0.9, 0.95)

FAMILIES = {
    "gpt": {},
    "bert": {},
    "llama": {},
    "llama-gqa-untied": {"n_kv_head": 1, "tie_embeddings": False},
}


def tiny(case: str) -> ModelConfig:
    return ModelConfig(family=case.split("-")[0], n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, block_size=16,
                       **FAMILIES[case])


def randomised(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A model whose norms, biases and projections are all non-trivial (gains != 1, biases != 0), so that
    every rule of an operator is exercised, not just the ones a fresh initialisation makes visible."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def grown_model(config: dict, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(ModelConfig.from_dict(config)).eval()
    load_model_state(model, weights)
    return model


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (3, T), generator=g), torch.randint(0, VOCAB, (3, T), generator=g)


def logits(model: torch.nn.Module, seed: int = 123) -> torch.Tensor:
    with torch.no_grad():
        return model(batch(seed)[0])[0]


def clone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


def trained(cfg: ModelConfig, steps: int = 2):
    """A model and its loop optimizer (train/optim.build_optimizer) after a few AdamW steps."""
    model = randomised(cfg).train()
    opt = build_optimizer(model, LR, WD, BETAS, torch.device("cpu"))
    for s in range(steps):
        x, y = batch(s)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


# ------------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("case", FAMILIES)
def test_adapter_describes_every_parameter_and_checks_sizes(case):
    cfg = tiny(case)
    model = build_model(cfg)
    adapter = adapter_for(cfg.to_dict())
    sizes = adapter.kind_sizes(model_state(model), cfg.to_dict())
    assert sizes["hidden"] == 16 and sizes["heads"] == 16
    assert sizes["kv"] == (8 if case == "llama-gqa-untied" else 16)
    residual_out = {n for n in model_state(model) if adapter.spec(n).residual_out}
    assert residual_out and all(n.startswith("blocks.") for n in residual_out)
    with pytest.raises(KeyError, match="no description"):
        adapter.spec("blocks.0.mystery.weight")


def test_growth_code_imports_no_model_file():
    """style.md rule 1: growth reads families through adapters only."""
    root = Path(__file__).resolve().parents[1] / "src" / "apollo_lm" / "growth" / "operators"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "models" not in (node.module or ""), f"{path.name} imports {node.module}"


# ------------------------------------------------------------------------------------------------ staged width
@pytest.mark.parametrize("case", FAMILIES)
def test_staged_width_x2_preserves_logits(case):
    cfg = tiny(case)
    small = randomised(cfg)
    result = staged.widen(model_state(small), {}, cfg.to_dict())
    assert result.config["n_embd"] == 32 and result.config["n_head"] == 4
    if case == "llama-gqa-untied":
        assert result.config["n_kv_head"] == 2
    big = grown_model(result.config, result.weights)
    torch.testing.assert_close(logits(big), logits(small), atol=1e-5, rtol=0)


def test_staged_width_x2_layout_and_adamw_state():
    """Block-diagonal per q/k/v segment; moments /2 and /4 for copies, unscaled for the halved head norm."""
    cfg = tiny("gpt")
    model, opt = trained(cfg)
    w, st = model_state(model), named_optimizer_state(opt, model)
    r = staged.widen(w, st, cfg.to_dict())
    d = 16
    W = w["blocks.0.attn.c_attn.weight"]  # (3d, d): q, k, v
    Wn = r.weights["blocks.0.attn.c_attn.weight"]  # (6d, 2d): q', k', v', each [[W_s, 0], [0, W_s]]
    for s in range(3):
        seg, new = W[s * d:(s + 1) * d], Wn[s * 2 * d:(s + 1) * 2 * d]
        torch.testing.assert_close(new, torch.kron(torch.eye(2), seg), atol=0, rtol=0)
    m = st["blocks.0.mlp.c_fc.weight"]
    mn = r.optimizer_state["blocks.0.mlp.c_fc.weight"]
    torch.testing.assert_close(mn["exp_avg"], torch.kron(torch.eye(2), m["exp_avg"]) / 2, atol=0, rtol=0)
    torch.testing.assert_close(mn["exp_avg_sq"], torch.kron(torch.eye(2), m["exp_avg_sq"]) / 4, atol=0, rtol=0)
    assert float(mn["step"]) == float(m["step"]) == 2.0
    emb = r.optimizer_state["wte.weight"]["exp_avg"]
    torch.testing.assert_close(emb, torch.cat([st["wte.weight"]["exp_avg"]] * 2, dim=1) / 2, atol=0, rtol=0)
    # the head norm is stored halved, receives the full gradient, so its moments are copied unscaled
    torch.testing.assert_close(r.weights["ln_f.weight"], torch.cat([w["ln_f.weight"]] * 2) / 2, atol=0, rtol=0)
    torch.testing.assert_close(r.optimizer_state["ln_f.bias"]["exp_avg_sq"],
                               torch.cat([st["ln_f.bias"]["exp_avg_sq"]] * 2), atol=0, rtol=0)


def _tile_segments(t: torch.Tensor, spec, sizes) -> torch.Tensor:
    """Every block of the grown matrix filled with the source segment (diagonal and off-diagonal alike)."""
    rows = t.split([sizes[k] for k in spec.axes[0].kinds], dim=0)
    return torch.cat([torch.cat([b.tile(2, 2) for b in r.split([sizes[k] for k in spec.axes[1].kinds], dim=1)],
                                dim=1) for r in rows], dim=0)


@pytest.mark.parametrize("case", ["gpt", "bert"])
def test_staged_width_x2_one_adamw_step_matches_grown_step(case):
    """The training-dynamics property, with its exact conditions (see staged.py):

    AdamW (the loop's: weight decay 0.1 on matrices, betas (0.9, 0.95), no clipping), grown after two steps.
    The grown model's eps is the small one's times the moment scale (1/2 for copied weights), the only
    non-homogeneous term of the update. Then after one step on the same batch:
      * every copied entry equals the grown image of the small model's step (weight decay included);
      * off-diagonal blocks (zero, zero moments) take Adam's first step on gradient g/2;
      * the halved head norm moves by the small model's full update.
    """
    cfg = tiny(case)
    model, opt = trained(cfg)
    before_w, before_s = clone(model_state(model)), named_optimizer_state(opt, model)
    before_s = {n: clone(s) for n, s in before_s.items()}
    r = staged.widen(before_w, before_s, cfg.to_dict())
    x, y = batch(2)
    small_loss = model(x, y)[1]
    small_loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    image = staged.widen(model_state(model), {}, cfg.to_dict()).weights

    big = grown_model(r.config, r.weights).train()
    adapter = adapter_for(cfg.to_dict())
    groups = [{"params": [p], "weight_decay": WD if p.dim() >= 2 else 0.0,
               "eps": 1e-8 * moment_scale(adapter.spec(n), 2)} for n, p in big.named_parameters()]
    big_opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    load_named_optimizer_state(big_opt, big, r.optimizer_state)
    big_loss = big(x, y)[1]
    torch.testing.assert_close(big_loss, small_loss, atol=1e-5, rtol=0)  # loss-preserving at the growth point
    big_loss.backward()
    big_opt.step()
    after = model_state(big)

    sizes = adapter.kind_sizes(before_w, cfg.to_dict())
    b1, b2, t = BETAS[0], BETAS[1], 3
    for name, value in after.items():
        spec = adapter.spec(name)
        if spec.role == "head_norm":
            expected = torch.cat([model_state(model)[name] - before_w[name] / 2] * 2)
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=name)
        elif len(spec.grown_axes()) == 2:
            diagonal = staged._repeat_block_diag(torch.ones_like(before_w[name]), spec, sizes, 2) != 0
            torch.testing.assert_close(value[diagonal], image[name][diagonal], atol=1e-6, rtol=0, msg=name)
            g = _tile_segments(grads[name], spec, sizes) / 2  # what an off-diagonal block receives
            m, v = (1 - b1) * g, (1 - b2) * g * g
            first = -LR / (1 - b1**t) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + 0.5e-8)
            torch.testing.assert_close(value[~diagonal], first[~diagonal], atol=1e-6, rtol=0, msg=name)
        else:
            if spec.role == "bias" and len(spec.axes[0].kinds) == 3:  # fused q/k/v bias
                # the key bias has an analytically zero gradient (softmax ignores a shift shared by all keys):
                # in fp32 it is rounding noise, which Adam normalises to lr-sized steps in both models alike
                # but with different noise, so it is the one bias excluded (after checking it is noise)
                key = slice(sizes["heads"], sizes["heads"] + sizes["kv"])
                assert grads[name][key].abs().max() < 1e-6 * grads[name].abs().max()
                key_new = torch.zeros(value.shape[0], dtype=torch.bool)
                key_new[2 * sizes["heads"]:2 * (sizes["heads"] + sizes["kv"])] = True
                value, expected = value[~key_new], image[name][~key_new]
            else:
                expected = image[name]
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("case", FAMILIES)
def test_staged_width_split_noise_keeps_the_function(case):
    """The symmetry-breaking noise changes the weights of every matrix reading a repeated vector, not the logits."""
    cfg = tiny(case)
    small = randomised(cfg)
    plain = staged.widen(model_state(small), {}, cfg.to_dict())
    noisy = staged.widen(model_state(small), {}, cfg.to_dict(), noise=1.0, generator=torch.Generator().manual_seed(0))
    adapter = adapter_for(cfg.to_dict())
    changed = {n for n in plain.weights if not torch.equal(plain.weights[n], noisy.weights[n])}
    assert changed == {n for n in plain.weights if len(adapter.spec(n).grown_axes()) == 2}
    for name in changed:  # noise of the asked size: about the block's RMS, times sqrt(1 - 1/k) after centring
        d = noisy.weights[name] - plain.weights[name]
        ratio = float(d.pow(2).mean().sqrt() / model_state(small)[name].pow(2).mean().sqrt())
        assert 0.5 < ratio < 0.9, (name, ratio)
    big = grown_model(noisy.config, noisy.weights)
    torch.testing.assert_close(logits(big), logits(small), atol=1e-5, rtol=0)


def test_default_width_noise_keeps_a_deep_models_function_in_fp32():
    """The noise also amplifies rounding differences between the copies, layer after layer; at the default
    (RunConfig.width_noise) a 12-block model still computes the same logits to 1e-3 (2 or more broke this)."""
    from apollo_lm.config import RunConfig
    cfg = ModelConfig(family="gpt", n_layer=12, n_embd=32, n_head=2, vocab_size=VOCAB, block_size=16)
    small = randomised(cfg)
    r = staged.widen(model_state(small), {}, cfg.to_dict(), noise=RunConfig().width_noise,
                     generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(grown_model(r.config, r.weights)), logits(small), atol=1e-3, rtol=0)


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_staged_width_copies_separate_only_with_split_noise(noise):
    """The paper's operator is a symmetry of the network: swapping the two copies maps every parameter to itself,
    so gradients and AdamW updates keep them equal up to rounding (without dropout), and the wide model does not
    outgrow the small one until rounding error has grown. With split noise the embedding halves, which no noise
    touches, drift apart from the first step."""
    cfg = tiny("gpt")
    model, opt = trained(cfg)
    r = staged.widen(model_state(model), named_optimizer_state(opt, model), cfg.to_dict(), noise=noise,
                     generator=torch.Generator().manual_seed(0))
    big = grown_model(r.config, r.weights).train()
    big_opt = build_optimizer(big, LR, WD, BETAS, torch.device("cpu"))
    load_named_optimizer_state(big_opt, big, r.optimizer_state)
    for s in range(3):
        x, y = batch(10 + s)
        big(x, y)[1].backward()
        big_opt.step()
        big_opt.zero_grad(set_to_none=True)
    wte = model_state(big)["wte.weight"]
    gap = float((wte[:, :16] - wte[:, 16:]).abs().max())
    if noise:
        assert gap > 1e-4
    else:
        assert gap < 1e-6


# ------------------------------------------------------------------------------------------------ staged depth
@pytest.mark.parametrize("case", ["gpt", "llama", "llama-gqa-untied"])
def test_staged_depth_x2_preserves_logits_for_pre_norm(case):
    cfg = tiny(case)
    small = randomised(cfg)
    r = staged.deepen(model_state(small), {}, cfg.to_dict())
    assert r.info["loss_preserving"] and r.config["n_layer"] == 4
    torch.testing.assert_close(logits(grown_model(r.config, r.weights)), logits(small), atol=1e-5, rtol=0)


def test_staged_depth_x2_optimizer_state():
    cfg = tiny("gpt")
    model, opt = trained(cfg)
    w, st = model_state(model), named_optimizer_state(opt, model)
    r = staged.deepen(w, st, cfg.to_dict())
    for name in ("attn.c_attn.weight", "mlp.c_proj.bias"):
        for i in range(2):
            old, moved, new = st[f"blocks.{i}.{name}"], r.optimizer_state[f"blocks.{2 * i}.{name}"], \
                r.optimizer_state[f"blocks.{2 * i + 1}.{name}"]
            for k in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(moved[k], old[k], atol=0, rtol=0)
                assert not new[k].any()
    assert not r.weights["blocks.1.attn.c_proj.weight"].any() and not r.weights["blocks.3.mlp.c_proj.bias"].any()
    torch.testing.assert_close(r.weights["blocks.3.ln_1.weight"], w["blocks.1.ln_1.weight"], atol=0, rtol=0)
    torch.testing.assert_close(r.optimizer_state["wte.weight"]["exp_avg"], st["wte.weight"]["exp_avg"])


def test_staged_depth_x2_on_post_ln_bert_is_a_renormalisation_not_the_identity():
    """Post-LN: the inserted block computes ln_2(ln_1(x)); BERT's loss is not preserved (and we say so)."""
    cfg = tiny("bert")
    small = randomised(cfg)
    r = staged.deepen(model_state(small), {}, cfg.to_dict())
    assert r.info["loss_preserving"] is False
    big = grown_model(r.config, r.weights)
    x = torch.randn(2, T, 16)
    with torch.no_grad():
        block = big.blocks[1]
        torch.testing.assert_close(block(x), block.ln_2(block.ln_1(x)), atol=1e-6, rtol=0)
        assert (logits(big) - logits(small)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ bert2BERT
@pytest.mark.parametrize("case", FAMILIES)
def test_bert2bert_fpi_preserves_function(case):
    cfg = tiny(case)
    small = randomised(cfg)
    r = bert2bert.widen(model_state(small), cfg.to_dict(), 32, "fpi", torch.Generator().manual_seed(1))
    inner = r.info["maps"]["inner"]
    assert inner.counts.max() > 1 or inner.counts.min() < 2  # genuinely random, not the cyclic map
    torch.testing.assert_close(logits(grown_model(r.config, r.weights)), logits(small), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["gpt", "bert"])
def test_bert2bert_aki_follows_its_formula_and_is_not_function_preserving(case):
    cfg = tiny(case)
    small = randomised(cfg)
    w = model_state(small)
    r = bert2bert.widen(w, cfg.to_dict(), 32, "aki", torch.Generator().manual_seed(2))
    maps = r.info["maps"]
    gh, gi = maps["hidden"].source, maps["inner"].source
    ch = maps["hidden"].counts[gh].float()
    fc = "mlp.c_fc.weight" if case == "gpt" else "mlp.fc.weight"
    ln = "ln_1.weight"

    def fpi(layer: int) -> torch.Tensor:
        return w[f"blocks.{layer}.{fc}"][gi][:, gh] / ch  # rows copy g_inner, columns g_hidden / counts

    new_rows = (torch.arange(gi.numel()) >= 64)[:, None]  # inner units beyond the old 64
    expected = torch.where(new_rows, fpi(1), fpi(0))  # layer 0's new units come from layer 1 (paper Sec. 3.3)
    torch.testing.assert_close(r.weights[f"blocks.0.{fc}"], expected, atol=0, rtol=0)
    new_hidden = torch.arange(32) >= 16
    expected_ln = torch.where(new_hidden, w[f"blocks.1.{ln}"][gh], w[f"blocks.0.{ln}"][gh])
    torch.testing.assert_close(r.weights[f"blocks.0.{ln}"], expected_ln, atol=0, rtol=0)
    torch.testing.assert_close(r.weights[f"blocks.1.{fc}"], fpi(1), atol=0, rtol=0)  # top block: FPI
    assert (logits(grown_model(r.config, r.weights)) - logits(small)).abs().max() > 1e-3


def test_bert2bert_grow_widens_then_stacks():
    cfg = tiny("bert")
    small = randomised(cfg)
    r = bert2bert.grow(model_state(small), cfg.to_dict(), 32, 4, "aki", torch.Generator().manual_seed(3))
    assert r.config["n_embd"] == 32 and r.config["n_layer"] == 4 and r.optimizer_state == {}
    for name in ("attn.qkv.weight", "ln_2.bias"):
        torch.testing.assert_close(r.weights[f"blocks.2.{name}"], r.weights[f"blocks.0.{name}"], atol=0, rtol=0)
        torch.testing.assert_close(r.weights[f"blocks.3.{name}"], r.weights[f"blocks.1.{name}"], atol=0, rtol=0)
    grown_model(r.config, r.weights)  # loads into the target model


def test_random_maps_keep_query_heads_with_their_kv_group():
    cfg = tiny("llama-gqa-untied").to_dict() | {"n_head": 4, "n_kv_head": 2}
    adapter = adapter_for(cfg)
    sizes = {"hidden": 16, "inner": 32, "heads": 16, "kv": 8}
    maps = random_maps(adapter, cfg, sizes, {k: 3 * v for k, v in sizes.items()}, torch.Generator().manual_seed(0))
    q_heads = maps["heads"].source.view(-1, 4)[:, 0] // 4  # new query head -> old query head
    kv_heads = maps["kv"].source.view(-1, 4)[:, 0] // 4  # new kv head -> old kv head
    assert torch.equal(q_heads // 2, kv_heads.repeat_interleave(2))  # group of 2 query heads per kv head


# ------------------------------------------------------------------------------------------------ LiGO
@pytest.mark.parametrize("case", ["gpt", "bert", "llama-gqa-untied"])
def test_ligo_at_initialisation_equals_copy_stack_growth(case):
    cfg = tiny(case)
    w = model_state(randomised(cfg))
    operator = ligo.LiGO(w, cfg.to_dict(), 32, 4, noise_std=0.0)
    reference = ligo.copy_stack(w, cfg.to_dict(), 32, 4)
    with torch.no_grad():
        grown = operator()
    assert set(grown) == set(reference.weights)
    for name, value in reference.weights.items():
        torch.testing.assert_close(grown[name], value, atol=1e-6, rtol=0, msg=name)
    assert operator.grown_config() == reference.config
    noisy = ligo.LiGO(w, cfg.to_dict(), 32, 4, noise_std=1e-3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = max((noisy()[n] - v).abs().max().item() for n, v in reference.weights.items())
    assert 0 < delta < 0.1


def test_ligo_width_part_starts_function_preserving():
    cfg = tiny("gpt")
    small = randomised(cfg)
    operator = ligo.LiGO(model_state(small), cfg.to_dict(), 32, 2, noise_std=0.0)
    with torch.no_grad():
        big = grown_model(operator.grown_config(), operator())
    torch.testing.assert_close(logits(big), logits(small), atol=1e-5, rtol=0)


def test_ligo_training_lowers_the_loss_closure():
    cfg = tiny("gpt")
    small = randomised(cfg)
    target = build_model(ModelConfig.from_dict(cfg.to_dict() | {"n_embd": 32, "n_head": 4, "n_layer": 4}))
    x, y = batch(7)

    def loss_fn(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(target, weights, (x, y))[1]

    r = ligo.grow(model_state(small), cfg.to_dict(), 32, 4, loss_fn, steps=8, lr=1e-2,
                  generator=torch.Generator().manual_seed(0))
    assert r.info["final_loss"] < r.info["losses"][0] - 1e-3
    assert r.optimizer_state == {} and r.config["n_layer"] == 4
    load_model_state(target, r.weights)
