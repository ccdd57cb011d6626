"""Staged training schedules: ``--stages "width:256->512@0.3, depth:6->12@0.6"`` and the ``auto`` growth rule.

A schedule is a list of :class:`GrowthEvent` (operator, size before, size after, when). ``when`` is a
fraction of the budget (``0.3``), a step (``1500s``), a token count (``20Mt``) as for ``--grow-at``, or
``auto``: grow when :func:`should_grow` says so.

The ``auto`` rule (Shen et al. 2022, Sec. 4, from the scaling law of Kaplan et al. 2020)
    For a model of ``N`` parameters the loss after ``S`` steps follows
    ``L(N, S) = (N_c / N)^alpha_N + (S_c / S)^alpha_S``. Write ``E = L - (N_c / N)^alpha_N`` for the part of
    the loss that more steps can still remove; then ``S = S_c E^(-1/alpha_S)`` and, with ``F`` FLOPs per step,
    the loss falls per FLOP at ``dL/dC = -alpha_S E / (F S)``. A loss-preserving growth operator puts the large
    model (``N'`` parameters, ``F'`` FLOPs per step) at the *same* loss, i.e. at the point of its own curve
    where ``E' = L - (N_c / N')^alpha_N``. Growing pays as soon as the small model's measured slope per FLOP
    falls below the large model's expected slope there: ``-dL/dC (small, measured) <= alpha_S E' / (F' S')``.
    The small model's slope is measured, not predicted: a least-squares line through its last ``window``
    logged (FLOPs, loss) points, so the rule reacts to the run itself; the large model's slope comes from the
    law. Parameters: the four scaling-law constants (defaults: Kaplan et al. 2020, Table 5 / Eq. 1.6, in nats
    and optimizer steps at the critical batch size; refit them for another tokenizer or data set, as the
    staged-training authors did on their own runs), ``window``, and ``margin`` (grow only once the small
    slope is below ``margin`` times the large one; 1 is the paper's break-even point).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import parse_grow_at
from ..errors import UserError

OPERATORS = ("width", "depth")

KAPLAN_ALPHA_N, KAPLAN_N_C = 0.076, 8.8e13
KAPLAN_ALPHA_S, KAPLAN_S_C = 0.76, 2.1e3


@dataclass(frozen=True)
class GrowthEvent:
    """One growth point: ``operator`` in width / depth, from ``old`` to ``new`` (n_embd or blocks).

    ``at`` is None for ``auto``; otherwise a value in ``unit`` ('fraction', 'steps' or 'tokens')."""

    operator: str
    old: int
    new: int
    at: float | None
    unit: str

    @property
    def factor(self) -> int:
        return self.new // self.old


_EVENT = re.compile(r"(?P<op>[a-z]+):(?P<old>\d+)->(?P<new>\d+)@(?P<at>.+)")


def parse_staged_stages(text: str) -> list[GrowthEvent]:
    """Parse and check a staged-training schedule; errors say what to write instead."""
    example = 'e.g. "width:256->512@0.3, depth:6->12@0.6"'
    events: list[GrowthEvent] = []
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    if not parts:
        raise UserError(f"--stages is empty: give growth events, {example}")
    for part in parts:
        m = _EVENT.fullmatch(part)
        if not m:
            raise UserError(f"--stages: cannot read {part!r}; write OPERATOR:OLD->NEW@WHEN, {example}")
        op, old, new, at = m.group("op"), int(m.group("old")), int(m.group("new")), m.group("at")
        if op not in OPERATORS:
            raise UserError(f"--stages: {part!r} names the operator {op!r}; use width or depth")
        if old < 1 or new <= old or new % old:
            raise UserError(f"--stages: {part!r} must grow by a whole factor (staged training doubles: "
                            f"{old}->{2 * max(old, 1)})")
        if at == "auto":
            events.append(GrowthEvent(op, old, new, None, "auto"))
        else:
            (value, unit), = parse_grow_at(at)
            events.append(GrowthEvent(op, old, new, value, unit))
    timed = [e for e in events if e.at is not None]
    if len({e.unit for e in timed}) > 1:
        raise UserError(f"--stages {text!r}: give every growth point in one unit (all fractions, all steps or all "
                        "tokens)")
    if any(b.at <= a.at for a, b in itertools.pairwise(timed)):  # type: ignore[operator]
        raise UserError(f"--stages {text!r}: growth points must be listed in increasing order of time")
    for op in OPERATORS:
        chain = [e for e in events if e.operator == op]
        for a, b in itertools.pairwise(chain):
            if b.old != a.new:
                raise UserError(f"--stages {text!r}: {op} grows to {a.new} and then from {b.old}; each {op} event "
                                f"must start where the previous one ended")
    return events


def initial_config(events: Sequence[GrowthEvent], target: Mapping[str, Any]) -> dict[str, Any]:
    """The ModelConfig dict of the first stage: the target shrunk by every event (head size kept).

    Checks that the schedule ends at the target's n_embd and n_layer."""
    start = dict(target)
    for op, key in (("width", "n_embd"), ("depth", "n_layer")):
        chain = [e for e in events if e.operator == op]
        if not chain:
            continue
        if chain[-1].new != target[key]:
            raise UserError(f"--stages: the last {op} event ends at {chain[-1].new}, the target model has "
                            f"{key}={target[key]}; end it at {target[key]}")
        start[key] = chain[0].old
    shrink = target["n_embd"] // start["n_embd"]
    if shrink > 1:
        for key in ("n_head", "n_kv_head", "intermediate_size"):
            if start.get(key):
                if start[key] % shrink:
                    raise UserError(f"--stages: {key}={start[key]} cannot shrink by {shrink} for the first stage; "
                                    f"choose a target whose {key} is a multiple of {shrink}")
                start[key] //= shrink
    return start


