"""Early stopping within groups: a trial is compared only with trials of its own IPC."""

from dataclasses import dataclass, field

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from pad_ray.scheduling import GroupedASHA, group_key
from pad_ray.sweep_config import SweepConfig, evaluations_by_group


@dataclass
class Trial:  # what a scheduler reads of Tune's Trial: its id and its sampled config
    trial_id: str
    config: dict = field(default_factory=dict)


def _report(scheduler, trial, iteration, accuracy):
    return scheduler.on_trial_result(None, trial, {"training_iteration": iteration, "val_accuracy": accuracy})


def _schedulers():
    settings = {"metric": "val_accuracy", "mode": "max", "grace_period": 1, "reduction_factor": 2}
    return ASHAScheduler(max_t=4, **settings), GroupedASHA(("ipc",), {(1,): 4, (50,): 4}, **settings)


def test_a_small_ipc_is_not_stopped_by_a_large_ipcs_accuracy():
    big, small = Trial("big", {"ipc": 50}), Trial("small", {"ipc": 1})
    one_pool, grouped = _schedulers()
    for scheduler in (one_pool, grouped):
        scheduler.on_trial_add(None, big)
        scheduler.on_trial_add(None, small)
        assert _report(scheduler, big, 1, 0.95) == TrialScheduler.CONTINUE
    # One pool stops the IPC 1 trial at its first rung only because IPC 50 scored higher.
    assert _report(one_pool, small, 1, 0.40) == TrialScheduler.STOP
    assert _report(grouped, small, 1, 0.40) == TrialScheduler.CONTINUE


def test_within_a_group_asha_still_stops_the_weaker_trial():
    _, grouped = _schedulers()
    leader, laggard = Trial("a", {"ipc": 1}), Trial("b", {"ipc": 1})
    for trial in (leader, laggard):
        grouped.on_trial_add(None, trial)
    assert _report(grouped, leader, 1, 0.60) == TrialScheduler.CONTINUE
    assert _report(grouped, laggard, 1, 0.30) == TrialScheduler.STOP
    assert set(grouped.groups) == {(1,)}


def test_each_group_runs_to_its_own_number_of_evaluations():
    sweep = SweepConfig.model_validate({
        "name": "s", "base": {"preset": "mnist-ipc1", "distill": {"iterations": 40, "eval_every": 10}},
        "space": {"ipc": {"kind": "grid", "values": [1, 10]}, "alpha": {"kind": "grid", "values": [0.0, 0.1]}}})
    assert sweep.group_by == ("ipc",)
    assert evaluations_by_group(sweep) == {(1,): 4, (10,): 4}
    assert group_key({"ipc": 10, "alpha": 0.1}, sweep.group_by) == (10,)
    ungrouped = sweep.model_copy(update={"space": {"alpha": sweep.space["alpha"]}})
    assert ungrouped.group_by == () and evaluations_by_group(ungrouped) == {(): 4}


def test_a_group_key_the_space_does_not_sweep_is_refused():
    from pad_ray.sweep_config import check_sweep

    raw = {"name": "s", "base": {"preset": "smoke"}, "space": {"alpha": [0.0, 0.1]},
           "asha": {"group_by": ["alpah"]}}
    sweep, problems = check_sweep(raw, "s.yaml")
    assert sweep is None
    assert problems == ["s.yaml: asha.group_by: 'alpah' is not a key of space; allowed: alpha"]
