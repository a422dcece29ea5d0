"""MLflow for sweeps: one experiment per sweep, one parent run per sweep (kept across resumes), one child
run per trial.

A Tune callback on the driver does the logging, in one `log_batch` call per reported result (the
built-in callback logs metric by metric, about five times slower) and finds a trial's run by its
`trial_id` tag, so a resumed sweep keeps logging into the same run instead of opening a duplicate.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from PIL import Image
from ray.tune import Callback

from pad_ray import files
from pad_ray.config import ConfigError, RunConfig, to_dict
from pad_ray.runtime import software
from pad_ray.scheduling import group_key
from pad_ray.sweep_config import SweepConfig, trial_config
from pad_ray.trajectories import ExpertQuality

# Reported values that are bookkeeping, not metrics.
_NOT_METRICS = {"steps", "expert_store_key", "iteration", "done", "trial_id", "experiment_tag", "date", "hostname",
                "node_ip", "pid", "timestamp", "config", "time_this_iter_s", "time_total_s", "time_since_restore",
                "iterations_since_restore", "training_iteration", "should_checkpoint", "checkpoint_dir_name"}
_PER_STEP = ("loss", "skipped", "clipped", "grad_norm", "syn_lr", "start_epoch")
_EVALUATION_METRIC = "val_accuracy"  # reported at every evaluation, stepped by iteration
_TAGS = ("expert_store_key",)  # reported strings that become tags of the trial's run
_MAX_METRICS = 1000  # MLflow's limit per log_batch call
# MLflow 3's UI opens an experiment without this tag on its GenAI overview ("Traces 0") instead of the runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
_PAD_AXES = ("ipc", "alpha", "ir", "aee")


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
        for key, value in EXPERIMENT_KIND.items():
            if key not in found.tags:  # made by an older pad_ray or by hand
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def ui_link(tracking_uri: str, experiment_id: str) -> str:
    """Where a person sees the sweep: the experiment's runs (`workflowType` keeps MLflow 3's UI off its
    GenAI pages), on the tracking server or on a local `mlflow ui` over the same store."""
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}, then http://127.0.0.1:5000/{page}"


def trial_run_name(cfg: RunConfig, params: dict[str, Any]) -> str:
    """`ipc10 alpha0.25 ir0.5 aee20`, then any other swept value by its last key part, so that MLflow's
    runs table reads without opening each run."""
    values = {"ipc": cfg.distill.ipc, "alpha": cfg.distill.alpha, "ir": cfg.schedule.init_ratio,
              "aee": cfg.schedule.add_end_epoch}
    values.update((key.rsplit(".", 1)[-1], value) for key, value in params.items() if key not in _PAD_AXES)
    return " ".join(f"{name}{value:g}" if isinstance(value, float) else f"{name}{value}"
                    for name, value in values.items())


def reopen_parent(client: MlflowClient, run_id: str | None) -> str | None:
    """The parent run of an earlier start of this sweep, running again; None when there is none (or it
    was deleted from MLflow), and a new parent is made."""
    if run_id is None:
        return None
    try:
        if client.get_run(run_id).info.lifecycle_stage != "active":
            return None
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    except MlflowException:
        return None
    return run_id


def end_parent(client: MlflowClient, run_id: str, partial: bool) -> None:
    """FINISHED, or KILLED with a `partial` tag when trials did not finish; so are their unfinished runs."""
    client.set_tag(run_id, "partial", str(partial).lower())
    if not partial:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        return
    killed = RunStatus.to_string(RunStatus.KILLED)
    experiment_id = client.get_run(run_id).info.experiment_id
    for child in client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}' and "
                                                     "attributes.status = 'RUNNING'"):
        client.set_terminated(child.info.run_id, killed)
    client.set_terminated(run_id, killed)


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def log_expert_set(client: MlflowClient, experiment_id: str, sweep_name: str, cfg: RunConfig,
                   quality: ExpertQuality) -> str:
    """One run per expert set (found again by its store key): per-epoch loss and validation accuracy of
    each expert, and the set's mean final accuracies, so weak experts show up beside the trials."""
    found = client.search_runs([experiment_id], f"tags.expert_set = '{quality.key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run_id = client.create_run(experiment_id, run_name=(
        f"experts ir{cfg.schedule.init_ratio:g} aee{cfg.schedule.add_end_epoch} {quality.key[:8]}"),
        tags={"expert_set": quality.key, "sweep": sweep_name}).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(name, float(value), now, 0) for name, value in quality.summary().items()]
    for i, expert in enumerate(quality.experts):
        for name in ("loss", "val_accuracy"):
            metrics += [Metric(f"expert_{i}/{name}", float(v), now, epoch + 1)
                        for epoch, v in enumerate((expert or {}).get(name, []))]
    params = {"num_experts": len(quality.experts), "ir": cfg.schedule.init_ratio,
              "aee": cfg.schedule.add_end_epoch, "data.seed": cfg.data.seed,
              **flat_params({"experts": to_dict(cfg.experts), "schedule": to_dict(cfg.schedule)})}
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    for start in range(0, len(metrics), _MAX_METRICS):
        client.log_batch(run_id, metrics=metrics[start:start + _MAX_METRICS])
    client.set_terminated(run_id)
    return run_id


