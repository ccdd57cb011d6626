"""Growth: layer maps, depth samplers against method.md, expansion of weights and AdamW state, and the
growth methods in the training loop (FLOPs of sampled depths, growth points, exact resume across them)."""

import json

import numpy as np
import pytest
import torch

from apollo_lm.config import ModelConfig
from apollo_lm.eval.compare import recipe
from apollo_lm.eval.evaluate import load_run
from apollo_lm.growth.expand import expand_state, repeat_scales, source_blocks, split_repeated_outputs
from apollo_lm.growth.maps import interpolate_map, layer_map, stack_map
from apollo_lm.growth.samplers import DepthSampler, rng_from_state, rng_state
from apollo_lm.growth.schedule import StageSchedule
from apollo_lm.models import build_model
from apollo_lm.train.checkpoint import checkpoint_dirs, load_model_state, model_state, read_checkpoint
from apollo_lm.train.flops import train_step_flops
from apollo_lm.train.metrics import read_metrics
from apollo_lm.train.optim import build_optimizer, named_optimizer_state

from .conftest import TINY, run_cli
from .test_train import _same_metrics

# method.md: LVPS, L = 12, 200,000 draws of the authors' sampler
LVPS_TABLE = {
    1: [.735, .105, .052, .032, .022, .016, .011, .009, .007, .006, .005, .002],
    3: [.637, .104, .070, .050, .037, .029, .023, .019, .016, .016],
    6: [.649, .085, .067, .054, .043, .036, .065],
}


