"""The sweep on a real local Ray and a real MLflow sqlite store, run as users run it."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pad_ray.config import ConfigError, build_config
from pad_ray.sweep_config import load_sweep

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "sweeps" / "smoke.yaml"




def sweep_command(path: Path) -> list[str]:
    return [sys.executable, "-m", "pad_ray.sweep", str(path)]


def children(home: Path, experiment: str = "smoke"):
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    trials = [r for r in runs if "trial_id" in r.data.tags]
    parents = [r for r in runs if "trial_id" not in r.data.tags and "expert_set" not in r.data.tags]
    return client, trials, parents


def test_smoke_sweep_runs_trials_with_early_stopping_and_mlflow(sweep_home):
    home = sweep_home
    result = subprocess.run(sweep_command(SMOKE), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]

    client, trials, parents = children(sweep_home)
    assert len(trials) == 8 and len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    for run in trials:
        assert {"ipc", "alpha", "ir", "aee"} <= set(run.data.params)
        assert run.data.params["config.distill.syn_steps"] == "10"
        assert run.info.status == "FINISHED"
        losses = client.get_metric_history(run.info.run_id, "step_loss")
        accuracies = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert len(losses) == 4 * len(accuracies) > 0  # every iteration, and an evaluation every 4
        assert {"synthetic.png", "synthetic_best.npz", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    stopped = [r for r in trials if r.data.tags["stopped_early"] == "true"]
    finished = [r for r in trials if "final_test_accuracy" in r.data.metrics]
    assert stopped, "ASHA stopped no trial early"
    assert finished and all(r.data.tags["stopped_early"] == "false" for r in finished)

    out = home / "sweeps" / "smoke"
    assert len((out / "results.csv").read_text().strip().splitlines()) == 9
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert build_config(best).preset == "smoke"
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"results.csv", "best_config.yaml", "accuracy_vs_alpha.png"} <= logged


def test_two_ipcs_stop_early_only_within_their_ipc_and_each_gets_its_best_config(sweep_home, tmp_path):
    sweep = yaml.safe_load(SMOKE.read_text())
    sweep["name"] = "ipcs"
    sweep["space"] = {"ipc": [1, 2], "alpha": [0.0, 0.1, 0.2, 0.3]}
    sweep["base"]["distill"] = {"iterations": 8, "eval_every": 4}
    path = tmp_path / "ipcs.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]

    _, trials, _ = children(sweep_home, "ipcs")
    out = sweep_home / "sweeps" / "ipcs"
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [row["ipc"] for row in table] == ["1"] * 4 + ["2"] * 4  # ranked within each IPC
    for ipc in (1, 2):
        runs = [r for r in trials if r.data.params["ipc"] == str(ipc)]
        # Each IPC has its own rungs: one trial of each runs to the end, the weakest are cut.
        assert any("final_test_accuracy" in r.data.metrics for r in runs), ipc
        assert any(r.data.tags["stopped_early"] == "true" for r in runs), ipc
        rows = [row for row in table if row["ipc"] == str(ipc)]
        scores = [float(row["best_val_accuracy"]) for row in rows if row["best_val_accuracy"]]
        assert scores == sorted(scores, reverse=True)
        best = yaml.safe_load((out / f"best_config_ipc{ipc}.yaml").read_text())
        assert best["distill"]["ipc"] == ipc and best["distill"]["alpha"] == float(rows[0]["alpha"])
    assert not (out / "best_config.yaml").exists()


def _nan_sweep(tmp_path: Path) -> Path:
    sweep = yaml.safe_load(SMOKE.read_text())
    sweep["name"] = "nan"
    sweep["space"] = {"alpha": [0.1], "distill.lr_img": [100, 1e30]}  # 1e30 blows the images up
    sweep["asha"]["grace_period"] = 5
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_diverging_trial_fails_with_its_reason_while_the_others_finish(sweep_home, tmp_path):
    result = subprocess.run(sweep_command(_nan_sweep(tmp_path)), capture_output=True, text=True, timeout=900,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    _, trials, _ = children(sweep_home, "nan")
    by_lr = {r.data.params["distill.lr_img"]: r for r in trials}
    assert by_lr["1e+30"].info.status == "FAILED"
    assert "DivergenceError: matching loss is nan" in by_lr["1e+30"].data.tags["failure_reason"]
    assert by_lr["100"].info.status == "FINISHED" and "final_test_accuracy" in by_lr["100"].data.metrics


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(sweep_home, tmp_path, stop):
    home = sweep_home
    log = open(tmp_path / "driver.log", "w")  # a file, not a pipe nobody reads: a full pipe blocks the driver
    driver = subprocess.Popen(sweep_command(SMOKE), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    done_before: dict[str, int] = {}
    while not done_before and time.monotonic() < deadline and driver.poll() is None:
        if (home / "sweeps" / "smoke").exists():  # Tune has started: MLflow's tables exist by then
            client, trials, _ = children(sweep_home)
            done_before = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "step_loss"))
                           for r in trials if r.info.status == "FINISHED"}
        time.sleep(0.5)  # polling MLflow for a finished trial, the event the interruption waits for
    assert done_before, "no trial finished before the sweep ended"
    driver.send_signal(stop)
    driver.wait(timeout=300)
    log.close()
    _, trials, _ = children(sweep_home)
    assert len(trials) < 8 or any(r.info.status == "RUNNING" for r in trials), "sweep was not interrupted"

    again = subprocess.run(sweep_command(SMOKE), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    client, trials, parents = children(sweep_home)
    assert len(trials) == 8 and len({r.data.tags["trial_id"] for r in trials}) == 8
    assert len(parents) == 2  # one per invocation
    for run_id, steps in done_before.items():
        assert len(client.get_metric_history(run_id, "step_loss")) == steps  # not rerun
    assert all(r.info.status == "FINISHED" for r in trials)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"space": {"ir": {"uniform": [0.5, 0.9]}}}, "space.ir: uniform is a distribution, but schedule.init_ratio"),
        ({"space": {"aee": {"randint": [10, 30]}}}, "space.aee: randint is a distribution"),
        ({"space": {"alpha": {"normal": [0, 1]}}}, "space.alpha.kind"),
        ({"space": {"alpha": [0.5, 1.2]}}, "distill.alpha: Input should be less than 1"),
        ({"space": {"alpha": {"uniform": [0.1, 1.5]}}}, "distill.alpha: Input should be less than 1"),
        ({"space": {"data.dataset": ["cifar10"]}}, "a sweep runs on one dataset"),
        ({"space": {}}, "space: give at least one key"),
        ({"asha": {"grace": 2}}, "asha.grace: unknown key; did you mean 'grace_period'?"),
        ({"space": {"ipc": 3}}, "space.ipc: expected a list of values"),
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


def test_bad_sweep_exits_2_before_any_work(tmp_path, sweep_home):
    home = sweep_home
    path = tmp_path / "bad.yaml"
    path.write_text(SMOKE.read_text().replace("alpha: [0.0, 0.1, 0.2, 0.3]", "alpha: [0.0, 7]"))
    result = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"pad_ray.sweep: error: {path}: trial {{'alpha': 7, 'ir': 0.5}}: "
                                                   "distill.alpha: Input should be less than 1 (got 7)"]
    assert not home.exists()


def test_shipped_sweeps_validate(monkeypatch, mnist_root):
    monkeypatch.setenv("PAD_RAY_DATA", str(mnist_root))
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path)
        assert {"ipc", "alpha", "ir", "aee"} & set(sweep.space), path


def test_ray_job_submit_runs_the_smoke_sweep(sweep_home, tmp_path):
    """`ray job submit --working-dir .` against a local head: the copied working dir changes nothing."""
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8299", "RAY_AUTH_MODE": "token"}
    start = subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", "--port=6399", "--include-dashboard=true",
                            "--dashboard-host=127.0.0.1", "--dashboard-port=8299", "--disable-usage-stats"],
                           capture_output=True, text=True, timeout=180, env=env)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        job = subprocess.run([ray_bin, "job", "submit", "--working-dir", ".", "--", "python", "-m", "pad_ray.sweep",
                              "sweeps/smoke.yaml"], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, (job.stdout + job.stderr)[-3000:]
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)
    _, trials, _ = children(sweep_home)
    assert len(trials) == 8  # written where PAD_RAY_HOME says, not inside the copied working dir
