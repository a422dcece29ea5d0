"""What a sweep's results are read against (`controls` in the sweep file). For the top trial of each group
(IPC), scored by that trial's own final evaluation (its nets, net seeds and epochs):

- random real subsets of the same size, hard labels at lr_teacher: the set a distilled one must beat;
- the trial's starting set, iteration 0 of its distillation: what the distillation itself added.

Each kind is a Ray task with a trial's resources, measured once per config: the sweep's folder keeps the
scores (`controls.json`), so rerunning or resuming a sweep does not pay for them again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import ray
import torch

from pad_ray import files, local_stages, ray_stages
from pad_ray.config import RunConfig, to_dict
from pad_ray.data import Dataset
from pad_ray.sweep_config import SweepConfig
from pad_ray.trajectories import TrajectoryStore

CACHE = "controls.json"


@ray.remote
def _control_task(kind: str, cfg: dict[str, Any], data: Dataset, trajectories: list[ray.ObjectRef], draws: int,
                  threads: int) -> list[float]:
    """`local_stages.control_tests` on a trial's resources."""
    torch.set_num_threads(threads)
    return local_stages.control_tests(kind, RunConfig.model_validate(cfg), data,
                                      ray.get(trajectories) if kind == "start" else [], draws, ray_stages.task_device())


def kinds(sweep: SweepConfig) -> list[tuple[str, int]]:
    """The controls the sweep asks for, with their draws."""
    wanted = [("start", 1)] if sweep.controls.starting_set else []
    return wanted + ([("random", sweep.controls.random_subsets)] if sweep.controls.random_subsets else [])


def _key(kind: str, cfg: RunConfig, draws: int) -> str:
    return hashlib.sha256(json.dumps([kind, draws, to_dict(cfg)], sort_keys=True).encode()).hexdigest()


def measure(configs: list[RunConfig], sweep: SweepConfig, data: dict[int, ray.ObjectRef],
            experts: dict[str, list[ray.ObjectRef]], folder: str) -> list[dict[str, list[float]]]:
    """For each config (a group's top trial), each wanted control's test accuracies by kind."""
    cache_file = f"{folder}/{CACHE}"
    try:
        cache = files.read_json(cache_file) if files.exists(cache_file) else {}
    except (OSError, ValueError):  # unreadable: measured again and rewritten
        cache = {}
    keys = [{kind: _key(kind, cfg, draws) for kind, draws in kinds(sweep)} for cfg in configs]
    pending: dict[str, tuple[ray.ObjectRef, dict[str, Any]]] = {}
    for cfg, by_kind in zip(configs, keys):
        for kind, draws in kinds(sweep):
            key = by_kind[kind]
            if key not in cache and key not in pending:
                task = _control_task.options(num_cpus=sweep.trial_resources.cpu, num_gpus=sweep.trial_resources.gpu)
                pending[key] = (task.remote(kind, to_dict(cfg), data[cfg.data.seed],
                                            experts[TrajectoryStore(cfg.store_dir, cfg).key], draws,
                                            max(1, int(sweep.trial_resources.cpu))),
                                {"kind": kind, "draws": draws, "config": to_dict(cfg)})
    if pending:
        scores = ray_stages.gather([ref for ref, _ in pending.values()], "controls")
        for (key, (_, about)), tests in zip(pending.items(), scores):
            cache[key] = {**about, "test_accuracy": tests}
        files.write_json(cache_file, cache)
    return [{kind: cache[key]["test_accuracy"] for kind, key in by_kind.items()} for by_kind in keys]