def test_maps_are_exactly_as_stated():
    assert interpolate_map(3, 12) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert stack_map(3, 12) == [0, 1, 2] * 4
    assert interpolate_map(3, 7) == [0, 0, 0, 1, 1, 2, 2]  # D not a multiple of n
    assert stack_map(3, 7) == [0, 1, 2, 0, 1, 2, 0]
    assert interpolate_map(5, 12) == [t * 5 // 12 for t in range(12)]
    assert interpolate_map(4, 4) == stack_map(4, 4) == [0, 1, 2, 3]
    for n, D in [(1, 5), (2, 9), (6, 12), (5, 11)]:
        for kind in ("interpolate", "stack"):
            g = layer_map(kind, n, D)
            assert len(g) == D and set(g) == set(range(n))  # every block is used
    with pytest.raises(ValueError):
        interpolate_map(4, 3)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_lvps_matches_the_published_table(n):
    dist = DepthSampler("lvps", 12).distribution(n, draws=100_000, seed=1)
    observed = np.array(list(dist.values()))
    expected = np.array(LVPS_TABLE[n])
    assert list(dist) == list(range(n, 13))
    tv = 0.5 * np.abs(observed - expected / expected.sum()).sum()
    assert tv < 0.015, (observed.round(3), expected)


def test_other_samplers():
    es = DepthSampler("es", 12).distribution(3, draws=50_000, seed=2)
    assert abs(es[3] - 0.43) < 0.02 and abs(es[12] - 0.39) < 0.02
    us = DepthSampler("us", 12).distribution(3, draws=50_000, seed=3)
    assert max(abs(p - 0.1) for p in us.values()) < 0.01
    rng = np.random.default_rng(0)
    assert {DepthSampler("fs", 12).sample(3, rng) for _ in range(50)} == {12}
    assert {DepthSampler("none", 12).sample(3, rng) for _ in range(50)} == {3}
    assert {DepthSampler("lvps", 12).sample(12, rng) for _ in range(50)} == {12}  # last stage: plain model
    # the constants are options: a larger low end shifts mass to deeper draws
    assert DepthSampler("lvps", 12, low=2.0).mean_depth(3) > DepthSampler("lvps", 12).mean_depth(3)


def test_sampler_state_round_trip():
    s = DepthSampler("lvps", 12)
    rng = np.random.default_rng(5)
    [s.sample(1, rng) for _ in range(10)]
    saved = rng_state(rng)
    a = [s.sample(3, rng) for _ in range(50)]
    b = [s.sample(3, rng_from_state(saved)) for _ in range(1)]
    restored = rng_from_state(saved)
    assert [s.sample(3, restored) for _ in range(50)] == a and b[0] == a[0]


def test_stage_schedule():
    s = StageSchedule((1, 3, 6, 12), (20, 40, 100))
    assert [s.blocks_at(p) for p in (0, 19, 20, 39, 40, 99, 100, 399)] == [1, 1, 3, 3, 6, 6, 12, 12]
    with pytest.raises(ValueError):
        StageSchedule((1, 3), (0,))


def _tiny_model(n_blocks):
    cfg = ModelConfig(family="gpt", n_layer=12, n_embd=16, n_head=2, vocab_size=50, block_size=8)
    return build_model(cfg, n_blocks)


@pytest.mark.parametrize("kind, src", [("interpolate", [0, 0, 1, 1, 2, 2]), ("stack", [0, 1, 2, 0, 1, 2])])
@pytest.mark.parametrize("policy", ["copy", "reset"])
def test_expansion_copies_weights_and_optimizer_state(kind, src, policy):
    torch.manual_seed(0)
    m = _tiny_model(3)
    opt = build_optimizer(m, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    for _ in range(2):
        m(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))[1].backward()
        opt.step()
        opt.zero_grad()
    w = expand_state(model_state(m), 3, 6, kind)
    o = expand_state(named_optimizer_state(opt, m), 3, 6, kind, copy_blocks=policy == "copy")
    for j, i in enumerate(src):
        for key, value in m.blocks[i].state_dict().items():
            assert torch.equal(w[f"blocks.{j}.{key}"], value)
            if policy == "copy":
                st = o[f"blocks.{j}.{key}"]
                assert torch.equal(st["exp_avg"], opt.state[dict(m.named_parameters())[f"blocks.{i}.{key}"]]
                                   ["exp_avg"]) and float(st["step"]) == 2
            else:
                assert f"blocks.{j}.{key}" not in o
    assert torch.equal(w["wte.weight"], m.wte.weight) and float(o["wte.weight"]["step"]) == 2
    assert w["blocks.0.ln_1.weight"].data_ptr() != w["blocks.1.ln_1.weight"].data_ptr()  # copies, not aliases


def _growth_run(tmp_path, corpus_files, name, *extra):
    train, valid = corpus_files
    out = tmp_path / name
    code = run_cli("train", "--data", str(train), "--valid", str(valid), "--out", str(out), *TINY, "--n-layer", "6",
                   "--steps", "24", "--eval-every", "4", "--save-every", "5", *extra)
    assert code == 0
    return out


@pytest.mark.parametrize("method", ["apollo", "progressive", "stack"])
def test_growth_methods_in_the_loop(tmp_path, corpus_files, method):
    out = _growth_run(tmp_path, corpus_files, method, "--method", method, "--stages", "1,3,6" if method != "stack"
                      else "3,6", "--grow-at", "0.25,0.5" if method != "stack" else "0.5")
    rows = read_metrics(out / "metrics.jsonl")
    blocks = [r["n_blocks"] for r in rows]
    if method == "stack":
        assert blocks == [3] * 12 + [6] * 12
    else:
        assert blocks == [1] * 6 + [3] * 6 + [6] * 12  # growth at steps 6 and 12 of 24
    depths = [r["depth"] for r in rows]
    assert all(r["n_blocks"] <= r["depth"] <= 6 for r in rows)
    if method == "apollo":
        assert any(d > b for d, b in zip(depths, blocks))  # some steps ran deeper than the physical blocks
    else:
        assert depths == blocks
    # logged FLOPs are the sum over the depths actually run
    ck = read_checkpoint(checkpoint_dirs(out)[-1])
    mc = ModelConfig.from_dict(ck["model_config"])
    ref = build_model(mc, 1)
    total = sum(train_step_flops(ref, d, 32, 4 * 32) for d in depths)
    assert rows[-1]["flops"] == pytest.approx(total, rel=1e-12)
    # evaluation at the target depth, and at the physical depth while they differ
    assert all("val_loss_physical" in r for r in rows if "val_loss" in r and r["n_blocks"] < 6)
    assert all("val_loss_physical" not in r for r in rows if r["n_blocks"] == 6)
    # after the last stage: a plain 6-layer model
    assert ck["model_config"]["n_blocks"] == 6 and "blocks.5.attn.c_attn.weight" in ck["weights"]


def test_interpolation_growth_preserves_the_target_depth_function(tmp_path, corpus_files):
    """With n | n' the map at depth L before growth equals the map after it: the delivered model is unchanged."""
    torch.manual_seed(0)
    m = _tiny_model(3).eval()
    x = torch.randint(0, 50, (2, 8))
    before = m(x, layer_map=interpolate_map(3, 12))[0]
    grown = _tiny_model(6).eval()
    grown.load_state_dict(expand_state(m.state_dict(), 3, 6, "interpolate"))
    torch.testing.assert_close(grown(x, layer_map=interpolate_map(6, 12))[0], before)


@pytest.mark.parametrize("stop", ["5", "6", "13"])  # mid-stage, at a growth boundary, in the last stage
def test_resume_across_growth_equals_uninterrupted(tmp_path, corpus_files, stop):
    args = ("--method", "apollo", "--stages", "1,3,6", "--grow-at", "0.25,0.5")
    full = _growth_run(tmp_path, corpus_files, "full", *args)
    part = _growth_run(tmp_path, corpus_files, "part", *args, "--stop-after", stop)
    assert run_cli("train", "--resume", str(part), "--no-progress") == 0
    _same_metrics(read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl"))


def test_reset_optimizer_state_policy_runs(tmp_path, corpus_files):
    out = _growth_run(tmp_path, corpus_files, "reset", "--method", "apollo", "--stages", "2,6", "--grow-at", "0.5",
                      "--grow-optimizer-state", "reset")
    ck = read_checkpoint(checkpoint_dirs(out)[-1])
    steps = {k.split("::")[0]: float(v) for k, v in ck["optimizer"].items() if k.endswith("::step")}
    assert steps["wte.weight"] == 24 and steps["blocks.0.attn.c_attn.weight"] == 12  # fresh at the boundary


def test_depths_command(capsys):
    assert run_cli("depths", "--sampler", "lvps", "--blocks", "3", "--depth", "12", "--draws", "20000", "--seed",
                   "1", "--json") == 0
    import json
    dist = json.loads(capsys.readouterr().out)
    assert list(dist) == [str(d) for d in range(3, 13)] and abs(sum(dist.values()) - 1) < 1e-9
    assert abs(dist["3"] - 0.637) < 0.015
    assert run_cli("depths", "--blocks", "13", "--depth", "12") == 2


def test_mean_shared_gradients_divide_by_uses():
    from apollo_lm.train.loop import average_shared_grads

    torch.manual_seed(0)
    m = _tiny_model(2)
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    lmap = [0, 0, 0, 1]
    m(x, y, layer_map=lmap)[1].backward()
    summed = {n: p.grad.clone() for n, p in m.named_parameters()}
    average_shared_grads(m, lmap)
    for n, p in m.named_parameters():
        k = 3 if n.startswith("blocks.0.") else 1
        torch.testing.assert_close(p.grad, summed[n] / k)


def test_shared_gradients_are_averaged_by_default(tmp_path, corpus_files):
    """Default --shared-grad mean: at step 1 (same weights, same batch) a block run 3 times has a third of the
    summed gradient, so the whole gradient norm (logged before clipping) is smaller than with --shared-grad sum
    (shown for the paper's unscaled repeats)."""
    train, valid = corpus_files
    norms = {}
    for mode in ("default", "sum"):
        out = tmp_path / mode
        extra = ["--repeat-scale", "none"] + (["--shared-grad", "sum"] if mode == "sum" else [])
        assert run_cli("train", "--data", str(train), "--valid", str(valid), "--out", str(out), *TINY, "--n-layer",
                       "6", "--steps", "4", "--eval-every", "4", "--method", "apollo", "--stages", "2,6", "--grow-at",
                       "0.75", "--sampler", "fs", *extra) == 0
        rows = read_metrics(out / "metrics.jsonl")
        assert rows[0]["depth"] == 6 and rows[0]["n_blocks"] == 2
        norms[mode] = rows[0]["grad_norm"]
        assert json.loads((out / "config.json").read_text())["shared_grad"] == ("sum" if mode == "sum" else "mean")
    assert norms["default"] < 0.9 * norms["sum"]


def test_sample_from_keeps_early_stage_at_physical_depth(tmp_path, corpus_files):
    out = _growth_run(tmp_path, corpus_files, "late", "--method", "apollo", "--stages", "2,6", "--grow-at", "0.5",
                      "--sample-from", "0.5", "--sampler", "fs", "--shared-grad", "mean")
    rows = read_metrics(out / "metrics.jsonl")
    # stage 1 spans steps 1-12: the first half runs 2 blocks, the second half the full depth (fs sampler)
    assert [r["depth"] for r in rows[:12]] == [2] * 6 + [6] * 6
    assert StageSchedule((2, 6), (12,)).fraction_of_stage(6, 24) == 0.5


def test_sample_until_ends_each_stage_at_physical_depth(tmp_path, corpus_files):
    """--sample-until: depths are drawn only before that fraction of each stage, then the stage trains its own
    depth; with --sample-from the draws fall in the window between the two."""
    out = _growth_run(tmp_path, corpus_files, "early", "--method", "apollo", "--stages", "2,6", "--grow-at", "0.5",
                      "--sample-until", "0.5", "--sampler", "fs")
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["depth"] for r in rows[:12]] == [6] * 6 + [2] * 6
    assert "sampling until 0.5 of each stage" in recipe(json.loads((out / "config.json").read_text()))
    out = _growth_run(tmp_path, corpus_files, "window", "--method", "apollo", "--stages", "2,6", "--grow-at", "0.5",
                      "--sample-from", "0.25", "--sample-until", "0.75", "--sampler", "fs")
    assert [r["depth"] for r in read_metrics(out / "metrics.jsonl")[:12]] == [2] * 3 + [6] * 6 + [2] * 3
    assert "sampling from 0.25 until 0.75" in recipe(json.loads((out / "config.json").read_text()))


def test_sample_min_blocks_keeps_small_stages_at_physical_depth(tmp_path, corpus_files, capsys):
    """--sample-min-blocks 3 on 1 -> 3 -> 6: the 1-block stage runs depth 1 on every step (no draws), the later
    stages draw as usual (fs: always the target depth); out-of-range values are refused before anything is made."""
    out = _growth_run(tmp_path, corpus_files, "min3", "--method", "apollo", "--stages", "1,3,6", "--grow-at",
                      "0.25,0.5", "--sampler", "fs", "--sample-min-blocks", "3")
    rows = read_metrics(out / "metrics.jsonl")
    assert [(r["n_blocks"], r["depth"]) for r in rows] == [(1, 1)] * 6 + [(3, 6)] * 6 + [(6, 6)] * 12
    assert "sampling only with 3+ blocks" in recipe(json.loads((out / "config.json").read_text()))
    train, valid = corpus_files
    for bad in ("0", "7"):
        assert run_cli("train", "--data", str(train), "--valid", str(valid), "--out", str(tmp_path / "m"), *TINY,
                       "--n-layer", "6", "--steps", "2", "--method", "apollo", "--sample-min-blocks", bad) == 2
        assert "--sample-min-blocks must be between 1 and the target depth" in capsys.readouterr().err
        assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("window", [("--sample-until", "0"), ("--sample-from", "0.5", "--sample-until", "0.5"),
                                    ("--sample-until", "1.5")])
def test_sample_window_out_of_range_is_refused(tmp_path, corpus_files, capsys, window):
    train, valid = corpus_files
    assert run_cli("train", "--data", str(train), "--valid", str(valid), "--out", str(tmp_path / "w"), *TINY,
                   "--steps", "2", "--method", "apollo", *window) == 2
    assert "--sample-until must be in (--sample-from, 1]" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_sample_to_next_caps_depth_at_next_stage(tmp_path, corpus_files):
    """--sample-to next: the fs sampler (always the deepest allowed) draws the next stage's physical depth, not the
    target depth, and the last stage runs its own full depth."""
    out = _growth_run(tmp_path, corpus_files, "next", "--method", "apollo", "--stages", "1,2,6", "--grow-at",
                      "0.25,0.5", "--sampler", "fs", "--sample-to", "next")
    rows = read_metrics(out / "metrics.jsonl")
    # 24 steps: stage 0 (1 block) steps 1-6, stage 1 (2 blocks) steps 7-12, stage 2 (6 blocks) steps 13-24
    assert [r["depth"] for r in rows] == [2] * 6 + [6] * 6 + [6] * 12
    assert [r["n_blocks"] for r in rows] == [1] * 6 + [2] * 6 + [6] * 12
    assert "next stage" in recipe(json.loads((out / "config.json").read_text()))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_own_depth_weight_adds_physical_depth_pass(tmp_path, corpus_files, grad_accum):
    """--own-depth-weight W: a step drawn deeper than the physical blocks gets the deep pass's gradient (averaged
    over each block's uses) plus W times the gradient of the same batch at the physical depth, and costs the FLOPs
    of both passes."""
    from apollo_lm.config import RunConfig
    from apollo_lm.train.loop import average_shared_grads, start_run

    train, valid = corpus_files
    cfg = RunConfig(method="apollo", data=[str(train)], valid=[str(valid)], n_layer=6, n_embd=32, n_head=2,
                    seq_len=32, vocab_size=300, batch_size=4, eval_batches=1, progress=False, steps=4,
                    stages="2,6", grow_at="0.75", sampler="fs", own_depth_weight=0.5, repeat_scale="none",
                    grad_accum=grad_accum, grad_clip=0.0).resolved()
    trainer = start_run(cfg, tmp_path / "own")
    model = trainer.model
    trainer.optimizer.step = lambda *a, **k: None  # keep the weights and
    trainer.optimizer.zero_grad = lambda *a, **k: None  # the gradients of step 1 to compare them
    record = trainer._train_step()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    deep = layer_map("interpolate", 2, 6)
    batches = [trainer.batcher.get(0, m) for m in range(grad_accum)]
    deep_loss = own_loss = 0.0
    for b in batches:
        loss = model(b.x, b.y, layer_map=deep)[1]
        (loss / grad_accum).backward()
        deep_loss += float(loss.detach()) / grad_accum
    average_shared_grads(model, deep)
    for b in batches:
        loss = model(b.x, b.y)[1]
        (0.5 * loss / grad_accum).backward()
        own_loss += float(loss.detach()) / grad_accum
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, msg=k)
    assert record["depth"] == 6 and record["n_blocks"] == 2
    assert record["train_loss"] == pytest.approx(deep_loss, rel=1e-5)
    assert record["own_depth_loss"] == pytest.approx(own_loss, rel=1e-5)
    tokens = 4 * 32 * grad_accum
    assert record["flops"] == pytest.approx(train_step_flops(model, 6, 32, tokens) + train_step_flops(model, 2, 32,
                                                                                                       tokens))


