"""Early stopping within groups: a trial is compared only with trials of its own IPC."""

import random
from dataclasses import dataclass, field

from ray.tune.experiment import Trial as TuneTrial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from pad_ray.scheduling import GroupedASHA, group_key
from pad_ray.sweep_config import SweepConfig, evaluations_by_group


@dataclass
class Trial:  # what a scheduler reads of Tune's Trial: its id, its sampled config and its status
    trial_id: str
    config: dict = field(default_factory=dict)
    status: str = TuneTrial.PENDING
    last_result: dict = field(default_factory=dict)


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


class Controller:
    """What a scheduler calls of Tune's controller, doing what Tune does: a PAUSED or PENDING trial that is
    stopped is removed from the scheduler, a RUNNING one completes."""

    def __init__(self, scheduler, trials):
        self.scheduler, self.trials = scheduler, trials

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        if trial.status in (TuneTrial.PENDING, TuneTrial.PAUSED):
            trial.status = TuneTrial.TERMINATED
            self.scheduler.on_trial_remove(self, trial)
        elif trial.status == TuneTrial.RUNNING:
            trial.status = TuneTrial.TERMINATED
            self.scheduler.on_trial_complete(self, trial, {})


def _run_in_trial_order(scores, groups, max_t, settings):
    """Tune's own ASHA, one per group, fed each trial's results with the trials run one after another:
    the last evaluation each trial reaches."""
    last = {}
    for group in set(groups.values()):
        asha = ASHAScheduler(max_t=max_t, **settings)
        for name in (n for n in scores if groups[n] == group):
            trial = Trial(name)
            asha.on_trial_add(None, trial)
            for time, score in enumerate(scores[name], start=1):
                result = {"training_iteration": time, "val_accuracy": score}
                if asha.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                    asha.on_trial_complete(None, trial, result)
                    break
            last[name] = time
    return last


def _run_concurrently(scores, groups, max_t, settings, slots, rng, repeatable):
    """The trials on `slots` workers, one result at a time from a running trial drawn by `rng`, acting on
    the scheduler's decisions as Tune does: the last evaluation each trial reaches."""
    trials = [Trial(name, {"ipc": groups[name]}) for name in scores]
    scheduler = GroupedASHA(("ipc",), {(g,): max_t for g in set(groups.values())}, repeatable=repeatable,
                            **settings)
    controller = Controller(scheduler, trials)
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
    last = dict.fromkeys(scores, 0)
    while True:
        while sum(t.status == TuneTrial.RUNNING for t in trials) < slots:
            chosen = scheduler.choose_trial_to_run(controller)
            if chosen is None:
                break
            chosen.status = TuneTrial.RUNNING
        running = [t for t in trials if t.status == TuneTrial.RUNNING]
        if not running:
            break
        trial = rng.choice(running)
        last[trial.trial_id] += 1
        time = last[trial.trial_id]
        result = {"training_iteration": time, "val_accuracy": scores[trial.trial_id][time - 1]}
        action = scheduler.on_trial_result(controller, trial, result)
        if action == TrialScheduler.PAUSE:
            trial.status = TuneTrial.PAUSED
        elif action == TrialScheduler.STOP or time == max_t:
            trial.status = TuneTrial.TERMINATED
            scheduler.on_trial_complete(controller, trial, result)
    assert all(t.status == TuneTrial.TERMINATED for t in trials), [(t.trial_id, t.status) for t in trials]
    return last


def test_repeatable_asha_stops_the_same_trials_whatever_order_results_arrive_in():
    rng = random.Random(0)
    differed = 0
    for case in range(150):
        count, max_t = rng.randint(2, 8), rng.randint(2, 9)
        settings = {"metric": "val_accuracy", "mode": rng.choice(["max", "min"]),
                    "grace_period": rng.randint(1, 2), "reduction_factor": rng.choice([2, 3])}
        settings["grace_period"] = min(settings["grace_period"], max_t)
        # Few distinct scores, so that ties at a rung's cutoff are common; two groups, interleaved.
        scores = {f"t{i}": [rng.choice([0.5, 0.6, 0.7, 0.8]) for _ in range(max_t)] for i in range(count)}
        groups = {name: 1 + i % 2 for i, name in enumerate(scores)}
        expected = _run_in_trial_order(scores, groups, max_t, settings)
        for slots in (1, 2, 4):
            seed = rng.random()
            run = _run_concurrently(scores, groups, max_t, settings, slots, random.Random(seed), repeatable=True)
            assert run == expected, (case, slots, settings, scores)
            plain = _run_concurrently(scores, groups, max_t, settings, slots, random.Random(seed), repeatable=False)
            differed += plain != expected
    # The control: Tune's ASHA on the same arrivals often stops other trials than the trial order gives.
    assert differed > 20


