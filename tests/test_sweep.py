"""The sweep on a real local Ray and a real MLflow sqlite store, run as users run it.

Each Ray test runs on a cluster of its own (the `ray_cluster` fixtures); one test trains the smoke
sweep's experts from cold, the others start from a copy of the session's store (`warm_store`)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from conftest import light_smoke_sweep, start_driver, wait_for
from pad_ray import files, local_stages
from pad_ray.config import ConfigError
from pad_ray.runtime import derive_seed
from pad_ray.sweep_config import finite_grid, load_sweep, trial_config
from pad_ray.trajectories import TrajectoryStore

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "sweeps" / "smoke.yaml"


def sweep_command(path: Path) -> list[str]:
    return [sys.executable, "-m", "pad_ray.sweep", str(path)]


def children(home: Path, experiment: str = "smoke", tracking_uri: str | None = None):
    """The sweep's MLflow client, trial runs and parent runs (from its sqlite store under `home`, or a server)."""
    client = MlflowClient(tracking_uri or f"sqlite:///{home}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    trials = [r for r in runs if "trial_id" in r.data.tags]
    parents = [r for r in runs if "trial_id" not in r.data.tags and "expert_set" not in r.data.tags]
    return client, trials, parents


def tune_trials(home: Path, name: str) -> dict[str, dict]:
    """Tune's own record of each trial, by trial id (in its folder's name, as pad_trial_<id>_<n>_..., where
    a searcher's ids have no _00000 counter): its sampled params, every result it reported, and n, its
    place in the order Tune created the trials."""
    trials = {}
    for params_file in (home / "sweeps" / name).glob("*/params.json"):
        ((trial_id, number),) = re.findall(r"^pad_trial_([0-9a-f]+(?:_\d{5})?)_(\d+)_", params_file.parent.name)
        result_file = params_file.parent / "result.json"
        lines = result_file.read_text().splitlines() if result_file.exists() else []
        results = [json.loads(line) for line in lines if line.strip()]
        assert all(r["trial_id"] == trial_id for r in results)
        trials[trial_id] = {"params": json.loads(params_file.read_text()), "results": results, "number": int(number)}
    return trials


def store_checksums(store: Path) -> dict[str, str]:
    """sha256 of every array file in a store, by path within it."""
    return {str(p.relative_to(store)): files.sha256(p) for p in sorted(store.rglob("*.np[yz]"))}


def assert_runs_match_their_trials(client, runs, trials: dict[str, dict], sweep) -> None:
    """Each child run's PAD params are its own trial's values, and it read its own IR/AEE expert set."""
    assert {r.data.tags["trial_id"] for r in runs} == set(trials)
    keys = set()
    for run in runs:
        params = trials[run.data.tags["trial_id"]]["params"]
        cfg = trial_config(sweep, params)
        logged = run.data.params
        assert {k: logged[k] for k in ("ipc", "alpha", "ir", "aee")} == {
            "ipc": str(cfg.distill.ipc), "alpha": str(cfg.distill.alpha), "ir": str(cfg.schedule.init_ratio),
            "aee": str(cfg.schedule.add_end_epoch)}, (logged, params)
        for key, value in params.items():  # the sampled values themselves, by their sweep names
            assert logged[key] == str(value)
        key = TrajectoryStore(cfg.store_dir, cfg).key
        if trials[run.data.tags["trial_id"]]["results"]:  # a trial that failed before reporting logs no key
            assert run.data.tags["expert_store_key"] == key, (params, run.data.tags)
        assert TrajectoryStore(cfg.store_dir, cfg).missing(cfg.experts.num_experts) == []
        keys.add((cfg.schedule.init_ratio, cfg.schedule.add_end_epoch, key))
    # One expert set per (IR, AEE): as many distinct keys as distinct pairs.
    assert len({k[2] for k in keys}) == len({k[:2] for k in keys})


def assert_each_step_once(client, run, eval_every: int = 4) -> int:
    """Every iteration's loss and every evaluation logged exactly once, none missing; the evaluations."""
    evaluations = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
    assert evaluations == list(range(eval_every, eval_every * len(evaluations) + 1, eval_every)), evaluations
    losses = sorted(m.step for m in client.get_metric_history(run.info.run_id, "step_loss"))
    assert losses == list(range(1, eval_every * len(evaluations) + 1)), losses
    norms = client.get_metric_history(run.info.run_id, "step_grad_norm")
    assert sorted(m.step for m in norms) == losses and all(m.value > 0 for m in norms)
    return len(evaluations)


@pytest.mark.slow
def test_two_ipcs_stop_early_only_within_their_ipc_and_each_gets_its_best_config(sweep_home, ray_cluster, warm_store,
                                                                               tmp_path):
    sweep = light_smoke_sweep()
    sweep["name"] = "ipcs"
    # The smoke sweep's 5 evaluations: ASHA rungs at 1, 2 and 4.
    sweep["space"] = {"ipc": [1, 2], "alpha": [0.0, 0.1, 0.2, 0.3]}
    sweep["asha"]["repeatable"] = True  # decisions that do not depend on timing, so this test can name them
    path = tmp_path / "ipcs.yaml"
    path.write_text(yaml.safe_dump(sweep))
    driver_tmp = tmp_path / "driver_tmp"  # where the driver stages artefacts for MLflow
    driver_tmp.mkdir()
    result = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=900, cwd=REPO,
                            env={**os.environ, "TMPDIR": str(driver_tmp)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(driver_tmp.glob("pad_ray_artifacts_*"))  # every staged copy went once logged

    client, trials, (parent,) = children(sweep_home, "ipcs")
    tune = tune_trials(sweep_home, "ipcs")
    out = sweep_home / "sweeps" / "ipcs"
    table = list(csv.DictReader((out / "results.csv").open()))
    assert {row["status"] for row in table} <= {"done", "stopped"}
    assert [row["ipc"] for row in table] == ["1"] * 4 + ["2"] * 4  # ranked within each IPC
    for ipc in (1, 2):
        runs = [r for r in trials if r.data.params["ipc"] == str(ipc)]
        # Each IPC has its own rungs: pooled with IPC 2's higher scores, IPC 1's trials were all cut at the
        # first rung. Within an IPC, each trial ran exactly as far as Tune's own ASHA lets it when that IPC's
        # trials run one after another, on the scores they reported (whatever order their results arrived in,
        # and whether a trial waited at a rung or was stopped while it waited).
        assert any("final_test_accuracy" in r.data.metrics for r in runs), ipc
        for run in runs:  # across a wait at a rung too: every step logged once, none missing
            assert_each_step_once(client, run)
        asha = ASHAScheduler(max_t=5, metric="val_accuracy", mode="max", grace_period=1, reduction_factor=2)
        for number, trial in enumerate(t for t in sorted(tune.values(), key=lambda t: t["number"])
                                       if t["params"]["ipc"] == ipc):
            # Tune's record of the trial has every report once, across a wait at a rung and its resume.
            assert [r["training_iteration"] for r in trial["results"]] == list(range(1, len(trial["results"]) + 1))
            stand_in = SimpleNamespace(trial_id=str(number))
            asha.on_trial_add(None, stand_in)
            for reported, result in enumerate(trial["results"], start=1):
                if asha.on_trial_result(None, stand_in, result) == TrialScheduler.STOP:
                    break
            assert reported == len(trial["results"]), (ipc, number, [r["val_accuracy"] for r in trial["results"]])
        rows = [row for row in table if row["ipc"] == str(ipc)]
        scores = [float(row["best_val_accuracy"]) for row in rows if row["best_val_accuracy"]]
        assert scores == sorted(scores, reverse=True)
        best = yaml.safe_load((out / f"best_config_ipc{ipc}.yaml").read_text())
        assert best["distill"]["ipc"] == ipc and best["distill"]["alpha"] == float(rows[0]["alpha"])
        # Each IPC's top trial against its own controls, of its own size: a row and parent-run metrics per IPC.
        (against,) = [row for row in csv.DictReader((out / "controls.csv").open()) if row["ipc"] == str(ipc)]
        assert against["trial_id"] == rows[0]["trial_id"]
        nets = best["evaluate"]["num_nets"]
        assert (int(against["start_nets"]), int(against["random_nets"])) == (nets, 3 * nets)
        for kind in ("start", "random"):
            assert parent.data.metrics[f"control_{kind}_test_accuracy/ipc{ipc}"] == pytest.approx(
                float(against[f"{kind}_test_accuracy"]))
    assert not (out / "best_config.yaml").exists()


@pytest.mark.slow
def test_repeatable_asha_pauses_a_trial_that_gets_ahead_and_resumes_it_from_its_rung(
        sweep_home, ray_cluster, warm_store, tmp_path):
    """The pause and resume through Tune, the trainable and MLflow; which trials the rungs stop is
    tests/test_scheduling.py's (against Tune's own ASHA, over many orders of arrival)."""
    sweep = light_smoke_sweep()
    sweep["name"] = "ordered"
    # Trial 0 evaluates 50 times longer than trials 1 and 2, so they reach the first rung well before it. On
    # the evaluation's iteration all trials tie at each rung, and ASHA stops only below the cutoff: nobody is
    # stopped, and a later trial waits at a rung (evaluations 1 and 2 of 3) until trial 0 is there.
    sweep["space"] = {"evaluate.epochs": [1000, 20, 21]}
    sweep["base"]["distill"].update(iterations=12)
    sweep["base"]["evaluate"].update(num_nets=1)
    sweep["asha"].update(metric="iteration", repeatable=True)
    sweep["max_concurrent_trials"] = 0  # a waiting trial's CPU takes trial 2 (Tune's limit counts paused trials)
    sweep["controls"] = {"random_subsets": 0, "starting_set": False}
    path = tmp_path / "ordered.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]

    trials = sorted(tune_trials(sweep_home, "ordered").values(), key=lambda t: t["number"])
    assert [t["params"]["evaluate.epochs"] for t in trials] == [1000, 20, 21]
    for number, trial in enumerate(trials):
        assert [r["training_iteration"] for r in trial["results"]] == [1, 2, 3], number
        # Tune counts a trial's reports since its last restore: trials 1 and 2 waited at the first rung (some
        # 25 s before trial 0 got there) and went on from its checkpoint; whether they got to the second rung
        # first depends on how long that took.
        since_restore = [r["iterations_since_restore"] for r in trial["results"]]
        assert since_restore in ([[1, 2, 3]] if number == 0 else [[1, 1, 1], [1, 1, 2]]), (number, since_restore)
    client, runs, _ = children(sweep_home, "ordered")
    assert len(runs) == 3
    for run in runs:  # each step logged once, none missing, across the waits
        assert assert_each_step_once(client, run) == 3
        assert run.data.tags["stopped_early"] == "false" and "final_test_accuracy" in run.data.metrics


def _nan_sweep(tmp_path: Path) -> Path:
    sweep = light_smoke_sweep()
    sweep["name"] = "nan"
    sweep["space"] = {"alpha": [0.1], "distill.lr_img": [100, 1e30]}  # 1e30 blows the images up
    sweep["asha"]["grace_period"] = 5
    sweep["max_concurrent_trials"] = 1  # two would fit on the test cluster's 2 CPUs
    # No ConvNet among the evaluation nets: the first listed is the trial's headline accuracy.
    sweep["base"]["evaluate"] = {"models": ["mlp", "lenet"], "num_nets": 1, "epochs": 2}
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.slow
def test_diverging_trial_fails_with_its_reason_while_the_other_finishes_on_every_architecture(
        sweep_home, warm_store, ray_cluster, tmp_path):
    result = subprocess.run(sweep_command(_nan_sweep(tmp_path)), capture_output=True, text=True, timeout=900,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    client, trials, _ = children(sweep_home, "nan")
    by_lr = {r.data.params["distill.lr_img"]: r for r in trials}
    assert by_lr["1e+30"].info.status == "FAILED"
    assert "DivergenceError: matching loss is nan" in by_lr["1e+30"].data.tags["failure_reason"]
    assert by_lr["100"].info.status == "FINISHED" and "final_test_accuracy" in by_lr["100"].data.metrics
    # max_concurrent_trials 1 holds for a grid search too: one trial ended before the other began.
    first, second = sorted(trials, key=lambda r: r.info.start_time)
    assert first.info.end_time <= second.info.start_time
    tune = tune_trials(sweep_home, "nan")
    assert_runs_match_their_trials(client, trials, tune, load_sweep(_nan_sweep(tmp_path)))

    # The finished trial reports each evaluation architecture in Tune's results, MLflow and results.csv.
    (finished,) = [t for t in tune.values() if t["params"]["distill.lr_img"] == 100]
    final = finished["results"][-1]
    names = ("final_test_accuracy", "final_test_std", "final_val_accuracy")
    assert {k for k in final if k.startswith(names)} == {
        *names, *(f"{name}/{arch}" for name in names for arch in ("mlp", "lenet"))}
    assert final["final_test_accuracy"] == final["final_test_accuracy/mlp"]
    assert all(0 <= final[f"final_test_accuracy/{arch}"] <= 1 for arch in ("mlp", "lenet"))
    (row,) = [r for r in csv.DictReader((sweep_home / "sweeps" / "nan" / "results.csv").open())
              if r["status"] == "done"]
    for arch in ("mlp", "lenet"):
        for name in ("final_test_accuracy", "final_test_std"):
            key = f"{name}/{arch}"
            assert by_lr["100"].data.metrics[key] == pytest.approx(final[key])
            assert float(row[key]) == pytest.approx(final[key])


INTERRUPTED = "interrupted"  # the interrupted-sweep test's sweep: its name, MLflow experiment and folder
EVALUATIONS = 8  # of each of its trials
LEFT_AT_INTERRUPT = 5  # evaluations a trial running at an interrupt has still to go, at least


def _checkpointed_trials(home: Path) -> set[str]:
    """Trials that Tune's saved experiment state holds a checkpoint for: what a killed driver can resume
    them from. Tune saves that state every TUNE_GLOBAL_CHECKPOINT_S (1 s in this test) or
    every num_to_keep checkpoints, so MLflow (logged as each result arrives) may be ahead of it."""
    states = sorted((home / "sweeps" / INTERRUPTED).glob("experiment_state-*.json"))
    try:
        state = json.loads(states[-1].read_text()) if states else {"trial_data": []}
    except json.JSONDecodeError:  # being rewritten: read again on the next poll
        return set()
    saved = set()
    for _, metadata in state["trial_data"]:
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
        # A result's checkpoint_dir_name is in last_result before Tune registers the checkpoint with the
        # trial's checkpoint manager, and a state saved in between resumes the trial from zero: only the
        # manager counts. It is saved as a cloudpickle blob in hex; its checkpoint folder names are read
        # from the bytes, without unpickling.
        manager = bytes.fromhex(metadata["checkpoint_manager"]["value"])
        if re.search(rb"checkpoint_\d{6}", manager):
            saved.add(metadata["last_result"]["trial_id"])
    return saved


def _interrupt_point(home: Path, before: dict[str, int]) -> tuple[dict[str, int], dict[str, int]] | None:
    """(finished, running) trials as MLflow has them -> their numbers of evaluations, once a trial has
    finished while another is still running with a checkpoint that Tune's saved state records and at
    least LEFT_AT_INTERRUPT evaluations left. `before`: each trial's evaluations at the previous interrupt; only
    trials that finished or made progress since count. The first two trials start together and run in
    step, so when one finishes the other is about to: the running trial this waits for is usually a later one."""
    if not (home / "sweeps" / INTERRUPTED).exists():  # Tune has started: MLflow's tables exist by then
        return None
    client, trials, _ = children(home, INTERRUPTED)
    checkpointed = _checkpointed_trials(home)
    counts = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "val_accuracy")) for r in trials}
    finished = {r.info.run_id: counts[r.info.run_id] for r in trials
                if r.info.status == "FINISHED" and counts[r.info.run_id] > before.get(r.info.run_id, 0)}
    running = {r.info.run_id: counts[r.info.run_id] for r in trials
               if r.info.status == "RUNNING" and r.data.tags["trial_id"] in checkpointed
               and before.get(r.info.run_id, 0) < counts[r.info.run_id] <= EVALUATIONS - LEFT_AT_INTERRUPT}
    return (finished, running) if finished and running else None


