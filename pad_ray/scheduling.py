"""Early stopping within groups: ASHA whose rungs hold only trials of the same group (e.g. one IPC).

One ASHA pool over several IPCs compares unlike things: an IPC 50 set always scores above an IPC 1
set, so the small IPCs would be stopped at their first rung and never reach a final test accuracy.
`GroupedASHA` keeps one `ASHAScheduler` per group, each with the group's own number of evaluations,
and forwards every trial event to its group's scheduler; trials still share the cluster in one run.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


def group_key(config: Mapping[str, Any], group_by: tuple[str, ...]) -> tuple[Hashable, ...]:
    """A trial's group: its values of the sweep's group keys (a key the space does not sweep is None)."""
    return tuple(config.get(key) for key in group_by)


class GroupedASHA(FIFOScheduler):
    def __init__(self, group_by: tuple[str, ...], max_t: Mapping[tuple, int], *, metric: str, mode: str,
                 grace_period: int, reduction_factor: float):
        super().__init__()
        self.group_by, self.max_t = tuple(group_by), dict(max_t)
        self._settings = {"metric": metric, "mode": mode, "grace_period": grace_period,
                          "reduction_factor": reduction_factor}
        self._metric, self._mode = metric, mode
        self.groups: dict[tuple, ASHAScheduler] = {}

    def key(self, trial) -> tuple:
        return group_key(trial.config, self.group_by)

    def _scheduler(self, trial) -> ASHAScheduler:
        key = self.key(trial)
        if key not in self.groups:
            self.groups[key] = ASHAScheduler(max_t=self.max_t[key], **self._settings)
        return self.groups[key]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        # The metric and mode are fixed by the sweep file; a searcher may only agree with them.
        return metric in (None, self._metric) and mode in (None, self._mode)

    def on_trial_add(self, tune_controller, trial):
        self._scheduler(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._scheduler(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._scheduler(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._scheduler(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"group {dict(zip(self.group_by, key))}: {asha.debug_string()}"
                         for key, asha in self.groups.items()) or "GroupedASHA: no trials yet"
