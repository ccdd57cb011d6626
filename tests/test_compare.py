"""apollo compare: crossing points interpolated between evaluations, savings, refusals, report files."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from apollo_lm.errors import UserError
from apollo_lm.eval.compare import (_crossing, _loss_at_flops, compare, load_run_metrics, stage_depth_histograms,
                                   to_markdown)

from .conftest import TINY, run_cli


def _fake_run(path, method, evals, **model):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"method": method, "sampler": "lvps", "eval_batches": 4,
                                                  "seq_len": 32}))
    (path / "model.json").write_text(json.dumps({"family": "gpt", "n_layer": 4, "n_embd": 32, "n_head": 2,
                                                 "vocab_size": 300, **model}))
    (path / "data.json").write_text(json.dumps({"train_sources": ["t"], "valid_sources": ["v"],
                                                "cache_key": "k", "train_tokens": 1000, "valid_tokens": 100}))
    (path / "tokenizer.json").write_text('{"model": "same"}')
    rows = [{"step": i + 1, "flops": f, "wall": w, "val_loss": v, "depth": 1, "n_blocks": 1}
            for i, (f, w, v) in enumerate(evals)]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return load_run_metrics(path)


def test_crossing_and_savings(tmp_path):
    scratch = _fake_run(tmp_path / "s", "scratch", [(100, 10, 5.0), (200, 20, 4.0), (400, 40, 3.0)])
    fast = _fake_run(tmp_path / "f", "progressive", [(100, 8, 4.0), (200, 16, 2.0), (300, 24, 1.9)])
    slow = _fake_run(tmp_path / "w", "apollo", [(200, 30, 4.5), (400, 60, 3.5)])
    res = compare(scratch, [fast, slow])
    assert res["target_loss"] == 3.0
    f = res["methods"]["f"]
    # 3.0 lies halfway between (100, 4.0) and (200, 2.0): 150 FLOPs, 12 s
    assert f["reached"] and f["flops_to_target"] == pytest.approx(150) and f["wall_to_target"] == pytest.approx(12)
    assert f["flops_saving"] == pytest.approx(1 - 150 / 400) and f["wall_saving"] == pytest.approx(1 - 12 / 40)
    # at equal FLOPs (300, where f stopped): f's 1.9 against scratch's 3.5 (halfway from 4.0 at 200 to 3.0 at 400)
    assert f["equal_flops"] == 300 and f["loss_at_equal_flops"] == 1.9
    assert f["scratch_loss_at_equal_flops"] == pytest.approx(3.5)
    # f stopped at 300 of scratch's 400 FLOPs: scratch's 3.5 is mid-run, and the report says so
    assert f["scratch_mid_run_at_equal_flops"]
    md = to_markdown(res)
    assert "3.5000 at 300 (scratch mid-run)" in md and "Scratch mid-run:" in md
    w = res["methods"]["w"]
    assert not w["reached"] and w["flops_saving"] is None and w["loss_at_equal_flops"] == 3.5
    # bert2bert / ligo runs also get the papers' saving that leaves out the small model's training
    small = _fake_run(tmp_path / "b", "bert2bert", [(100, 8, 4.0), (200, 16, 2.0)])
    small.rows[1]["small_flops"] = 50
    b = compare(scratch, [small])["methods"]["b"]
    assert b["flops_saving"] == pytest.approx(1 - 150 / 400)
    assert b["flops_saving_excluding_small"] == pytest.approx(1 - 100 / 400)
    assert _crossing([{"flops": 1, "wall": 1, "val_loss": 1.0}], 2.0) == (1, 1)
    assert _loss_at_flops([{"flops": 10, "val_loss": 2.0}, {"flops": 20, "val_loss": 1.0}], 15) == 1.5


def test_given_target_loss_with_and_without_a_scratch_run(tmp_path):
    scratch = _fake_run(tmp_path / "s", "scratch", [(100, 10, 5.0), (200, 20, 4.0), (400, 40, 3.0)])
    fast = _fake_run(tmp_path / "f", "progressive", [(100, 8, 4.0), (200, 16, 2.0), (300, 24, 1.9)])
    # a target of the user's choosing: scratch's own cost is where its curve reaches it (4.5: 150 FLOPs, 15 s)
    res = compare(scratch, [fast], target_loss=4.5)
    f = res["methods"]["f"]
    assert res["target_source"] == "given" and res["scratch_flops"] == pytest.approx(150)
    # fast is below 4.5 at its first evaluation (100 FLOPs, 8 s): nothing earlier to interpolate from
    assert f["flops_to_target"] == 100 and f["flops_saving"] == pytest.approx(1 - 100 / 150)
    assert f["wall_saving"] == pytest.approx(1 - 8 / 15)
    assert "(given), which scratch run" in to_markdown(res)
    with pytest.raises(UserError, match="never reaches --target-loss 2.5 .*lowest validation loss is 3.0000"):
        compare(scratch, [fast], target_loss=2.5)
    # no scratch run: its final loss and cost as the user knows them
    res = compare(None, [fast], target_loss=3.0, scratch_flops=400.0, scratch_wall=40.0)
    f = res["methods"]["f"]
    assert res["scratch"] is None and f["flops_saving"] == pytest.approx(1 - 150 / 400)
    assert f["wall_saving"] == pytest.approx(1 - 12 / 40) and "loss_at_equal_flops" not in f
    md = to_markdown(res)
    assert "(given; no scratch run)" in md and "4.00e+02" not in md and "400 FLOPs (given)" in md
    assert "| 62.5 % | 70.0 % |" in md  # the same figures as against the scratch run itself
    # without a time, the wall-clock saving is n/a, not "did not reach"
    f = compare(None, [fast], target_loss=3.0, scratch_flops=400.0)["methods"]["f"]
    assert f["reached"] and f["wall_saving"] is None
    slow = _fake_run(tmp_path / "w", "apollo", [(200, 30, 4.5), (400, 60, 3.5)])
    assert not compare(None, [slow], target_loss=3.0, scratch_flops=400.0)["methods"]["w"]["reached"]
    for kwargs, msg in [(dict(target_loss=3.0), "give --target-loss .* and --scratch-flops"),
                        (dict(target_loss=-1.0, scratch_flops=400.0), "positive validation loss"),
                        (dict(target_loss=3.0, scratch_flops=0.0), "positive number of FLOPs"),
                        (dict(target_loss=3.0, scratch_flops=400.0, scratch_wall=-1.0), "positive number of seconds")]:
        with pytest.raises(UserError, match=msg):
            compare(None, [fast], **kwargs)
    with pytest.raises(UserError, match="stand in for a scratch run"):
        compare(scratch, [fast], target_loss=3.0, scratch_flops=400.0)


def test_refuses_incomparable_runs(tmp_path):
    scratch = _fake_run(tmp_path / "s", "scratch", [(100, 10, 5.0)])
    other = _fake_run(tmp_path / "o", "apollo", [(100, 10, 5.0)], n_embd=64)
    with pytest.raises(UserError, match="differ in target model"):
        compare(scratch, [other])
    # the same data copied elsewhere (another cache key: the files' times differ) still compares ...
    copy = _fake_run(tmp_path / "c", "apollo", [(100, 10, 5.0)])
    copy.data["cache_key"] = "other-mtime"
    compare(scratch, [copy])
    # ... and so does the same file given by another path (relative here, absolute there, or carried to a GPU)
    scratch.data["train_sources"], copy.data["train_sources"] = ["/work/shared/data/t.jsonl"], ["../data/t.jsonl"]
    compare(scratch, [copy])
    copy.data["train_sources"] = ["../data/other.jsonl"]
    with pytest.raises(UserError, match="differ in training data"):
        compare(scratch, [copy])
    copy.data["train_sources"] = scratch.data["train_sources"]
    # ... but another tokenizer or other token counts do not
    (tmp_path / "c" / "tokenizer.json").write_text('{"model": "other"}')
    with pytest.raises(UserError, match="differ in tokenized data or tokenizer"):
        compare(scratch, [copy])
    copy.data["train_tokens"] = 999
    (tmp_path / "c" / "tokenizer.json").write_text('{"model": "same"}')
    with pytest.raises(UserError, match="differ in tokenized data or tokenizer"):
        compare(scratch, [copy])
    with pytest.raises(UserError, match="not a finished run"):
        load_run_metrics(tmp_path / "missing")


def test_compare_end_to_end(tmp_path, corpus_files, capsys):
    train, valid = corpus_files
    common = ("--data", str(train), "--valid", str(valid), *TINY, "--n-layer", "4", "--steps", "16",
              "--eval-every", "4")
    assert run_cli("train", *common, "--out", str(tmp_path / "scratch"), "--method", "scratch") == 0
    assert run_cli("train", *common, "--out", str(tmp_path / "apollo"), "--method", "apollo") == 0
    capsys.readouterr()
    assert run_cli("compare", str(tmp_path / "scratch"), str(tmp_path / "apollo"), "--out",
                   str(tmp_path / "cmp")) == 0
    table = capsys.readouterr().out
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    recipe = res["methods"]["apollo"]["recipe"]
    assert recipe.startswith("apollo (lvps), 1,2,4 at ") and recipe.endswith("wsd (decay 0.2), lr 0.001")
    assert f"| {recipe} | apollo |" in table
    assert res["scratch_recipe"] == "scratch, wsd (decay 0.2), lr 0.001" and res["scratch_recipe"] in table
    assert set(res) >= {"scratch", "target_loss", "methods"}
    m = res["methods"]["apollo"]
    assert set(m) >= {"run", "reached", "flops_saving", "wall_saving", "final_val_loss"}
    for png in ("loss_vs_flops.png", "loss_vs_wall.png", "depths.png"):
        assert (tmp_path / "cmp" / png).stat().st_size > 1000
    # the same comparison with scratch known only by its final loss: 'budget' is what the scratch run cost (the
    # target model at full depth over the same tokens), for the scratch run itself and for the apollo run alike
    assert run_cli("compare", str(tmp_path / "scratch"), str(tmp_path / "apollo"), "--target-loss",
                   repr(res["target_loss"]), "--scratch-flops", "budget", "--out", str(tmp_path / "cmp2"),
                   "--json") == 0
    known = json.loads(capsys.readouterr().out)
    for name in ("scratch", "apollo"):
        assert known["methods"][name]["scratch_flops"] == pytest.approx(res["scratch_flops"], rel=1e-9)
    k = known["methods"]["apollo"]
    assert k["reached"] == m["reached"] and k["final_val_loss"] == m["final_val_loss"]
    assert k["flops_saving"] == m["flops_saving"] or k["flops_saving"] == pytest.approx(m["flops_saving"])
    assert (tmp_path / "cmp2" / "loss_vs_flops.png").stat().st_size > 1000
    # bench/archive.py keeps a few kB of each run, on which compare gives the same report and depth histograms
    spec = importlib.util.spec_from_file_location("bench_archive", Path(__file__).parents[1] / "bench" / "archive.py")
    archive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(archive)
    assert archive.main([str(tmp_path / "scratch"), str(tmp_path / "apollo"), "--to", str(tmp_path / "kept")]) == 0
    kept = tmp_path / "kept" / tmp_path.name
    assert not (kept / "apollo" / "tokenizer.json").exists() and (kept / "apollo" / "tokenizer.sha256").is_file()
    again = compare(load_run_metrics(kept / "scratch"), [load_run_metrics(kept / "apollo")])
    for key in ("target_loss", "scratch_flops", "scratch_wall", "scratch_recipe"):
        assert again[key] == res[key]
    assert {k: v for k, v in again["methods"]["apollo"].items() if k != "run"} == \
        {k: v for k, v in res["methods"]["apollo"].items() if k != "run"}
    hist = stage_depth_histograms(load_run_metrics(kept / "apollo"))
    assert hist and hist == stage_depth_histograms(load_run_metrics(tmp_path / "apollo"))
    capsys.readouterr()
    assert archive.main([str(tmp_path / "nothing")]) == 2 and "not a finished run" in capsys.readouterr().err
    for args, msg in [(("--scratch-flops", "lots"), "a number of FLOPs .* or 'budget'"),
                      (("--scratch-flops", "budget"), "give its final validation loss as --target-loss"),
                      (("--scratch-wall", "3"), "--scratch-wall goes with --scratch-flops"),
                      ((), "give the scratch run's directory and at least one")]:
        assert run_cli("compare", str(tmp_path / "apollo"), *args) == 2
        assert re.search(msg, capsys.readouterr().err)
    # a run on other data is refused with a clear message
    assert run_cli("train", *common, "--out", str(tmp_path / "other"), "--valid-fraction", "0.1") == 0
    capsys.readouterr()
    other = ("--data", str(valid), *TINY, "--n-layer", "4", "--steps", "2", "--out", str(tmp_path / "o2"))
    assert run_cli("train", *other, "--valid-fraction", "0.2") == 0
    capsys.readouterr()
    assert run_cli("compare", str(tmp_path / "scratch"), str(tmp_path / "o2")) == 2
    assert "differ in training data" in capsys.readouterr().err


def test_recipe_names_what_departs_from_the_defaults():
    from apollo_lm.eval.compare import recipe

    base = dict(sampler="none", layer_map="interpolate", shared_grad="sum", sample_from=0.0,
                grow_optimizer_state="copy", schedule="wsd", decay=0.3, lr=1e-3)
    assert recipe({**base, "method": "stack", "layer_map": "stack", "stages": "3,12", "grow_at": "0.6"}) == \
        "stack, 3,12 at 0.6, wsd (decay 0.3), lr 0.001"
    assert recipe({**base, "method": "apollo", "sampler": "lvps", "layer_map": "stack", "stages": "3,12",
                   "grow_at": "0.6", "shared_grad": "sum", "sample_from": 0.5, "schedule": "cosine"}) == \
        "apollo (lvps), 3,12 at 0.6, stack map, summed shared grads, sampling from 0.5 of each stage, cosine, lr 0.001"
    assert recipe({**base, "method": "apollo", "sampler": "lvps", "stages": "1,3,6,12", "grow_at": "0.05,0.1,0.25",
                   "shared_grad": "mean"}) == "apollo (lvps), 1,3,6,12 at 0.05,0.1,0.25, wsd (decay 0.3), lr 0.001"
    assert recipe({**base, "method": "apollo", "sampler": "lvps", "stages": "1,3,6,12", "grow_at": "0.1,0.2,0.5",
                   "shared_grad": "mean", "own_depth_weight": 1.0}) == \
        "apollo (lvps), 1,3,6,12 at 0.1,0.2,0.5, own-depth loss x1 on deep draws, wsd (decay 0.3), lr 0.001"
    assert recipe({**base, "method": "progressive", "stages": "1,3,6,12", "grow_at": "0.05,0.1,0.25",
                   "grow_optimizer_state": "reset", "lr": 3e-4}) == \
        "progressive, 1,3,6,12 at 0.05,0.1,0.25, moments reset, wsd (decay 0.3), lr 0.0003"
    assert recipe({"method": "scratch"}) == "scratch"  # an older run's config without these keys
    # LVPS with other curve constants than the release's 0.6 / 0.4 says so; the other samplers have none
    assert recipe({**base, "method": "apollo", "sampler": "lvps", "stages": "1,3,6,12", "grow_at": "0.1,0.2,0.5",
                   "shared_grad": "mean", "lvps_low": 0.3, "lvps_high": 0.4}) == \
        "apollo (lvps 0.3/0.4), 1,3,6,12 at 0.1,0.2,0.5, wsd (decay 0.3), lr 0.001"
    assert recipe({**base, "method": "apollo", "sampler": "es", "stages": "1,3,6,12", "shared_grad": "mean",
                   "lvps_low": 0.3}).startswith("apollo (es), 1,3,6,12, wsd")
