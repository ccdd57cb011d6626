"""Staged-training schedules: parsing ``--stages`` growth events, and the ``auto`` growth-point rule."""

from __future__ import annotations

import pytest

from apollo_lm.errors import UserError
from apollo_lm.growth.staged_schedule import (
    GrowthEvent,
    expected_slope_after_growth,
    initial_config,
    parse_staged_stages,
    should_grow,
)


def test_parse_the_documented_example():
    events = parse_staged_stages("width:256->512@0.3, depth:6->12@0.6")
    assert events == [GrowthEvent("width", 256, 512, 0.3, "fraction"), GrowthEvent("depth", 6, 12, 0.6, "fraction")]
    assert [e.factor for e in events] == [2, 2]
    assert parse_staged_stages("depth:3->6@100s,depth:6->12@auto")[1].at is None
    assert parse_staged_stages("width:64->128@2Mt")[0].unit == "tokens"


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("height:2->4@0.3", "width or depth"),
    ("width:256->384@0.3", "whole factor"),
    ("width:256-512@0.3", "OPERATOR:OLD->NEW@WHEN"),
    ("width:256->512@0.6, depth:6->12@0.3", "increasing order"),
    ("width:256->512@0.3, depth:6->12@500s", "one unit"),
    ("depth:3->6@0.2, depth:8->16@0.5", "start where the previous one ended"),
    ("depth:3->6@1.5", "between 0 and 1"),
])
def test_parse_rejects_bad_schedules_with_a_fix(text, message):
    with pytest.raises(UserError, match=message):
        parse_staged_stages(text)


def test_initial_config_shrinks_the_target_and_checks_its_end():
    target = {"family": "llama", "n_embd": 512, "n_head": 8, "n_kv_head": 4, "n_layer": 12,
              "intermediate_size": 1376}
    start = initial_config(parse_staged_stages("width:256->512@0.3, depth:6->12@0.6"), target)
    assert (start["n_embd"], start["n_head"], start["n_kv_head"], start["n_layer"]) == (256, 4, 2, 6)
    assert start["intermediate_size"] == 688
    with pytest.raises(UserError, match="end it at 512"):
        initial_config(parse_staged_stages("width:128->256@0.3"), target)


def test_auto_rule_switches_where_the_scaling_law_slopes_cross():
    """Feed the rule a small model's curve that follows the law exactly: it must say 'grow' first where the
    small model's slope per FLOP meets the large model's expected slope at the same loss (found here by
    bisection on the closed forms), within the resolution of the logged points."""
    a_n, n_c, a_s, s_c = 0.076, 8.8e13, 0.76, 2.1e3
    n_small, n_large = 1e6, 4e6
    f_small, f_large = 6 * n_small * 512, 6 * n_large * 512

    def loss(steps: float) -> float:
        return (n_c / n_small) ** a_n + (s_c / steps) ** a_s

    def gap(steps: float) -> float:  # small slope minus large slope, both as positive decrease per FLOP
        small = a_s * (s_c / steps) ** a_s / (f_small * steps)
        return small + expected_slope_after_growth(loss(steps), n_large, f_large, a_n, n_c, a_s, s_c)

    lo, hi = 10.0, 1e7
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
    crossing = hi

    steps = [float(s) for s in range(10, int(3 * crossing), max(1, int(crossing // 400)))]
    flops = [s * f_small for s in steps]
    losses = [loss(s) for s in steps]
    first = next(i for i in range(3, len(steps))
                 if should_grow(flops[: i + 1], losses[: i + 1], n_large, f_large, window=5))
    assert abs(steps[first] - crossing) / crossing < 0.05
    assert not should_grow(flops[:2], losses[:2], n_large, f_large)  # too few points to measure a slope


def test_auto_rule_never_grows_below_the_large_models_floor():
    assert expected_slope_after_growth(1.0, 1e6, 1e12) == 0.0
    assert not should_grow([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], 1e6, 1e12)
