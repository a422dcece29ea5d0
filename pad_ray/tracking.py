"""MLflow for sweeps: one experiment per sweep, a parent run per invocation, one child run per trial.

A Tune callback on the driver does the logging, in one `log_batch` call per reported result (the
built-in callback logs metric by metric, about five times slower) and finds a trial's run by its
`trial_id` tag, so a resumed sweep keeps logging into the same run instead of opening a duplicate.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback

from pad_ray.config import ConfigError, SweepConfig, to_dict, trial_config

# Reported values that are bookkeeping, not metrics.
_NOT_METRICS = {"steps", "iteration", "done", "trial_id", "experiment_tag", "date", "hostname", "node_ip",
                "pid", "timestamp", "config", "time_this_iter_s", "time_total_s", "time_since_restore",
                "iterations_since_restore", "training_iteration", "should_checkpoint", "checkpoint_dir_name"}
_PER_STEP = ("loss", "skipped", "syn_lr", "start_epoch")
_MAX_METRICS = 1000  # MLflow's limit per log_batch call


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path absolute: trial processes and later commands run elsewhere."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri.removeprefix(prefix)).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking server must answer its health check before any compute starts
    (MLflow's own client would retry for minutes)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s) as response:
            response.read()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"mlflow.tracking_uri: cannot reach {tracking_uri} ({reason})") from None


def open_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, created on first use (sqlite stores get artifacts beside the database)."""
    try:
        found = client.get_experiment_by_name(name)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the store is the same user error
        raise ConfigError(f"mlflow.tracking_uri: cannot reach {tracking_uri}: {str(exc).splitlines()[0]}") from None
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


class MlflowSweepCallback(Callback):
    """Tune pickles its callbacks with the experiment so that a restored sweep gets them back: this
    one keeps only plain settings and opens its client lazily. The parent run is read from the
    environment because each invocation (including a resume) opens its own."""

    def __init__(self, tracking_uri: str, experiment_id: str, sweep_name: str, parent_env: str, max_t: int,
                 sweep: dict[str, Any]):
        self.tracking_uri, self.experiment_id, self.sweep_name = tracking_uri, experiment_id, sweep_name
        self.parent_env, self.max_t, self.sweep = parent_env, max_t, sweep
        self._client: MlflowClient | None = None
        self.runs: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "runs": {}}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.trial_id = '{trial.trial_id}' and tags.sweep = '{self.sweep_name}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            cfg = trial_config(SweepConfig.model_validate(self.sweep), trial.config)
            resolved = to_dict(cfg)
            run = self.client.create_run(self.experiment_id, tags={
                MLFLOW_PARENT_RUN_ID: os.environ[self.parent_env], MLFLOW_RUN_NAME: str(trial),
                "trial_id": trial.trial_id, "sweep": self.sweep_name})
            run_id = run.info.run_id
            pad = {"ipc": cfg.distill.ipc, "alpha": cfg.distill.alpha, "ir": cfg.schedule.init_ratio,
                   "aee": cfg.schedule.add_end_epoch}
            params = {**{f"config.{k}": v for k, v in flat_params(resolved).items()},
                      **{k: str(v) for k, v in {**pad, **trial.config}.items()}}
            self._batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        self.runs[trial.trial_id] = run_id
        return run_id

    def _batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        """As few `log_batch` calls as MLflow's limits allow (100 params, 1000 metrics per call)."""
        metrics, params = list(metrics), list(params)
        for start in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[start:start + 100])
        for start in range(0, len(metrics), _MAX_METRICS):
            self.client.log_batch(run_id, metrics=metrics[start:start + _MAX_METRICS])
        if tags:
            self.client.log_batch(run_id, tags=list(tags))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.client.update_run(self.run_id(trial), status=RunStatus.to_string(RunStatus.RUNNING))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        now = int(time.time() * 1000)
        step = int(result.get("iteration", result.get("training_iteration", 0)))
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        for stats in result.get("steps", []):
            metrics += [Metric(f"step_{k}", float(stats[k]), now, int(stats["iteration"])) for k in _PER_STEP]
        self._batch(self.run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        stopped_early = (trial.last_result or {}).get("training_iteration", 0) < self.max_t
        checkpoint = trial.checkpoint
        if checkpoint is not None:
            for path in sorted(Path(checkpoint.path).iterdir()):
                if path.suffix in (".png", ".npz", ".json", ".yaml"):
                    self.client.log_artifact(run_id, str(path))
        self._batch(run_id, tags=[RunTag("stopped_early", str(stopped_early).lower())])
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        reason = _error_reason(trial)
        self._batch(run_id, tags=[RunTag("failure_reason", reason[:5000])])
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def _error_reason(trial) -> str:
    """The last line of the trial's error (e.g. `DivergenceError: matching loss is nan at iteration 3`)."""
    error_file = getattr(trial, "error_file", None)
    if error_file and Path(error_file).is_file():
        lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
        for line in reversed(lines):
            if "Error" in line or "Exception" in line:
                return line.strip()
        if lines:
            return lines[-1].strip()
    return "trial failed (no error file)"
