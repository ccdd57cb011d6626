"""Config: presets, parsing of amounts and schedules, and validation messages that name the fix."""

import pytest

from apollo_lm.config import (PRESETS, RunConfig, default_grow_at, default_stages, load_config_file,
                              parse_amount, parse_grow_at, parse_stages)
from apollo_lm.errors import UserError


def test_presets_have_the_paper_shapes():
    assert PRESETS["gpt-small"][:3] == (12, 512, 8)
    assert PRESETS["gpt2-base"][:3] == (12, 768, 12)
    assert PRESETS["bert-base"][:3] == (12, 768, 12)
    assert PRESETS["bert-large"][:3] == (24, 1024, 16)
    m = RunConfig(model="bert", preset="bert-small").model_config()
    assert (m.family, m.n_layer, m.n_embd, m.n_head) == ("bert", 12, 512, 8)


def test_resolved_fills_method_defaults():
    c = RunConfig(method="apollo", preset="gpt-small").resolved()
    assert (c.stages, c.grow_at, c.sampler, c.layer_map) == ("1,3,6,12", "0.05,0.1,0.25", "lvps", "interpolate")
    assert RunConfig(method="apollo").resolved().stages == "1,2,4"  # tiny preset: 4 layers
    # repeated blocks scaled by 1/uses where the interpolation map repeats them
    assert (c.repeat_scale, c.shared_grad) == ("uses", "mean")
    for kw in (dict(method="apollo", layer_map="stack"), dict(method="apollo", model="bert"), dict(method="stack"),
               dict(method="apollo", repeat_scale="none")):
        r = RunConfig(**kw).resolved()
        assert (r.repeat_scale, r.shared_grad) == ("none", "mean"), kw
    assert RunConfig(method="progressive", model="llama").resolved().repeat_scale == "uses"
    s = RunConfig(method="stack", preset="gpt-small").resolved()
    # 3 -> 6 -> 12, 20 % decay; the growth points follow the budget, which the trainer knows (test_train)
    assert (s.stages, s.grow_at, s.sampler, s.layer_map) == ("3,6,12", None, "none", "stack")
    assert (s.schedule, s.decay) == ("wsd", 0.2)
    # one growth, asked for by its stages: late (60 %), then a 30 % decay
    one = RunConfig(method="stack", n_layer=12, stages="3,12").resolved()
    assert (one.grow_at, one.decay) == ("0.6", 0.3)
    assert RunConfig(method="scratch").resolved().decay == 0.2
    assert RunConfig(method="stack", decay=0.1).resolved().decay == 0.1
    default = RunConfig().resolved()
    assert default.steps == 400 and default.method == "stack" and default.stages == "1,2,4"
    assert default.grow_at is None  # 400 steps of the tiny preset: 0.2,0.5 (test_train)
    four = RunConfig(method="stack", n_layer=12, stages="1,3,6,12").resolved()
    assert (four.grow_at, four.decay) == ("0.1,0.2,0.5", 0.2)


@pytest.mark.parametrize("kw, needle", [
    ({"n_embd": 100, "n_head": 3}, "not divisible"),
    ({"lr": -1.0}, "--lr"),
    ({"batch_size": 0}, "--batch-size"),
    ({"steps": 10, "tokens": "1M"}, "one budget"),
    ({"tokens": "lots"}, "--tokens"),
    ({"method": "apollo", "n_layer": 12, "stages": "1,3,6"}, "target depth"),
    ({"method": "apollo", "stages": "1,3,6,12", "grow_at": "0.1,0.2"}, "growth points"),
    ({"stages": "1,2,4", "method": "scratch"}, "growth method"),
    ({"warmup": 0.9}, "--warmup"),
    ({"width_noise": -0.1}, "--width-noise"),
])
def test_validation_names_the_problem(kw, needle):
    with pytest.raises(UserError, match=needle):
        RunConfig(**kw).validate()


def test_amounts_and_schedules():
    assert parse_amount("3M") == 3e6 and parse_amount("1.5e6") == 1.5e6 and parse_amount("2k") == 2000
    assert parse_stages("1, 3,6,12") == [1, 3, 6, 12]
    with pytest.raises(UserError, match="increase"):
        parse_stages("3,3,6")
    assert parse_grow_at("0.05,0.1") == [(0.05, "fraction"), (0.1, "fraction")]
    assert parse_grow_at("100s,300s") == [(100, "steps"), (300, "steps")]
    assert parse_grow_at("1Mt,2Mt") == [(1e6, "tokens"), (2e6, "tokens")]
    for bad in ("0.3,0.2", "1.5", "0.1,100s"):
        with pytest.raises(UserError):
            parse_grow_at(bad)
    assert default_stages("apollo", 12) == [1, 3, 6, 12]
    assert default_stages("apollo", 24) == [1, 6, 12, 24]
    assert default_grow_at(4) == [0.05, 0.1, 0.25]


def test_config_files_toml_yaml_and_errors(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('model = "bert"\n[optim]\nlr = 3e-4\nbatch_size = 8\n')
    values = load_config_file(str(toml))
    c = RunConfig.from_dict(values)
    assert (c.model, c.lr, c.batch_size) == ("bert", 3e-4, 8)
    yml = tmp_path / "c.yaml"
    yml.write_text("model: gpt\nsteps: 12\ndata: [a.txt, b.txt]\n")
    assert RunConfig.from_dict(load_config_file(str(yml))).data == ["a.txt", "b.txt"]
    with pytest.raises(UserError, match="unknown option 'learning_rate'"):
        RunConfig.from_dict({"learning_rate": 1})
    with pytest.raises(UserError, match="must be of type int"):
        RunConfig.from_dict({"batch_size": "big"})
    with pytest.raises(UserError, match="does not exist"):
        load_config_file(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("model = = 1")
    with pytest.raises(UserError, match="could not be parsed"):
        load_config_file(str(bad))


def test_lr_schedules():
    from apollo_lm.train.optim import lr_at

    peak = 1e-3
    assert lr_at(0.005, peak, 0.01, 0.1) == pytest.approx(peak / 2)  # half-way through warmup
    assert lr_at(0.01, peak, 0.01, 0.1) == pytest.approx(peak)
    assert lr_at(1.0, peak, 0.01, 0.1) == pytest.approx(1e-4)  # cosine ends at 10 % of the peak
    mid = lr_at(0.505, peak, 0.01, 0.1)
    assert mid == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    # warmup-stable-decay: flat until the last 20 %, then linear to the floor
    assert lr_at(0.5, peak, 0.01, 0.1, "wsd", 0.2) == peak
    assert lr_at(0.9, peak, 0.01, 0.1, "wsd", 0.2) == pytest.approx(peak - 0.9e-3 * 0.5)
    assert lr_at(1.0, peak, 0.01, 0.1, "wsd", 0.2) == pytest.approx(1e-4)


def test_hf_dataset_without_the_datasets_package(monkeypatch):
    import builtins

    from apollo_lm.data.readers import iter_documents

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match=r"pip install 'apollo-lm\[hf\]'"):
        list(iter_documents(["hf:wikitext:wikitext-2-raw-v1@train"]))