def describe_sweep(client: MlflowClient, run_id: str, sweep: SweepConfig, fingerprint: str = "") -> None:
    """The parent run holds what the sweep was: its resolved file, its search space as params, and the
    software (and its fingerprint when known), so a run in the UI can be told apart from a rerun."""
    resolved = sweep.model_dump(mode="json")
    params = {f"space.{key}": json.dumps(axis) for key, axis in resolved["space"].items()}
    params.update(num_samples=sweep.num_samples, group_by=",".join(sweep.group_by), asha_metric=sweep.asha.metric)
    versions = software()
    tags = {"git_commit": versions.pop("git_commit") or "unknown",
            **{f"version.{package}": found or "not installed" for package, found in versions.items()},
            **({"sweep_fingerprint": fingerprint} if fingerprint else {})}
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sweep.yaml"
        path.write_text(yaml.safe_dump(resolved, sort_keys=False))
        client.log_artifact(run_id, str(path))


@dataclass
class _Update:
    """One logging event, as plain data, so it can wait while the tracking server is away."""

    trial_id: str
    trial_name: str
    config: dict[str, Any]
    kind: str  # start | result | complete | error
    payload: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        payload = dict(self.payload)
        if "metrics" in payload:
            payload["metrics"] = [[m.key, m.value, m.timestamp, m.step] for m in payload["metrics"]]
        if "tags" in payload:
            payload["tags"] = [[t.key, t.value] for t in payload["tags"]]
        return {"trial_id": self.trial_id, "trial_name": self.trial_name, "config": self.config,
                "kind": self.kind, "payload": payload}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Update:
        payload = dict(data["payload"])
        if "metrics" in payload:
            payload["metrics"] = [Metric(k, v, t, s) for k, v, t, s in payload["metrics"]]
        if "tags" in payload:
            payload["tags"] = [RunTag(k, v) for k, v in payload["tags"]]
        return cls(data["trial_id"], data["trial_name"], data["config"], data["kind"], payload)