# ------------------------------------------------------------------------------------------------ auto rule
def measured_slope(flops: Sequence[float], losses: Sequence[float], window: int = 20) -> float | None:
    """Least-squares d(loss)/d(FLOPs) over the last ``window`` points; None with fewer than 3 points."""
    x, y = list(flops)[-window:], list(losses)[-window:]
    if len(x) < 3:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    var = sum((a - mx) ** 2 for a in x)
    if var == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / var


def expected_slope_after_growth(loss: float, n_params_large: float, flops_per_step_large: float,
                                alpha_n: float = KAPLAN_ALPHA_N, n_c: float = KAPLAN_N_C,
                                alpha_s: float = KAPLAN_ALPHA_S, s_c: float = KAPLAN_S_C) -> float:
    """dL/dC (negative) of the large model placed at ``loss`` on its own scaling-law curve; 0 when ``loss`` is
    already at or below the large model's floor (growing then cannot help)."""
    reducible = loss - (n_c / n_params_large) ** alpha_n
    if reducible <= 0:
        return 0.0
    steps = s_c * reducible ** (-1.0 / alpha_s)
    return -alpha_s * reducible / (flops_per_step_large * steps)


def should_grow(flops: Sequence[float], losses: Sequence[float], n_params_large: float,
                flops_per_step_large: float, window: int = 20, margin: float = 1.0,
                alpha_n: float = KAPLAN_ALPHA_N, n_c: float = KAPLAN_N_C, alpha_s: float = KAPLAN_ALPHA_S,
                s_c: float = KAPLAN_S_C) -> bool:
    """The ``auto`` rule: True once the small model's measured loss decrease per FLOP is at most ``margin``
    times the decrease per FLOP the grown model is expected to achieve from the same loss (module docstring).

    ``flops`` are cumulative training FLOPs at each logged loss; ``losses`` are (smoothed) training losses.
    Never True below the large model's predicted floor, where the fitted law no longer describes the run."""
    slope = measured_slope(flops, losses, window)
    if slope is None or not math.isfinite(slope):
        return False
    recent = sum(list(losses)[-window:]) / len(list(losses)[-window:])
    large = expected_slope_after_growth(recent, n_params_large, flops_per_step_large, alpha_n, n_c, alpha_s, s_c)
    if large == 0.0:  # the loss is already below what the law allows the large model: the law does not apply
        return False
    return -slope <= margin * -large