def test_own_depth_weight_needs_a_sampler(tmp_path, corpus_files, capsys):
    train, valid = corpus_files
    code = run_cli("train", "--data", str(train), "--valid", str(valid), "--out", str(tmp_path / "x"), *TINY,
                   "--method", "progressive", "--own-depth-weight", "1")
    assert code != 0 and "needs a depth sampler" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_repeat_scale_growth_keeps_the_function(family):
    """--repeat-scale uses: a block run k times adds 1/k of its branch each time, and growth divides the copies'
    output projections by their number, so the grown model at its own depth, and the delivered model at the
    target depth, compute exactly what they computed before the growth; the paper's unscaled repeats do not."""
    torch.manual_seed(0)
    mc = ModelConfig.from_dict(dict(family=family, n_layer=12, n_embd=32, n_head=2, vocab_size=50, block_size=16))
    small = build_model(mc, 3).eval()
    x = torch.randint(0, 50, (2, 8))
    src = source_blocks("interpolate", 3, 6)
    grown = build_model(mc, 6).eval()
    grown.load_state_dict(split_repeated_outputs(expand_state(small.state_dict(), 3, 6, "interpolate"), src,
                                                 small.residual_out))
    m6 = interpolate_map(3, 6)
    torch.testing.assert_close(grown(x)[0], small(x, layer_map=m6, branch_scale=repeat_scales(m6))[0])
    assert not torch.allclose(grown(x)[0], small(x, layer_map=m6)[0], atol=1e-3)
    m12, g12 = interpolate_map(3, 12), interpolate_map(6, 12)
    torch.testing.assert_close(grown(x, layer_map=g12, branch_scale=repeat_scales(g12))[0],
                               small(x, layer_map=m12, branch_scale=repeat_scales(m12))[0])
    # only the residual outputs of repeated copies change, each by the number of copies
    sd = split_repeated_outputs(expand_state(small.state_dict(), 3, 6, "interpolate"), src, small.residual_out)
    out_name = small.residual_out[0] + "weight"
    torch.testing.assert_close(sd[f"blocks.5.{out_name}"], small.state_dict()[f"blocks.2.{out_name}"] / 2)
    for k in (k for k in sd if k.startswith("blocks.5.") and not k[9:].startswith(small.residual_out)):
        torch.testing.assert_close(sd[k], small.state_dict()[k.replace("blocks.5.", "blocks.2.")])
    assert repeat_scales([0, 0, 0, 1, 2, 2]) == [1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5]


