"""bench/growth.py: every named method (on the cpu size; the default ones on every size) is a valid run config that
resolves to what it says."""

import importlib.util
from pathlib import Path

import pytest

from apollo_lm.cli import build_config, build_parser
from apollo_lm.config import RunConfig

spec = importlib.util.spec_from_file_location("bench_growth", Path(__file__).parents[1] / "bench" / "growth.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _config(argv: list[str]) -> RunConfig:
    """The RunConfig `apollo train` builds from these options."""
    return build_config(build_parser().parse_args(["train", *argv]))


CASES = [("cpu", name) for name in sorted(bench.METHODS)] + \
    [(size, name) for size in sorted(bench.SIZES) if size != "cpu" for name in ("scratch", "stack", "apollo")]


@pytest.mark.parametrize("size, name", CASES)
def test_every_bench_method_is_a_valid_config(size, name):
    argv = [*bench.COMMON, *bench.SIZES[size]["args"], "--data", "x.jsonl", *bench.METHODS[name]]
    cfg = _config(argv)
    assert cfg.method == bench._last(argv, "--method")
    if "--grow-at" in bench.METHODS[name]:
        assert cfg.grow_at == bench._last(argv, "--grow-at")


def test_named_schedules_match_the_defaults_they_spell_out():
    """stack-wsd spells out the default stack (20/50 % at the cpu size's one token per parameter); stack-wsd-late is
    the same but grows at 30/60 %."""
    from apollo_lm.config import stack_grow_at_for_budget

    cpu = [*bench.COMMON, *bench.SIZES["cpu"]["args"], "--data", "x.jsonl"]
    default = _config([*cpu, *bench.METHODS["stack"]])
    spelled = _config([*cpu, *bench.METHODS["stack-wsd"]])
    late = _config([*cpu, *bench.METHODS["stack-wsd-late"]])
    assert (default.stages, default.schedule, default.decay) == (spelled.stages, spelled.schedule, spelled.decay)
    assert default.grow_at is None  # chosen by the trainer from 3M tokens for about 2.65M parameters:
    assert ",".join(map(str, stack_grow_at_for_budget(3e6 / 2.65e6))) == spelled.grow_at
    assert (late.stages, late.grow_at, late.decay) == ("3,6,12", "0.3,0.6", 0.2)
    late2 = _config([*cpu, *bench.METHODS["stack-wsd-5080"]])
    assert (late2.method, late2.stages, late2.grow_at, late2.schedule, late2.decay) == \
        ("stack", "3,6,12", "0.5,0.8", "wsd", 0.2)
    staged = _config([*cpu, *bench.METHODS["staged-depth-wsd-5080"]])
    assert (staged.method, staged.stages, staged.decay) == ("staged", "depth:3->6@0.5, depth:6->12@0.8", 0.2)


def test_options_a_method_overrides_are_named():
    """A method's own options come after those given after --; the bench says which it overrides, and only those
    whose values differ."""
    assert bench.overridden(["--decay", "0.3", "--seed", "2"], "scratch-wsd") == [
        "scratch-wsd sets --decay 0.2, which overrides --decay 0.3 given after --"]
    assert bench.overridden(["--decay", "0.2", "--schedule", "wsd"], "scratch-wsd") == []
    assert bench.overridden(["--decay", "0.3"], "scratch") == []
    assert bench.overridden(["--stages", "3,12", "--grow-at", "0.7"], "stack") == []
    assert bench.overridden(["--method", "stack"], "progressive") == [
        "progressive sets --method progressive, which overrides --method stack given after --"]
