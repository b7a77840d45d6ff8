"""best/*: a run's best validation loss and accuracy so far (its best training loss when it has no
validation data), beside the last values that MLflow's runs table shows.

Each is logged only when it improves, at the step (examples seen) where it was reached, so the metric's
latest point is the best and its history is the staircase of improvements. The loop keeps this object's
state in its checkpoints: a resumed run goes on from the best before the stop, not from its first point.
"""

from __future__ import annotations

import math

from descent.tracking.names import TRAIN_LOSS, VAL_ACC, VAL_LOSS, best_key

WITH_VALIDATION = {VAL_LOSS: "min", VAL_ACC: "max"}
WITHOUT_VALIDATION = {TRAIN_LOSS: "min"}


class Best:
    def __init__(self) -> None:
        self.goals: dict[str, str] = {}
        self.values: dict[str, float] = {}  # metric -> its best so far

    def watch(self, validation: bool) -> None:
        self.goals = WITH_VALIDATION if validation else WITHOUT_VALIDATION

    def __call__(self, metrics: dict[str, float]) -> dict[str, float]:
        """The best/* points these metrics set (none when nothing improved)."""
        new = {}
        for key, goal in self.goals.items():
            value = metrics.get(key)
            if value is None or not math.isfinite(value):  # NaN is never a best; a diverged run ends anyway
                continue
            old = self.values.get(key)
            if old is None or (value < old if goal == "min" else value > old):
                self.values[key] = value
                new[best_key(key)] = value
        return new

    def state_dict(self) -> dict[str, float]:
        return dict(self.values)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.values = dict(state)
