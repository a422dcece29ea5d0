"""Faults on a real local Ray with real MLflow: a killed trial process, an MLflow outage, planted files."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import free_ports, light_smoke_sweep, start_driver, start_mlflow_server, tiny_config, wait_for
from pad_ray import files, local_stages
from pad_ray.config import deep_merge
from pad_ray.evaluate import SyntheticSet
from pad_ray.trajectories import TrajectoryStore

REPO = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())




def _write_sweep(tmp_path: Path, **changes) -> Path:
    sweep = {**SMOKE, **changes}
    path = tmp_path / f"{sweep['name']}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _results(home: Path, name: str) -> list[list[dict]]:
    """Every trial's reported results, from Tune's result files."""
    out = []
    for result_file in (home / "sweeps" / name).glob("*/result.json"):
        lines = [line for line in result_file.read_text().splitlines() if line.strip()]
        out.append([json.loads(line) for line in lines])
    return out


@pytest.mark.slow
def test_killed_trial_process_resumes_from_its_last_checkpoint(sweep_home, warm_store, ray_cluster_with_dashboard,
                                                                tmp_path):
    home, cluster = sweep_home, ray_cluster_with_dashboard
    light = light_smoke_sweep()["base"]
    sweep = _write_sweep(tmp_path, name="kill", space={"alpha": [0.1]},
                         base=deep_merge(light, {"distill": {"iterations": 40, "eval_every": 4}}),
                         asha={"grace_period": 10}, max_failures=2)
    driver, log = start_driver(sweep, tmp_path / "driver.log")
    try:
        wait_for(lambda: any(len(r) >= 3 for r in _results(sweep_home, "kill")), "three checkpointed evaluations",
                 alive=driver)
        # This test's trial actor, from the state API of this test's cluster: nobody else's process.
        (trial_pid,) = cluster.actor_pids("ImplicitFunc")
        assert trial_pid in {p.pid for p in cluster.processes()}
        os.kill(trial_pid, signal.SIGKILL)
        assert driver.wait(timeout=900) == 0
    finally:
        driver.kill() if driver.poll() is None else None
        log.close()

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("kill").experiment_id])
              if "trial_id" in r.data.tags]
    assert run.info.status == "FINISHED" and "final_test_accuracy" in run.data.metrics
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    # Resumed from a checkpoint, not from zero: no evaluation was reported twice, none is missing.
    assert sorted(steps) == list(range(4, 44, 4))
    assert "failures" in (tmp_path / "driver.log").read_text()


def _steps_once(client, run_id: str, key: str) -> list[int]:
    steps = [m.step for m in client.get_metric_history(run_id, key)]
    assert len(steps) == len(set(steps)), f"{key} logged twice at some step: {sorted(steps)}"
    return sorted(steps)


def _without_ray_actor_exit_noise(output: str) -> str:
    """The output less what a finished trial's actor may print when Ray stops it: the SIGTERM lands while
    the interpreter runs a weakref callback, and the SystemExit of Ray's handler is reported as "Exception
    ignored in ...". Ray's message, not pad_ray's; every other traceback stays."""
    lines, kept, i = output.splitlines(keepends=True), [], 0
    while i < len(lines):
        prefix, found, _ = lines[i].partition("Exception ignored in: <function WeakSet")
        if found:
            last = f"{prefix}SystemExit: 1"
            end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip("\n") == last), None)
            if end is not None and all(line.startswith(prefix) for line in lines[i:end + 1]) and any(
                    "in sigterm_handler" in line for line in lines[i:end]):
                i = end + 1
                continue
        kept.append(lines[i])
        i += 1
    return "".join(kept)


def _first_results(home: Path, name: str) -> list[list[dict]]:
    """Each trial's reported results, in the order the trials first reported."""
    return sorted((r for r in _results(home, name) if r), key=lambda reported: reported[0]["timestamp"])