def _interrupt(path: Path, home: Path, log_path: Path, stop: signal.Signals, before: dict[str, int]):
    """Start (or resume) the sweep, wait for an interrupt point and send `stop`: the point and the exit status."""
    with open(log_path, "w") as log:  # a file, not a pipe nobody reads: a full pipe blocks the driver
        # Tune saves its state every second, not every 10 s: a trial's checkpoint is in the saved state well
        # within the evaluations it has left.
        driver = subprocess.Popen(sweep_command(path), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"})
        deadline = time.monotonic() + 600
        point = None
        while point is None and time.monotonic() < deadline and driver.poll() is None:
            point = _interrupt_point(home, before)
            time.sleep(0.5)  # polling MLflow for the state the interruption waits for
        assert point, f"no trial finished while another was running with a checkpoint: {log_path.read_text()[-3000:]}"
        driver.send_signal(stop)
        return point, driver.wait(timeout=300)


@pytest.mark.slow
def test_a_sweep_stopped_by_ctrl_c_then_killed_resumes_without_rerunning_or_duplicating(sweep_home, warm_store,
                                                                                        ray_cluster, tmp_path):
    home = sweep_home
    # The smoke sweep's experts, six trials two at a time, and no early stop before a trial's end: a trial
    # running at an interrupt has LEFT_AT_INTERRUPT evaluations left, so it cannot finish (or be stopped by
    # ASHA) in the seconds between the interrupt point and the signal. Light evaluations but the shipped 10
    # inner steps: about a second from one evaluation to the next, some 5 seconds for the signal to land.
    sweep = light_smoke_sweep()
    sweep.update(name=INTERRUPTED, space={"alpha": [0.0, 0.1, 0.2], "ir": [0.5, 0.75]})
    sweep["base"]["distill"].update(iterations=4 * EVALUATIONS, eval_every=4, syn_steps=10)
    sweep["asha"]["grace_period"] = EVALUATIONS
    path = tmp_path / f"{INTERRUPTED}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    folder = home / "sweeps" / INTERRUPTED

    # Ctrl-C: Tune saves its state; the driver says the sweep is partial, in its exit status, MLflow and files.
    (done, running), code = _interrupt(path, home, tmp_path / "ctrl-c.log", signal.SIGINT, {})
    assert code == 130, (tmp_path / "ctrl-c.log").read_text()[-3000:]
    client, trials, parents = children(home, INTERRUPTED)
    (parent,) = parents
    assert parent.info.status == "KILLED" and parent.data.tags["partial"] == "true"
    statuses = {r.info.status for r in trials}
    assert "KILLED" in statuses and "RUNNING" not in statuses, statuses  # the unfinished trials' runs too
    assert "pad_ray.sweep: interrupted: " in (tmp_path / "ctrl-c.log").read_text()
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert {row["partial"] for row in rows} == {"True"} and "unfinished" in {row["status"] for row in rows}
    assert (folder / "best_config.yaml").read_text().startswith("# partial: true")
    assert not (folder / "controls.json").exists()  # an interrupted sweep stops without measuring its controls
    interrupted = [running]

    # Resumed, then killed outright: nothing is saved on the way out and the parent run is left RUNNING.
    before = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "val_accuracy")) for r in trials}
    (done_later, running), code = _interrupt(path, home, tmp_path / "killed.log", signal.SIGKILL, before)
    assert code == -signal.SIGKILL
    assert [p.info.status for p in children(home, INTERRUPTED)[2]] == ["RUNNING"]
    done |= done_later
    interrupted.append(running)

    again = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    client, trials, parents = children(home, INTERRUPTED)
    assert len(trials) == 6 and len({r.data.tags["trial_id"] for r in trials}) == 6
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # the resumed sweep kept its parent run
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["partial"] == "false"
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert all(r.info.status == "FINISHED" for r in trials)
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert {row["partial"] for row in rows} == {"False"} and "unfinished" not in {row["status"] for row in rows}
    assert (folder / "controls.csv").is_file()  # measured once it finished
    evaluations = {r.info.run_id: assert_each_step_once(client, r) for r in trials}  # nothing twice, no gaps
    for run_id, count in done.items():
        assert evaluations[run_id] == count  # not rerun
    tune = tune_trials(home, INTERRUPTED)
    assert_runs_match_their_trials(client, trials, tune, load_sweep(path))
    trial_of = {r.info.run_id: r.data.tags["trial_id"] for r in trials}
    for run_id in set().union(*interrupted):
        # Resumed from its checkpoint after every interrupt it ran through: Tune restored it with evaluations
        # already done, and its first report after each restore continues the iteration count where the
        # checkpoint left it.
        results = tune[trial_of[run_id]]["results"]
        restored = [r for r in results if r["iterations_since_restore"] == 1 and r["training_iteration"] > 1]
        assert len(restored) >= sum(run_id in point for point in interrupted), f"{trial_of[run_id]} started again"
        assert all(r["iteration"] == 4 * r["training_iteration"] for r in restored)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under a folder, by path, with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_edited_rerun_is_refused_before_any_work_unless_resume_or_fresh(sweep_home, warm_store, ray_cluster,
                                                                         tmp_path):
    home = sweep_home
    sweep = light_smoke_sweep()
    sweep.update(name="rerun", space={"alpha": [0.1], "ir": [0.5]})
    sweep["base"]["distill"].update(iterations=8, eval_every=4)
    path = tmp_path / "rerun.yaml"
    path.write_text(yaml.safe_dump(sweep))
    first = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    (first_trial,) = tune_trials(home, "rerun")
    controls = home / "sweeps" / "rerun" / "controls.json"
    measured = controls.read_bytes()
    assert "controls: " in first.stderr  # their bar

    # The edit asks for the IR 0.75 experts, which this store no longer has: a start that trained them shows.
    sweep["space"] = {"alpha": [0.2], "ir": [0.5, 0.75]}
    path.write_text(yaml.safe_dump(sweep))
    cfg = trial_config(load_sweep(path), {"alpha": 0.2, "ir": 0.75})
    experts_075 = Path(TrajectoryStore(cfg.store_dir, cfg).dir)
    shutil.rmtree(experts_075)
    before = _snapshot(home)  # the store, Tune's folder, MLflow's database
    refused = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"pad_ray.sweep: error: {path}: sweep 'rerun' in {home}/sweeps/rerun was started from a different sweep "
        "(changed: space.alpha.values, space.ir.values); pass --resume to continue it as it was started, or "
        "--fresh to start a new sweep (the old folder is moved aside)"]
    assert _snapshot(home) == before

    resumed = subprocess.run(sweep_command(path) + ["--resume"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--resume: continuing sweep 'rerun' as it was started" in resumed.stderr
    assert not experts_075.exists()  # the old space needs no IR 0.75 experts
    assert list(tune_trials(home, "rerun")) == [first_trial]
    assert [row["alpha"] for row in csv.DictReader((home / "sweeps" / "rerun" / "results.csv").open())] == ["0.1"]
    # Its controls were measured once: the same scores again, from the sweep's folder (the file's time changes:
    # a restored Tuner syncs the whole folder back from its staging copy).
    assert controls.read_bytes() == measured and "controls: " not in resumed.stderr  # no task, no bar
    assert "Each top trial against its controls" in resumed.stdout
    _, trials, parents = children(home, "rerun")
    assert len(trials) == 1 and len(parents) == 1 and parents[0].info.status == "FINISHED"

    # Before the new sweep starts, its dry run: IR 0.5's experts cached, IR 0.75's to train, no EL2N (both
    # share the store's difficulty order), and nothing written. A dead Ray address fails the dry run if it
    # so much as tries to start or join Ray.
    store = home / "store"
    experts_before = {p.name for p in (store / "experts").iterdir()}
    difficulty_before = {p.name for p in (store / "difficulty").iterdir()}
    before = _snapshot(home)
    dry = subprocess.run(sweep_command(path) + ["--fresh", "--dry-run"], capture_output=True, text=True, timeout=600,
                         cwd=REPO, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert _snapshot(home) == before  # no store, Tune folder or MLflow database written, nothing moved aside
    listed = dict(re.findall(r"^  ([0-9a-f]{20}) .*?: (cached|to train)", dry.stdout, re.MULTILINE))
    to_train = {key for key, state in listed.items() if state == "to train"}
    cached = {key for key, state in listed.items() if state == "cached"}
    assert to_train == {experts_075.name} and len(cached) == 1 and cached <= experts_before, dry.stdout
    assert "EL2N" not in dry.stdout
    (planned,) = re.findall(r"^trials: (\d+) ", dry.stdout, re.MULTILINE)

    fresh = subprocess.run(sweep_command(path) + ["--fresh"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    # It trained what the dry run said, and only that.
    assert {p.name for p in (store / "experts").iterdir()} - experts_before == to_train
    assert {p.name for p in (store / "difficulty").iterdir()} == difficulty_before
    assert len((home / "sweeps" / "rerun" / "results.csv").read_text().splitlines()) - 1 == int(planned) == 2
    (old,) = (home / "sweeps").glob("rerun.replaced-*")
    assert f"--fresh: moved the earlier sweep to {old}" in fresh.stderr
    # Nothing of the old sweep is lost: its trial and its results moved along.
    assert [json.loads(f.read_text()) for f in old.glob("*/params.json")] == [{"alpha": 0.1, "ir": 0.5}]
    assert (old / "results.csv").is_file()
    new = tune_trials(home, "rerun")
    assert sorted((t["params"]["alpha"], t["params"]["ir"]) for t in new.values()) == [(0.2, 0.5), (0.2, 0.75)]
    _, trials, parents = children(home, "rerun")
    assert len(trials) == 3 and len(parents) == 2  # the new sweep has a parent run of its own

    again = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]  # the same file now resumes the new sweep
    assert tune_trials(home, "rerun").keys() == new.keys()
    assert len(children(home, "rerun")[2]) == 2


def _ended(trial: dict, last_iteration: int) -> bool:
    """Tune writes `done` only for a trial a scheduler stopped; one that ran out reported its last iteration."""
    return bool(trial["results"]) and (trial["results"][-1]["iteration"] == last_iteration
                                       or any(r.get("done") for r in trial["results"]))


@pytest.mark.slow
def test_optuna_sweep_is_interrupted_and_resumes_with_its_study(sweep_home, warm_store, ray_cluster, tmp_path):
    """The shipped TPE sweep, shrunk to the smoke experts: a SIGTERM mid-sweep, then the same command."""
    from ray.tune.search.optuna import OptunaSearch

    from pad_ray.tune_sweep import _param_space

    home = sweep_home
    sweep = yaml.safe_load((REPO / "sweeps" / "mnist-optuna.yaml").read_text())
    smoke = light_smoke_sweep()
    smoke["base"]["distill"].update(iterations=16, eval_every=4)
    sweep.update(name="tpe", num_samples=4, trial_resources={"cpu": 1}, storage_path=smoke["storage_path"],
                 mlflow=smoke["mlflow"], asha={**sweep["asha"], "grace_period": 1}, base=smoke["base"])
    sweep["space"]["distill.syn_steps"] = {"choice": [5, 10]}
    sweep["space"]["ipc"] = {"choice": [1, 2]}  # ASHA's groups, from a sampled choice
    path = tmp_path / "tpe.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert load_sweep(path).search.kind == "optuna" and load_sweep(path).group_by == ("ipc",)

    def one_done_one_running():
        try:
            trials = tune_trials(home, "tpe").values()
        except json.JSONDecodeError:  # Tune is writing a trial's files right now
            return False
        return any(_ended(t, 16) for t in trials) and any(t["results"] and not _ended(t, 16) for t in trials)

    driver, log = start_driver(path, tmp_path / "driver.log")
    try:
        wait_for(one_done_one_running, "a finished trial while the next one has checkpointed", alive=driver)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=300) == 130, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        driver.kill() if driver.poll() is None else None
        log.close()
    before = tune_trials(home, "tpe")
    assert 2 <= len(before) < 4  # suggestions were left for the resumed study to make
    _, trials, (parent,) = children(home, "tpe")
    assert parent.info.status == "KILLED"

    again = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    after = tune_trials(home, "tpe")
    assert len(after) == 4 and before.keys() <= after.keys()
    for trial_id, trial in before.items():
        # No trial ran again from zero: each iteration reported once, finished ones untouched.
        assert [r["iteration"] for r in after[trial_id]["results"]] == [4, 8, 12, 16][:len(after[trial_id]["results"])]
        if _ended(trial, 16):
            assert after[trial_id]["results"] == trial["results"]
    # The study went on where it stopped: the 4 trials are the seeded TPE's first 4 suggestions. A searcher
    # started afresh on resume would have suggested its first configs again.
    resolved = load_sweep(path)
    expected = OptunaSearch(space=_param_space(resolved), metric="val_accuracy", mode="max",
                            seed=trial_config(resolved, finite_grid(resolved)[0]).seed)
    suggested = [expected.suggest(str(i)) for i in range(4)]
    assert [t["params"] for t in sorted(after.values(), key=lambda t: t["number"])] == suggested
    _, trials, parents = children(home, "tpe")
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and parents[0].info.status == "FINISHED"
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    for ipc in {r.data.params["ipc"] for r in trials}:  # ASHA's groups came from the sampled IPCs
        assert (home / "sweeps" / "tpe" / f"best_config_ipc{ipc}.yaml").is_file()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"space": {"ir": {"uniform": [0.5, 0.9]}}}, "space.ir: uniform is a distribution, but schedule.init_ratio"),
        ({"space": {"aee": {"randint": [10, 30]}}}, "space.aee: randint is a distribution"),
        ({"space": {"alpha": {"normal": [0, 1]}}}, "space.alpha.kind"),
        ({"space": {"alpha": [0.5, 1.2]}}, "distill.alpha: Input should be less than 1"),
        ({"space": {"alpha": {"uniform": [0.1, 1.5]}}}, "distill.alpha: Input should be less than 1"),
        ({"space": {"data.dataset": ["cifar10"]}}, "a sweep runs on one dataset"),
        ({"space": {"data.seed": {"randint": [0, 9]}}}, "space.data.seed: randint is a distribution"),
        ({"space": {"experts.seed": {"randint": [0, 9]}}}, "space.experts.seed: randint is a distribution"),
        ({"space": {"repeat": [0, 1]}}, "space.repeat: repeats are num_samples"),
        ({"space": {}}, "space: give at least one key"),
        ({"asha": {"grace": 2}}, "asha.grace: unknown key; did you mean 'grace_period'?"),
        ({"space": {"ipc": 3}}, "space.ipc: expected a list of values"),
        ({"search": {"kind": "bayes"}}, "search.kind: Input should be 'grid', 'random' or 'optuna' (got 'bayes')"),
        ({"search": {"kind": "optuna"}}, "space.alpha: a list is a grid, which search.kind optuna cannot sample; "
                                         "write {choice: [0.0, 0.1, 0.2, 0.3]} or use search.kind grid"),
        ({"search": {"kind": "random"}, "space": {"alpha": {"uniform": [0, 0.3]}, "ir": [0.5]}},
         "space.ir: a list is a grid, which search.kind random cannot sample"),
        ({"search": {"max_concurrent": 2}}, "search.max_concurrent: only search.kind optuna takes it"),
        ({"search": {"kind": "optuna", "max_concurrent": 0}}, "search.max_concurrent: Input should be greater than"),
        ({"search": {"seed": "one"}}, "search.seed: Input should be a valid integer"),
    ],
)
def test_bad_sweeps_are_rejected_with_the_key(tmp_path, change, expected):
    sweep = yaml.safe_load(SMOKE.read_text())
    sweep.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_repeats_differ_only_in_their_distillation_seed(tmp_path):
    sweep = yaml.safe_load(SMOKE.read_text())
    sweep["space"] = {"data.seed": [4, 5], "experts.seed": [6], "seed": {"randint": [0, 100]}}
    sweep["num_samples"] = 3
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(sweep))
    sweep = load_sweep(path)
    assert sweep.trial_keys == ("data.seed", "experts.seed", "seed", "repeat")
    params = {"data.seed": 5, "experts.seed": 6, "seed": 40}
    first, second, third = (trial_config(sweep, {**params, "repeat": r}) for r in range(3))
    assert first == trial_config(sweep, params)  # repeat 0 is the config as written
    assert (first.seed, second.seed, third.seed) == (40, derive_seed(40, "repeat", 1), derive_seed(40, "repeat", 2))
    assert len({first.seed, second.seed, third.seed}) == 3
    assert trial_config(sweep, {**params, "repeat": 2}).seed == third.seed  # derived from the config alone
    # What the store holds is shared by the repeats, and each split seed is its own expert set.
    assert {TrajectoryStore(c.store_dir, c).key for c in (first, second, third)} == {TrajectoryStore(
        first.store_dir, first).key}
    assert (first.data.seed, first.experts.seed) == (5, 6)
    other = trial_config(sweep, {**params, "data.seed": 4})
    assert TrajectoryStore(other.store_dir, other).key != TrajectoryStore(first.store_dir, first).key