def test_repeatable_asha_does_not_wait_for_trials_that_ended_or_were_restored_finished():
    settings = {"metric": "val_accuracy", "mode": "max", "grace_period": 1, "reduction_factor": 2}
    done, failing, waiting = (Trial("a", {"ipc": 1}, TuneTrial.TERMINATED), Trial("b", {"ipc": 1}),
                              Trial("c", {"ipc": 1}))
    scheduler = GroupedASHA(("ipc",), {(1,): 4}, repeatable=True, **settings)
    controller = Controller(scheduler, [done, failing, waiting])
    for trial in (done, failing, waiting):
        scheduler.on_trial_add(controller, trial)
    for trial in (failing, waiting):
        trial.status = TuneTrial.RUNNING
    # "c" gets to the first rung before "b" (a finished trial of a restored sweep holds nobody up).
    assert _report_to(scheduler, controller, waiting, 1, 0.3) == TrialScheduler.PAUSE
    waiting.status = TuneTrial.PAUSED
    assert scheduler.choose_trial_to_run(controller) is None  # paused until "b" reaches the rung or ends
    failing.status = TuneTrial.ERROR
    scheduler.on_trial_error(controller, failing)
    assert scheduler.choose_trial_to_run(controller) is waiting and waiting.status == TuneTrial.PAUSED


def test_a_paused_trial_that_loses_at_its_rung_is_stopped_when_the_earlier_one_arrives():
    settings = {"metric": "val_accuracy", "mode": "max", "grace_period": 1, "reduction_factor": 2}
    first, second = Trial("a", {"ipc": 1}, TuneTrial.RUNNING), Trial("b", {"ipc": 1}, TuneTrial.RUNNING)
    scheduler = GroupedASHA(("ipc",), {(1,): 4}, repeatable=True, **settings)
    controller = Controller(scheduler, [first, second])
    for trial in (first, second):
        scheduler.on_trial_add(controller, trial)
    assert _report_to(scheduler, controller, second, 1, 0.3) == TrialScheduler.PAUSE
    second.status = TuneTrial.PAUSED
    second.last_result = {"training_iteration": 1, "val_accuracy": 0.3}
    assert _report_to(scheduler, controller, first, 1, 0.6) == TrialScheduler.CONTINUE
    assert second.status == TuneTrial.TERMINATED  # 0.3 is below the 0.6 "a" scored there first
    assert second.last_result["done"]  # ended, not interrupted, as the sweep's report reads it


def test_a_retried_trial_keeps_its_place_and_a_restored_one_holds_up_no_rung_it_has_passed():
    settings = {"metric": "val_accuracy", "mode": "max", "grace_period": 1, "reduction_factor": 2}
    restored = Trial("a", {"ipc": 1}, TuneTrial.PENDING, {"training_iteration": 3})  # resumed at evaluation 3
    retried, last = Trial("b", {"ipc": 1}, TuneTrial.RUNNING), Trial("c", {"ipc": 1}, TuneTrial.RUNNING)
    scheduler = GroupedASHA(("ipc",), {(1,): 8}, repeatable=True, **settings)
    controller = Controller(scheduler, [restored, retried, last])
    for trial in (restored, retried, last):
        scheduler.on_trial_add(controller, trial)
    scheduler.on_trial_error(controller, retried)  # what Tune does when it retries a failed trial
    scheduler.on_trial_add(controller, retried)
    assert _report_to(scheduler, controller, retried, 1, 0.5) == TrialScheduler.CONTINUE  # "a" passed rung 1
    assert _report_to(scheduler, controller, last, 1, 0.4) == TrialScheduler.STOP  # judged against "b" only
    assert _report_to(scheduler, controller, retried, 2, 0.5) == TrialScheduler.CONTINUE
    assert _report_to(scheduler, controller, retried, 4, 0.5) == TrialScheduler.PAUSE  # "a" has rung 4 ahead


def _report_to(scheduler, controller, trial, iteration, accuracy):
    return scheduler.on_trial_result(controller, trial, {"training_iteration": iteration, "val_accuracy": accuracy})


def test_repeatable_asha_is_refused_with_optuna():
    from pad_ray.sweep_config import check_sweep

    raw = {"name": "s", "base": {"preset": "smoke"}, "space": {"alpha": {"choice": [0.0, 0.1]}},
           "search": {"kind": "optuna"}, "asha": {"repeatable": True}}
    sweep, problems = check_sweep(raw, "s.yaml")
    assert sweep is None and len(problems) == 1
    assert problems[0].startswith("s.yaml: asha.repeatable: search.kind optuna suggests trials")
