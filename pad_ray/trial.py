"""The trial every Tune actor runs: one PAD distillation that reports (and checkpoints) at each
evaluation. Kept apart from the driver (`pad_ray.tune_sweep`) so that an actor imports only what a
trial needs, not MLflow or matplotlib: each trial process starts that much sooner."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from ray import tune

from pad_ray import files, local_stages, ray_stages
from pad_ray.config import RunConfig, to_dict
from pad_ray.data import Dataset
from pad_ray.distill import Distiller, distill
from pad_ray.distilled import FILE_NAME as DISTILLED_FILE, save_distilled
from pad_ray.sweep_config import SweepConfig, trial_config
from pad_ray.trajectories import TrajectoryStore

# Tune's checkpoint writer logs a line per report in the trial's process; Ray's log deduplication then prints
# the last of them after the sweep's closing lines, below the MLflow link. Each report's own row names its
# checkpoint already.
CHECKPOINT_LOGGER = "ray.train._internal.storage"


def pad_trial(params: dict[str, Any], *, sweep: dict[str, Any], data: dict[int, ray.ObjectRef],
              experts: dict[str, list[ray.ObjectRef]], threads: int) -> None:
    """One PAD distillation, reporting (and checkpointing) at every evaluation. `data` holds one
    object-store copy of the prepared dataset per data seed; trajectories are fetched zero-copy."""
    torch.set_num_threads(threads)
    logging.getLogger(CHECKPOINT_LOGGER).setLevel(logging.WARNING)
    cfg = trial_config(SweepConfig.model_validate(sweep), params)
    device = ray_stages.task_device()
    dataset = ray.get(data[cfg.data.seed])
    store_key = TrajectoryStore(cfg.store_dir, cfg).key
    trajectories = ray.get(experts[store_key])

    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = files.load_torch(Path(folder) / "state.pt")

    def on_eval(distiller: Distiller, metrics: dict[str, Any]) -> None:
        # Every checkpoint carries the current best set and its grid, so a trial that ASHA stops
        # early still leaves them in MLflow.
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder)
            distiller.save(out / "state.pt")
            best = distiller.best_synthetic()
            local_stages.save_synthetic(out / "synthetic_best.npz", best)
            context = tune.get_context()
            save_distilled(out / DISTILLED_FILE, best, dataset, cfg, {
                "sweep": context.get_experiment_name(), "trial_id": context.get_trial_id(),
                "trial_name": context.get_trial_name(), "best_iteration": distiller.best.iteration,
                "best_val_accuracy": distiller.best.val})
            local_stages.save_grid(out / "synthetic.png", best, dataset, cfg.distill.ipc)
            (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            if metrics["iteration"] == cfg.distill.iterations:
                metrics.update(_final_evaluation(cfg, dataset, best, device))
            metrics["expert_store_key"] = store_key  # which expert set this trial read (an MLflow tag)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    distill(cfg, dataset, trajectories, device, state=state, on_eval=on_eval, progress=False,
            memory_share=ray_stages.task_memory_share(device))


def _final_evaluation(cfg: RunConfig, data: Dataset, best, device: torch.device) -> dict[str, float]:
    """`evaluate.num_nets` fresh nets of each architecture of `evaluate.models` on the best set (chosen
    on validation), as `final_test_accuracy/resnet18`, ...; the first architecture listed is also the
    trial's headline `final_test_accuracy`."""
    evaluations = local_stages.final_evaluation(cfg, data, best, device, progress=False)  # a trial reports through Tune
    named = {"": evaluations[cfg.evaluate.models[0]], **{f"/{name}": e for name, e in evaluations.items()}}
    return {f"{metric}{suffix}": evaluation[field] for suffix, evaluation in named.items()
            for metric, field in (("final_test_accuracy", "test_mean"), ("final_test_std", "test_std"),
                                  ("final_val_accuracy", "val_mean"))}
