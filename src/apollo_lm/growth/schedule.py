"""Stage schedules: which physical block count n is in force at each point of the budget.

A schedule is a list of block counts (the last is the target depth L) and the points where each stage after
the first begins. With a step or token budget the points are whole optimizer steps; with a FLOPs budget
they are cumulative FLOPs. Whatever the unit, the stage is a function of the position in the budget, so a
resumed run grows at exactly the steps an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSchedule:
    stages: tuple[int, ...]  # physical blocks per stage, increasing, last = L
    starts: tuple[float, ...]  # where stages 1.. begin: steps (unit 'steps') or FLOPs (unit 'flops')
    unit: str = "steps"

    def __post_init__(self) -> None:
        if len(self.starts) != len(self.stages) - 1:
            raise ValueError("one start per stage after the first")
        if any(b <= a for a, b in zip(self.stages, self.stages[1:])):
            raise ValueError(f"stages must increase, got {self.stages}")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:])) or any(s <= 0 for s in self.starts):
            raise ValueError(f"growth points must be positive and increasing, got {self.starts}")

    @classmethod
    def single(cls, n_layer: int) -> StageSchedule:
        """Training from scratch: one stage at full depth."""
        return cls((n_layer,), ())

    @property
    def target_depth(self) -> int:
        return self.stages[-1]

    def stage_at(self, position: float) -> int:
        """Index of the stage in force for a step that begins at ``position`` (step index or FLOPs so far)."""
        return sum(1 for s in self.starts if position >= s)

    def fraction_of_stage(self, position: float, end: float) -> float:
        """How far into its stage ``position`` lies, in [0, 1) (``end``: the end of the budget)."""
        s = self.stage_at(position)
        lo = self.starts[s - 1] if s > 0 else 0.0
        hi = self.starts[s] if s < len(self.starts) else end
        return (position - lo) / max(hi - lo, 1e-12)

    def blocks_at(self, position: float) -> int:
        return self.stages[self.stage_at(position)]