class MlflowSweepCallback(Callback):
    """Tune pickles its callbacks with the experiment so that a restored sweep gets them back: this
    one keeps only plain settings and updates and opens its client lazily. The parent run is read
    from the environment: the driver settles it at each start (on a resume, the one first recorded).

    Updates are applied in order; while the server cannot be reached they are held and retried at
    the next event, so a trial's metrics reach MLflow when the server returns. Held updates are also
    written to `held_path` (beside Tune's experiment state): if the server is still away when the
    sweep ends, that is said in one line (Tune's own result files keep every metric), and running
    the same command again, with the server back, logs them."""

    def __init__(self, tracking_uri: str, experiment_id: str, sweep_name: str, parent_env: str,
                 max_t: dict[tuple, int], sweep: dict[str, Any], held_path: str | None = None):
        self.tracking_uri, self.experiment_id, self.sweep_name = tracking_uri, experiment_id, sweep_name
        self.parent_env, self.max_t, self.sweep, self.held_path = parent_env, max_t, sweep, held_path
        self.pending: list[_Update] = []
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}
        self._logged: dict[str, int] = {}  # trial id -> last evaluation (iteration) its run has
        self._outage = False
        self._held_read = False

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                "sweep_name": self.sweep_name, "parent_env": self.parent_env, "max_t": self.max_t,
                "sweep": self.sweep, "held_path": self.held_path, "pending": self.pending}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*(state[k] for k in ("tracking_uri", "experiment_id", "sweep_name", "parent_env",
                                            "max_t", "sweep")), held_path=state.get("held_path"))
        self.pending = state.get("pending", [])

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    # -- Tune events become updates ---------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        self._record(trial, "start")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        now = int(time.time() * 1000)
        step = int(result.get("iteration", result.get("training_iteration", 0)))
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        for stats in result.get("steps", []):
            metrics += [Metric(f"step_{k}", float(stats[k]), now, int(stats["iteration"])) for k in _PER_STEP]
        tags = [RunTag(k, str(result[k])) for k in _TAGS if k in result]
        self._record(trial, "result", metrics=metrics, tags=tags, step=step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        artifacts = _artifacts_of(trial.checkpoint)
        max_t = self.max_t[group_key(trial.config, SweepConfig.model_validate(self.sweep).group_by)]
        stopped_early = (trial.last_result or {}).get("training_iteration", 0) < max_t
        self._record(trial, "complete", artifacts=artifacts, stopped_early=stopped_early)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # The set at every evaluation, stepped by iteration: MLflow shows it evolving, also for trials
        # that ASHA stops or that fail later. Tune has processed this checkpoint's result already.
        grids = _copies_of(checkpoint, ("synthetic.png",))
        if grids:
            step = int((trial.last_result or {}).get("iteration", 0))
            self._record(trial, "grid", path=grids[0], step=step)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "error", reason=_error_reason(trial))

    def on_experiment_end(self, trials, **info):
        if not self.flush():
            held = sorted({u.trial_name for u in self.pending})
            where = f"held in {self.held_path}; " if self.held_path else ""
            print(f"pad_ray.sweep: error: MLflow at {self.tracking_uri} is still unreachable; "
                  f"{len(self.pending)} updates of {len(held)} trials ({', '.join(held)}) were not logged "
                  f"({where}Tune's result files keep every metric; rerun the same command once the server is "
                  "back to log them)", file=sys.stderr)

    # -- updates reach MLflow ---------------------------------------------------------------------

    def _record(self, trial, kind: str, **payload: Any) -> None:
        self.pending.append(_Update(trial.trial_id, str(trial), dict(trial.config), kind, payload))
        self.flush()

    def flush(self) -> bool:
        """Apply held updates in order; False (and they stay held) when the server cannot be reached."""
        if not self._held_read:  # updates an earlier invocation could not log come first
            self._held_read = True
            earlier = self._read_held()
            if earlier:
                print(f"pad_ray.sweep: logging {len(earlier)} updates held by an earlier run of this sweep",
                      file=sys.stderr)
                self.pending[:0] = earlier
                self._outage = True
        while self.pending:
            try:
                self._apply(self.pending[0])
            except Exception as exc:  # noqa: BLE001 - any failure to log is retried at the next event
                if not self._outage:
                    print(f"pad_ray.sweep: MLflow at {self.tracking_uri} unreachable "
                          f"({str(exc).splitlines()[0][:200]}); holding updates", file=sys.stderr)
                    self._outage = True
                self._write_held()
                return False
            self.pending.pop(0)
        if self._outage:
            print(f"pad_ray.sweep: MLflow at {self.tracking_uri} is back; held updates logged", file=sys.stderr)
            self._outage = False
            self._write_held()
        return True

    def _read_held(self) -> list[_Update]:
        if not self.held_path or not files.exists(self.held_path):
            return []
        return [_Update.from_json(u) for u in files.read_json(self.held_path)["updates"]]

    def _write_held(self) -> None:
        """What is held now, for the next invocation if this one ends first (nothing held: no file)."""
        if not self.held_path:
            return
        if self.pending:
            files.write_json(self.held_path, {"updates": [u.to_json() for u in self.pending]})
        else:
            files.remove(self.held_path)

    def _apply(self, update: _Update) -> None:
        run_id = self._run_id(update)
        if update.kind == "start":
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        elif update.kind == "result":
            step = update.payload.get("step")
            if step is not None and step <= self._logged.get(update.trial_id, 0):
                # A trial restored from an older checkpoint than its last report (the driver was killed
                # before Tune saved its state) reports that evaluation again: MLflow has it already.
                return
            self._batch(run_id, metrics=update.payload["metrics"], tags=update.payload.get("tags", ()))
            if step is not None:
                self._logged[update.trial_id] = step
        elif update.kind == "grid":
            path = Path(update.payload["path"])
            if path.is_file():  # gone when an earlier invocation logged it before its held file was rewritten
                with Image.open(path) as image:
                    self.client.log_image(run_id, image.copy(), key="synthetic", step=update.payload["step"])
                shutil.rmtree(path.parent, ignore_errors=True)
        elif update.kind == "complete":
            for path in update.payload["artifacts"]:
                self.client.log_artifact(run_id, path)
            for folder in {Path(path).parent for path in update.payload["artifacts"]}:
                shutil.rmtree(folder, ignore_errors=True)
            self._batch(run_id, tags=[RunTag("stopped_early", str(update.payload["stopped_early"]).lower())])
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        else:
            self._batch(run_id, tags=[RunTag("failure_reason", update.payload["reason"][:5000])])
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))

    def _run_id(self, update: _Update) -> str:
        """The trial's run: found by its tags (a resumed sweep reuses it), else created with its params."""
        if update.trial_id in self._runs:
            return self._runs[update.trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.trial_id = '{update.trial_id}' and tags.sweep = '{self.sweep_name}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            history = self.client.get_metric_history(run_id, _EVALUATION_METRIC)
            self._logged[update.trial_id] = max((m.step for m in history), default=0)
        else:
            cfg = trial_config(SweepConfig.model_validate(self.sweep), update.config)
            run_id = self.client.create_run(self.experiment_id, tags={
                MLFLOW_PARENT_RUN_ID: os.environ[self.parent_env], MLFLOW_RUN_NAME: trial_run_name(cfg, update.config),
                "trial_id": update.trial_id, "sweep": self.sweep_name}).info.run_id
            pad = {"ipc": cfg.distill.ipc, "alpha": cfg.distill.alpha, "ir": cfg.schedule.init_ratio,
                   "aee": cfg.schedule.add_end_epoch}
            # The swept values first: MLflow's run page lists params in the order they were logged.
            params = {**{k: str(v) for k, v in {**pad, **update.config}.items()},
                      **{f"config.{k}": v for k, v in flat_params(to_dict(cfg)).items()}}
            self._batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        self._runs[update.trial_id] = run_id
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


def _artifacts_of(checkpoint) -> list[str]:
    """Local copies of a checkpoint's artefacts, kept until they are logged."""
    return _copies_of(checkpoint, (".png", ".npz", ".json", ".yaml", ".safetensors"))


def _copies_of(checkpoint, endings: tuple[str, ...]) -> list[str]:
    """Local copies of the checkpoint's files whose names end with one of `endings` (the storage may be
    remote, and Tune prunes old checkpoints before a held update is logged)."""
    if checkpoint is None:
        return []
    keep = Path(tempfile.mkdtemp(prefix="pad_ray_artifacts_"))
    with checkpoint.as_directory() as folder:
        for path in sorted(Path(folder).iterdir()):
            if path.name.endswith(endings):
                shutil.copy2(path, keep / path.name)
    copies = [str(p) for p in sorted(keep.iterdir())]
    if not copies:
        keep.rmdir()
    return copies


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