@pytest.mark.slow
def test_mlflow_outage_recovers_then_lasts_until_the_end_and_a_rerun_logs_what_was_held(
        sweep_home, warm_store, ray_cluster, tmp_path):
    """Two trials, one at a time, one MLflow server. It goes down during trial A and comes back: the same
    run logs what it held. It goes down again during trial B and stays down: the sweep says so in one line
    naming B alone, Tune's results keep every metric, and the same command with the server back logs the rest."""
    (port,) = free_ports(1)
    server = start_mlflow_server(sweep_home, port)
    sweep = _write_sweep(tmp_path, name="outage", space={"alpha": [0.0, 0.1]}, asha={"grace_period": 5},
                         max_concurrent_trials=1, mlflow={"tracking_uri": f"http://127.0.0.1:{port}"})
    held = sweep_home / "sweeps" / "outage" / "mlflow_held.json"
    log_path = tmp_path / "driver.log"
    driver, log = start_driver(sweep, log_path)
    try:
        wait_for(lambda: _first_results(sweep_home, "outage"), "trial A's first result", alive=driver)
        server.terminate()
        server.wait(timeout=60)
        wait_for(lambda: sum(map(len, _first_results(sweep_home, "outage"))) >= 3, "results during the outage",
                 alive=driver)
        server = start_mlflow_server(sweep_home, port)
        wait_for(lambda: "is back; held updates logged" in log_path.read_text()
                 and len(_first_results(sweep_home, "outage")) == 2,
                 "the held updates logged, then trial B's first result", alive=driver)
        server.terminate()
        server.wait(timeout=60)
        assert driver.wait(timeout=900) == 0
    finally:
        driver.kill() if driver.poll() is None else None
        log.close()
        server.kill() if server.poll() is None else None
    output = log_path.read_text()
    assert "holding updates" in output
    assert "Traceback" not in _without_ray_actor_exit_noise(output)
    (said,) = [line for line in output.splitlines() if "still unreachable" in line]  # one line says so
    assert said.startswith(f"pad_ray.sweep: error: MLflow at http://127.0.0.1:{port} is still unreachable; ")
    trial_a, trial_b = (reported[0]["trial_id"] for reported in _first_results(sweep_home, "outage"))
    assert "of 1 trials" in said and trial_b in said and trial_a not in said  # A's updates were logged on recovery
    assert str(held) in said and "rerun the same command" in said and held.is_file()
    # Tune's results keep every metric of both trials: all five evaluations, every iteration's loss.
    for reported in _first_results(sweep_home, "outage"):
        assert [r["iteration"] for r in reported] == [4, 8, 12, 16, 20]
        assert all("val_accuracy" in r for r in reported) and "final_test_accuracy" in reported[-1]
        assert sorted(s["iteration"] for r in reported for s in r["steps"]) == list(range(1, 21))

    # The same command with the server back: the held updates reach MLflow, and every metric is there once.
    server = start_mlflow_server(sweep_home, port)
    try:
        again = subprocess.run([sys.executable, "-m", "pad_ray.sweep", str(sweep)], cwd=REPO, capture_output=True,
                               text=True, timeout=900)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "updates held by an earlier run of this sweep" in again.stderr
        assert not held.exists()
        client = MlflowClient(f"http://127.0.0.1:{port}")
        runs = [r for r in client.search_runs([client.get_experiment_by_name("outage").experiment_id])
                if "trial_id" in r.data.tags]
        assert sorted(r.data.tags["trial_id"] for r in runs) == sorted([trial_a, trial_b])
        for run in runs:
            assert run.info.status == "FINISHED" and "final_test_accuracy" in run.data.metrics
            assert _steps_once(client, run.info.run_id, "val_accuracy") == [4, 8, 12, 16, 20]
            assert _steps_once(client, run.info.run_id, "step_loss") == list(range(1, 21))
            assert {"synthetic_best.npz", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        server.terminate()
        server.wait(timeout=60)


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['PLANT_MARKER'])}",))


def test_malicious_pickle_planted_as_a_trajectory_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PLANT_MARKER", str(marker))
    cfg = tiny_config(tmp_path)
    store = TrajectoryStore(cfg.store_dir, cfg)
    store.save(0, np.zeros((3, 4), dtype=np.float32))
    array_path, sidecar = store._paths(0)
    Path(array_path).write_bytes(pickle.dumps(_Planted()))
    # Even with a sidecar forged to match, the file is not a plain array and is never unpickled.
    files.write_json(sidecar, {"sha256": files.sha256(array_path), "shape": [3, 4], "resumed_at": []})
    with pytest.raises(files.IntegrityError, match="not a plain-array file"):
        store.load(0)
    assert not marker.exists()


def test_altered_or_truncated_distilled_set_is_never_used(tmp_path):
    path = tmp_path / "synthetic_best.npz"
    local_stages.save_synthetic(path, SyntheticSet(torch.randn(4, 1, 8, 8), torch.randn(4, 3), 0.01))
    assert local_stages.load_synthetic(path).images.shape == (4, 1, 8, 8)
    original = path.read_bytes()
    for damaged in (original[:-64], original[:200] + bytes([original[200] ^ 1]) + original[201:]):
        path.write_bytes(damaged)
        with pytest.raises(files.IntegrityError, match="checksum mismatch"):
            local_stages.load_synthetic(path)