def test_bad_sweep_exits_2_before_any_work(tmp_path, sweep_home):
    home = sweep_home
    path = tmp_path / "bad.yaml"
    path.write_text(SMOKE.read_text().replace("alpha: [0.0, 0.1, 0.2, 0.3]", "alpha: [0.0, 7]"))
    # `python -m pad_ray.sweep` as runpy runs it, then which of torch, Ray and MLflow it had imported: none,
    # so that a typo is answered at once.
    probe = ("import runpy, sys\ntry:\n    runpy.run_module('pad_ray.sweep', run_name='__main__')\nfinally:\n"
             "    print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"pad_ray.sweep: error: {path}: trial {{'alpha': 7, 'ir': 0.5}}: "
                                                   "distill.alpha: Input should be less than 1 (got 7)"]
    assert result.stdout.strip() == "[]"
    assert not home.exists()


def test_shipped_sweeps_validate(monkeypatch, mnist_root):
    monkeypatch.setenv("PAD_RAY_DATA", str(mnist_root))
    assert load_sweep(REPO / "sweeps" / "mnist-optuna.yaml").search.kind == "optuna"
    assert load_sweep(SMOKE).search.kind == "grid"
    searched = {}
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path)
        searched[path.stem] = set(sweep.space)
        assert sweep.total_trials > 1, path
    # The dataset sweeps search PAD's four axes; the others name what they search for a reason.
    for name in ("cifar10", "cifar100", "tinyimagenet", "mnist"):
        assert searched[name] == {"ipc", "alpha", "ir", "aee"}, name
    assert searched["smoke"] == {"alpha", "ir"}


