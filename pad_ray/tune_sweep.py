"""The sweep on Ray Tune: the driver (`run_sweep`: experts, object store, Tuner, MLflow, report); each
trial runs `pad_ray.trial.pad_trial`. `pad_ray.sweep` is the command; it imports this module only once
the sweep file has passed its checks."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from pad_ray import controls, files, local_stages, progress, ray_stages, report, rerun, tracking
from pad_ray.config import RunConfig
from pad_ray.data import Dataset
from pad_ray.plan import expert_sets
from pad_ray.scheduling import GroupedASHA
from pad_ray.sweep import INTERRUPTED
from pad_ray.sweep_config import (REPEAT, SweepConfig, evaluations_by_group, finite_grid, trial_config,
                                  with_absolute_base)
from pad_ray.trial import pad_trial

PARENT_RUN_ENV = "PAD_RAY_MLFLOW_PARENT_RUN"


class _LocalRecordFirst:
    """Tune's JSON and CSV loggers copy a trial's stored record over the driver's local one whenever the
    trial starts from a checkpoint. The stored copy follows the experiment state's syncs, not a trial's
    pause, so a trial that waited at a rung (asha.repeatable) lost the reports made since the last sync.
    In one driver session the local record is the latest; only a resumed sweep (a new session, with no
    local record yet) needs the stored one."""

    def _restore_from_remote(self, file_name: str, trial) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)


class JsonRecord(_LocalRecordFirst, JsonLoggerCallback):
    pass


class CsvRecord(_LocalRecordFirst, CSVLoggerCallback):
    pass


def _load_splits(sweep: SweepConfig) -> dict[int, Dataset]:
    """One prepared dataset per data seed of the space: the split is what the experts train on."""
    by_seed: dict[int, list[RunConfig]] = {}
    for params in finite_grid(sweep, 0) + finite_grid(sweep, 1):
        cfg = trial_config(sweep, params)
        by_seed.setdefault(cfg.data.seed, []).append(cfg)
    return {seed: local_stages.load_data(configs[0], max_ipc=max(c.distill.ipc for c in configs))
            for seed, configs in by_seed.items()}


def _param_space(sweep: SweepConfig) -> dict[str, Any]:
    samplers = {"grid": tune.grid_search, "choice": tune.choice}
    space = {}
    for key, axis in sweep.space.items():
        if axis.kind in samplers:
            space[key] = samplers[axis.kind](list(axis.values))
        else:
            space[key] = getattr(tune, axis.kind)(*axis.values)
    if sweep.num_samples > 1 and sweep.search.kind == "grid":
        # Tune's own repeats would run identical trials; an index gives each repeat its own seed. Under
        # random and optuna search num_samples is the number of draws instead (_tune_samples).
        space[REPEAT] = tune.grid_search(list(range(sweep.num_samples)))
    return space


def _tune_samples(sweep: SweepConfig) -> int:
    return 1 if sweep.search.kind == "grid" else sweep.num_samples


def _search_alg(sweep: SweepConfig, seed: int):
    """Tune's search algorithm for the sweep, holding its concurrency limit: TuneConfig's
    max_concurrent_trials is ignored (with a warning) once a search algorithm is given."""
    limit = sweep.max_concurrent_trials  # 0: as many as the cluster fits
    if sweep.search.kind == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # Tune saves the searcher's state (the study, TPE's random state) with the experiment and
        # `Tuner.restore` loads it, so a resumed sweep goes on with the same study.
        return ConcurrencyLimiter(OptunaSearch(metric=sweep.asha.metric, mode=sweep.asha.mode, seed=seed),
                                  max_concurrent=min(sweep.search.concurrency, limit or sweep.search.concurrency))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=limit)


@dataclass
class SweepRun:
    results: tune.ResultGrid
    unfinished: int  # trials that did not reach their end (an interrupted sweep), those never started included

    @property
    def exit_code(self) -> int:
        """130 when interrupted; else 0 when at least one trial finished, 1 when every trial failed."""
        if self.unfinished:
            return INTERRUPTED
        return 0 if any(r.error is None for r in self.results) else 1


def run_sweep(sweep: SweepConfig, rerun_as: rerun.Rerun = None) -> SweepRun:
    """Run (or resume) a sweep; `rerun_as` says what to do when its folder holds a different sweep."""
    # Everything that can be wrong with the input is checked before anything is written or trained.
    sweep = with_absolute_base(sweep)
    path = f"{sweep.storage_path}/{sweep.name}"
    plan = rerun.plan(sweep, path, rerun_as, tune.Tuner.can_restore(path))
    sweep = plan.sweep
    first = trial_config(sweep, finite_grid(sweep)[0])
    splits = _load_splits(sweep)
    for key, where in (("storage_path", sweep.storage_path), ("base.output_dir", first.output_dir),
                       ("base.store_dir", first.store_dir)):
        files.check_writable(where, key)
    uri = tracking.resolve_tracking_uri(sweep.mlflow.tracking_uri)
    # Fail fast instead of MLflow's minutes of retries: the callback holds updates during an outage.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.open_experiment(client, sweep.mlflow.experiment or sweep.name, uri)
    if plan.move_aside:
        rerun.move_aside(plan.move_aside)

    context = ray_stages.init_ray()
    _stop_on_sigterm()  # after ray.init: Ray's core worker installs a SIGTERM handler of its own that exits
    print(progress.addresses(tracking.ui_link(uri, experiment_id), context.dashboard_url), file=sys.stderr)
    sets = expert_sets(sweep)
    stores = ray_stages.generate_experts([
        ray_stages.ExpertSet(cfg, splits[cfg.data.seed], ray_stages.difficulty_order(cfg, splits[cfg.data.seed]))
        for cfg, _, _ in sets.values()])
    experts = {}
    for (key, (cfg, last_epoch, count)), store in zip(sets.items(), stores):
        quality = store.quality(count)
        print(f"IR {cfg.schedule.init_ratio:g}, AEE {cfg.schedule.add_end_epoch}, data seed {cfg.data.seed}, "
              f"expert seed {cfg.experts.seed}: {quality.line()}", file=sys.stderr)
        tracking.log_expert_set(client, experiment_id, sweep.name, cfg, quality)
        experts[key] = ray_stages.put_trajectories(store, count, last_epoch)

    parent_id = tracking.reopen_parent(client, plan.parent_run_id)
    if parent_id is None:
        parent_id = client.create_run(experiment_id, run_name=f"{sweep.name} sweep",
                                      tags={"sweep": sweep.name}).info.run_id
        tracking.describe_sweep(client, parent_id, sweep, rerun.fingerprint(sweep))
    rerun.write_record(path, sweep, parent_id)
    os.environ[PARENT_RUN_ENV] = parent_id
    max_t = evaluations_by_group(sweep)
    threads = max(1, int(sweep.trial_resources.cpu))
    data = {seed: ray.put(split) for seed, split in splits.items()}
    trainable = tune.with_resources(
        tune.with_parameters(pad_trial, sweep=sweep.model_dump(mode="json"), data=data, experts=experts,
                             threads=threads),
        {"cpu": sweep.trial_resources.cpu, "gpu": sweep.trial_resources.gpu})
    # Tune's own records of each trial are its JSON and CSV loggers; its TensorBoard logger, added by
    # default, cannot take the per-iteration `steps` a report carries (it warned with a dump of them), and
    # MLflow already holds every metric. Read at fit, so a restored sweep leaves it out too.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # num_to_keep below makes Tune snapshot its state at every checkpoint, and it warns when trials report
    # seconds apart (short trials, smoke sweeps): a warning about pad_ray's own setting, which its user cannot
    # change, and which trials that report minutes apart never trigger.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if tune.Tuner.can_restore(path):
        # Finished and failed trials stay as they are; unfinished ones continue from their checkpoints.
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        callback = tracking.MlflowSweepCallback(uri, experiment_id, sweep.name, PARENT_RUN_ENV, max_t,
                                                sweep.model_dump(mode="json"), held_path=f"{path}/mlflow_held.json")
        seed = first.seed if sweep.search.seed is None else sweep.search.seed
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(sweep),
            tune_config=tune.TuneConfig(
                scheduler=GroupedASHA(sweep.group_by, max_t, metric=sweep.asha.metric, mode=sweep.asha.mode,
                                      grace_period=sweep.asha.grace_period,
                                      reduction_factor=sweep.asha.reduction_factor,
                                      repeatable=sweep.asha.repeatable),
                num_samples=_tune_samples(sweep), search_alg=_search_alg(sweep, seed),
                reuse_actors=sweep.reuse_actors),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=sweep.storage_path,
                callbacks=[callback, JsonRecord(), CsvRecord()],
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    try:
        results = tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C skips Tune's own saving; the parent run still says so
        tracking.end_parent(client, parent_id, partial=True)
        raise
    run = SweepRun(results, report.unfinished(results, sweep))
    if run.unfinished:
        print(f"pad_ray.sweep: interrupted: {run.unfinished} of {sweep.total_trials} trials did not finish; the "
              f"results in {path} are partial (partial=true); run the same command again to resume",
              file=sys.stderr)
    table = report.ranked_table(results, sweep, partial=bool(run.unfinished))
    tops = report.top_trials(table, sweep)
    # An interrupted sweep stops here: its top trials are not final, and the user asked it to stop.
    measured = [] if run.unfinished else controls.measure(
        [trial_config(sweep, top.params) for top in tops], sweep, data, experts, path)
    try:
        report.summarize(table, tops, measured, sweep, path, client, parent_id, partial=bool(run.unfinished))
        tracking.end_parent(client, parent_id, partial=bool(run.unfinished))
    except (MlflowException, OSError) as exc:  # requests' errors are OSErrors
        # The callback has said so already when it holds updates; then this is the same outage.
        if not files.exists(f"{path}/mlflow_held.json"):
            print(f"pad_ray.sweep: error: MLflow at {uri} is unreachable ({str(exc).splitlines()[0][:200]}); the "
                  f"results table and best config are in {path} but not in MLflow (rerun the same command once "
                  "the server is back to log them)", file=sys.stderr)
        return run
    print(f"MLflow: {tracking.ui_link(uri, experiment_id)}", file=sys.stderr)
    return run


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) stops the sweep as Ctrl-C does: Tune saves its state and the
    parent run is marked KILLED, instead of the process dying mid-write."""
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
