"""Early stopping within groups: ASHA whose rungs hold only trials of the same group (e.g. one IPC).

One ASHA pool over several IPCs compares unlike things: an IPC 50 set always scores above an IPC 1
set, so the small IPCs would be stopped at their first rung and never reach a final test accuracy.
`GroupedASHA` keeps one scheduler per group, each with the group's own number of evaluations, and
forwards every trial event to its group's scheduler; trials still share the cluster in one run.

Tune's ASHA judges a trial at a rung against the trials that reached the rung before it, so which
trials a sweep stops depends on timing: two runs of one sweep can stop different trials. With
`repeatable=True` each group runs `OrderedASHA`, which takes results in trial order instead and makes
the same decisions in every run.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler


def group_key(config: Mapping[str, Any], group_by: tuple[str, ...]) -> tuple[Hashable, ...]:
    """A trial's group: its values of the sweep's group keys (a key the space does not sweep is None)."""
    return tuple(config.get(key) for key in group_by)


class OrderedASHA:
    """One group's ASHA, deciding as if every trial had run alone, one after another in the order Tune
    created them: a trial at a rung is compared with the earlier trials that reached that rung (ASHA's
    quantile cutoff, the same rungs). A trial that gets to a rung before an earlier trial has either
    reached it or ended is paused (Tune keeps its checkpoint) until it can be judged; the earliest live
    trial never waits, so every wait ends. The decisions depend only on the trials' own results."""

    TIME = "training_iteration"

    def __init__(self, max_t: int, *, metric: str, mode: str, grace_period: int, reduction_factor: float):
        self.max_t, self.metric, self.reduction_factor = max_t, metric, reduction_factor
        self.sign = 1.0 if mode == "max" else -1.0
        count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)  # ASHA's rungs
        self.milestones = [grace_period * reduction_factor ** k for k in range(count)]
        self.order: list[str] = []
        self.position: dict[str, int] = {}
        self.recorded: dict[float, dict[str, float]] = {m: {} for m in self.milestones}
        self.judged: dict[str, float] = {}  # trial id -> the last rung it was judged at
        self.ended: set[str] = set()
        self.waiting: dict[str, tuple[Trial, float, float]] = {}  # paused: (trial, rung, score)

    def on_trial_add(self, tune_controller, trial) -> None:
        if trial.trial_id in self.position:  # Tune adds a trial again when it retries it after a failure
            self.ended.discard(trial.trial_id)
            return
        self.position[trial.trial_id] = len(self.order)
        self.order.append(trial.trial_id)
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # a restored sweep's finished trials
            self.ended.add(trial.trial_id)
            return
        # A restored sweep's unfinished trial passed its earlier rungs in a run whose scores Tune does not
        # keep: it holds no later trial up there, and counts in no cutoff (as ASHA, whose rungs start empty).
        done = (trial.last_result or {}).get(self.TIME, 0)
        for rung in (m for m in self.milestones if m < done):
            self.recorded[rung][trial.trial_id] = math.nan
            self.judged[trial.trial_id] = rung

    def on_trial_result(self, tune_controller, trial, result: Mapping[str, Any]) -> str:
        if self.TIME not in result or self.metric not in result:
            return TrialScheduler.CONTINUE
        if result[self.TIME] >= self.max_t:
            return TrialScheduler.STOP
        rung = self._rung(trial.trial_id, result[self.TIME])
        if rung is None:
            return TrialScheduler.CONTINUE
        score = self.sign * float(result[self.metric])
        if self._blocked(trial.trial_id, rung):
            self.waiting[trial.trial_id] = (trial, rung, score)
            return TrialScheduler.PAUSE
        action = self._judge(trial.trial_id, rung, score)
        self._release(tune_controller)
        return action

    def on_trial_complete(self, tune_controller, trial, result=None) -> None:
        """The trial reports no more (finished, stopped, failed or removed)."""
        self.ended.add(trial.trial_id)
        self.waiting.pop(trial.trial_id, None)
        self._release(tune_controller)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.on_trial_complete(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.on_trial_complete(tune_controller, trial)

    def may_run(self, trial) -> bool:
        return trial.trial_id not in self.waiting

    def _rung(self, trial_id: str, time: float) -> float | None:
        """The highest rung at or below `time` this trial has not been judged at (ASHA's rule)."""
        passed = self.judged.get(trial_id, 0)
        due = [m for m in self.milestones if passed < m <= time]
        return due[-1] if due else None

    def _earlier(self, trial_id: str) -> list[str]:
        return self.order[:self.position[trial_id]]

    def _blocked(self, trial_id: str, rung: float) -> bool:
        return any(other not in self.ended and other not in self.recorded[rung] for other in self._earlier(trial_id))

    def _judge(self, trial_id: str, rung: float, score: float) -> str:
        earlier = [self.recorded[rung][other] for other in self._earlier(trial_id)
                   if not math.isnan(self.recorded[rung].get(other, math.nan))]
        self.recorded[rung][trial_id] = score
        self.judged[trial_id] = rung
        stop = bool(earlier) and score < np.percentile(earlier, (1 - 1 / self.reduction_factor) * 100)
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    def _release(self, tune_controller) -> None:
        """Judge, earliest first, each paused trial that no earlier trial holds up any more; those that lose
        are stopped (which ends them, and may re-enter here), the others become runnable."""
        while True:
            ready = next((t for t in self.order if t in self.waiting and not self._blocked(t, self.waiting[t][1])),
                         None)
            if ready is None:
                return
            trial, rung, score = self.waiting.pop(ready)
            if self._judge(ready, rung, score) == TrialScheduler.STOP:
                # Tune marks the result it stops a running trial on as its last (`done`); a paused trial's last
                # result is the rung's, and without the mark the sweep's report would count it as interrupted.
                trial.last_result["done"] = True
                tune_controller.stop_trial(trial)

    def debug_string(self) -> str:
        return " | ".join(f"rung {m:g}: {len(self.recorded[m])} judged" for m in self.milestones) + (
            f" | {len(self.waiting)} waiting for earlier trials" if self.waiting else "")


class GroupedASHA(FIFOScheduler):
    def __init__(self, group_by: tuple[str, ...], max_t: Mapping[tuple, int], *, metric: str, mode: str,
                 grace_period: int, reduction_factor: float, repeatable: bool = False):
        super().__init__()
        self.group_by, self.max_t, self.repeatable = tuple(group_by), dict(max_t), repeatable
        self._settings = {"metric": metric, "mode": mode, "grace_period": grace_period,
                          "reduction_factor": reduction_factor}
        self._metric, self._mode = metric, mode
        self.groups: dict[tuple, ASHAScheduler | OrderedASHA] = {}

    @property
    def supports_buffered_results(self) -> bool:
        return not self.repeatable  # several results at once would carry a trial past the rung it waits at

    def key(self, trial) -> tuple:
        return group_key(trial.config, self.group_by)

    def _scheduler(self, trial) -> ASHAScheduler | OrderedASHA:
        key = self.key(trial)
        if key not in self.groups:
            kind = OrderedASHA if self.repeatable else ASHAScheduler
            self.groups[key] = kind(max_t=self.max_t[key], **self._settings)
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

    def on_trial_error(self, tune_controller, trial):
        self._scheduler(trial).on_trial_error(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        # FIFO's choice (new trials first, then paused ones), except a trial waiting for earlier ones.
        trials = tune_controller.get_trials()
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in trials:
                if trial.status == status and (not self.repeatable or self._scheduler(trial).may_run(trial)):
                    return trial
        return None

    def debug_string(self) -> str:
        return "\n".join(f"group {dict(zip(self.group_by, key))}: {asha.debug_string()}"
                         for key, asha in self.groups.items()) or "GroupedASHA: no trials yet"