def test_repeat_scale_in_the_loop_and_in_progress_runs(tmp_path, corpus_files):
    """The loop trains with scaled repeats and grows without a jump in the delivered model; a checkpoint taken
    before the last growth loads as the plain target-depth model it equals."""
    out = _growth_run(tmp_path, corpus_files, "rs", "--method", "apollo", "--stages", "1,3,6",
                      "--grow-at", "0.25,0.5", "--repeat-scale", "uses", "--stop-after", "10")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["repeat_scale"] == "uses" and cfg["shared_grad"] == "mean"
    rows = read_metrics(out / "metrics.jsonl")
    assert {r["depth"] for r in rows} - {1, 3}  # deep draws happened
    ck = read_checkpoint(checkpoint_dirs(out)[-1])
    assert ck["model_config"]["n_blocks"] == 3
    small = build_model(ModelConfig.from_dict(ck["model_config"]), 3).eval()
    load_model_state(small, ck["weights"])
    run = load_run(out)
    assert run.n_blocks == 3 and run.target_map is None and run.grown_from == interpolate_map(3, 6)
    x = torch.randint(0, 300, (2, 16))
    m = interpolate_map(3, 6)
    torch.testing.assert_close(run.model(x)[0], small(x, layer_map=m, branch_scale=repeat_scales(m))[0])


@pytest.mark.parametrize("extra", [("--method", "stack"), ("--method", "apollo", "--layer-map", "stack"),
                                   ("--method", "apollo", "--model", "bert")])
def test_repeat_scale_needs_interpolated_pre_norm_growth(tmp_path, capsys, extra):
    assert run_cli("train", "--out", str(tmp_path / "bad"), *TINY, *extra, "--repeat-scale", "uses") == 2
    assert "--repeat-scale uses needs" in capsys.readouterr().err