def _seed_sweep(tmp_path: Path) -> Path:
    """Two split seeds, two repeats each: the smallest sweep that trains its own stores."""
    sweep = yaml.safe_load(SMOKE.read_text())
    sweep["name"] = "seeds"
    sweep["base"].update({
        "data": {**sweep["base"]["data"], "train_per_class": 12, "test_size": 50},
        "model": {"width": 8},
        "difficulty": {"seeds": 1, "epochs": 1},
        "schedule": {"add_end_epoch": 1, "remove": []},
        "experts": {"num_experts": 1, "epochs": 2},
        "distill": {"iterations": 2, "eval_every": 2, "syn_steps": 2, "expert_epochs": 1,
                    "current_max_start_epoch": 1, "max_start_epoch": 1},
        "evaluate": {"num_nets": 1, "epochs": 2},
        "resources": {"workers": 1},
    })
    sweep["space"] = {"data.seed": [1, 2]}
    sweep["num_samples"] = 2
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.slow
def test_a_seed_sweep_stores_one_expert_set_per_split_and_repeats_differ(sweep_home, ray_cluster, tmp_path):
    path = _seed_sweep(tmp_path)
    result = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]

    # Each split seed's difficulty order and experts are what a single run with that seed stores.
    single = tmp_path / "single"
    sweep = load_sweep(path, {"base": {"store_dir": str(single)}})
    keys = {}
    for params in finite_grid(sweep):
        cfg = trial_config(sweep, params)
        data = local_stages.load_data(cfg)
        order = local_stages.difficulty_order(cfg, data, torch.device("cpu"), progress=False)
        local_stages.ensure_experts(cfg, data, order, torch.device("cpu"), progress=False)
        keys[params["data.seed"]] = TrajectoryStore(cfg.store_dir, cfg).key
    assert store_checksums(sweep_home / "store") == store_checksums(single)
    assert len(list((single / "experts").iterdir())) == 2 and len(list((single / "difficulty").glob("*.npz"))) == 2
    sets = {seed: TrajectoryStore(single, trial_config(sweep, {"data.seed": seed})) for seed in keys}
    assert {seed: s.identity["data"]["seed"] for seed, s in sets.items()} == {1: 1, 2: 2}
    assert not np.array_equal(sets[1].load(0), sets[2].load(0))

    client, trials, _ = children(sweep_home, "seeds")
    tune = tune_trials(sweep_home, "seeds")
    assert sorted((p["params"]["data.seed"], p["params"]["repeat"]) for p in tune.values()) == [
        (1, 0), (1, 1), (2, 0), (2, 1)]
    repeat_seeds = {"0": "0", "1": str(derive_seed(0, "repeat", 1))}
    for seed in (1, 2):
        runs = {r.data.params["repeat"]: r for r in trials if r.data.params["data.seed"] == str(seed)}
        assert set(runs) == {"0", "1"}
        for repeat, run in runs.items():
            assert run.info.status == "FINISHED" and "final_test_accuracy" in run.data.metrics
            assert run.data.tags["expert_store_key"] == keys[seed]  # its own split's experts
            assert run.data.params["config.seed"] == repeat_seeds[repeat]
        images = [np.load(client.download_artifacts(runs[r].info.run_id, "synthetic_best.npz"))["images"]
                  for r in ("0", "1")]
        assert images[0].shape == images[1].shape and not np.array_equal(*images)
    with open(sweep_home / "sweeps" / "seeds" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["data.seed"], row["repeat"], row["seed"]) for row in rows) == [
        (str(s), r, repeat_seeds[r]) for s in (1, 2) for r in ("0", "1")]
