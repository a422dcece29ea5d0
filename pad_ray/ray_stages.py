"""The Ray side of the expert stage: EL2N seeds as parallel tasks, experts on Ray Train, and the
trajectories handed to distillation through the object store.

Ray Train runs a `TorchTrainer` whose workers each train their share of independent experts (no
DDP) straight into the durable store; a worker that dies loses at most its current epoch, since
every expert checkpoints after each epoch and Train restarts the group. The driver then puts the
trajectory rows that distillation can sample into the object store: it owns them for as long as the
sweep runs, and it lives on the head node, so GPU workers never hold primary copies (which would
keep the autoscaler from releasing them).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from pad_ray import local_stages
from pad_ray.config import RunConfig, to_dict
from pad_ray.data import Dataset, Split
from pad_ray.difficulty import el2n_run, order_by_score
from pad_ray.runtime import cuda_unusable_reason, derive_seed, visible_cuda_index
from pad_ray.schedule import check_schedule
from pad_ray.trajectories import DifficultyCache, TrajectoryStore


# Ray Train and Tune run a worker's training loop in a thread of its own, and glibc gives such a thread an
# arena of its own, which maps each block above 64 MB by itself and unmaps it on free. keep_freed_memory_in_heap
# reaches only the main arena, so in those threads every large activation buffer was faulted in afresh, step after
# step: an expert's epoch took 1.7x as long in a Ray Train worker as in a main thread (BENCHMARKS.md,
# section 2). With one arena every thread allocates from the main one. glibc reads this once, when a process
# starts, so it travels as an environment variable of the job's worker processes.
# Ray Train's print patch (Ray 2.60 here) sends a worker's print both to stdout and through its logger to stdout, so
# every tqdm_ray state reached the driver twice, and the second copy of a bar's "closed" state opened the bar
# again for good: finished expert bars were redrawn around every driver print until the sweep ended.
# Ray Train's preemption watcher (on by default in 2.60) is one more actor per run that only logs node drains, and
# its start printed an error-level line at every expert run (ray#53727); an expert killed with its node resumes
# from its last epoch through Train's failure handling either way.
WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def init_ray() -> ray.RayContext:
    """`ray.init` for pad_ray's drivers: a local Ray, or the cluster of RAY_ADDRESS or of a Ray job, whose
    workers get WORKER_ENV (less what the job or the user already set: a job's env_vars are in its driver's
    environment, and Ray refuses to merge a key given twice)."""
    env_vars = {key: value for key, value in WORKER_ENV.items() if key not in os.environ}
    return ray.init(log_to_driver=True, runtime_env={"env_vars": env_vars} if env_vars else None)


def use_gpu(cfg: RunConfig) -> bool:
    """`auto`: GPUs the cluster has now, or can have: an autoscaling cluster may start with none."""
    if cfg.resources.use_gpu != "auto":
        return bool(cfg.resources.use_gpu)
    from ray._private.state import state  # what Ray Train itself reads for the autoscaler's limits

    can_have = state.get_max_resources_from_cluster_config() or {}
    return max(ray.cluster_resources().get("GPU", 0), can_have.get("GPU", 0)) > 0


# Set to 1 only where the GPUs Ray reports are fakes (Ray's fake multi-node cluster in
# tests/test_cluster.py): work given a GPU there runs on the CPU instead of failing.
FAKE_GPUS_ENV = "PAD_RAY_FAKE_GPUS"


class GPUUnusableError(RuntimeError):
    """Ray gave this worker a GPU that torch cannot use."""


def task_memory_share(device: torch.device) -> float:
    """The part of its device's memory a task may plan on, as the part of the device Ray gave it: half
    a GPU for `gpu: 0.5`; on the CPU its CPUs over the node's, since the trials that fill a node's CPUs
    also share its memory."""
    context = ray.get_runtime_context()
    assigned = context.get_assigned_resources()
    if device.type == "cuda":
        return min(1.0, assigned.get("GPU", 1.0))
    node = next((n for n in ray.nodes() if n["NodeID"] == context.get_node_id()), None)
    total = node["Resources"].get("CPU", 0.0) if node else 0.0
    return min(1.0, assigned.get("CPU", total) / total) if total else 1.0


def task_device() -> torch.device:
    """Inside a Ray task, trial or Train worker: the GPU Ray assigned it, else the CPU.

    A GPU that torch cannot use (no driver, a driver older than torch's CUDA, a CPU-only torch) raises
    with the reason: quietly training on the CPU would hold the GPU for a run many times slower.
    """
    gpus = ray.get_runtime_context().get_assigned_resources().get("GPU", 0)
    if not gpus or os.environ.get(FAKE_GPUS_ENV) == "1":
        return torch.device("cpu")
    ids, visible = ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")
    reason = cuda_unusable_reason()
    if reason is not None:
        raise GPUUnusableError(f"Ray assigned this worker {gpus:g} GPU (ids {ids}, CUDA_VISIBLE_DEVICES={visible!r}) "
                               f"but torch {torch.__version__} cannot use CUDA: {reason}")
    index = visible_cuda_index(ids, visible)
    torch.cuda.set_device(index)  # so that anything using the current device uses this one too
    return torch.device("cuda", index)


@ray.remote
def _el2n_task(train: Split, num_classes: int, cfg: dict[str, Any], seed: int, threads: int) -> torch.Tensor:
    torch.set_num_threads(threads)
    run = RunConfig.model_validate(cfg)
    return el2n_run(train, num_classes, run.model, run.difficulty, seed, task_device())


def difficulty_order(cfg: RunConfig, data: Dataset) -> list[torch.Tensor]:
    """Like `local_stages.difficulty_order`, with the K EL2N seeds run as parallel Ray tasks."""
    cache = DifficultyCache(cfg.store_dir, cfg)
    order = cache.load()
    if order is not None:
        return order
    if cfg.difficulty.index_file:
        return local_stages.difficulty_order(cfg, data, torch.device("cpu"))
    train = ray.put(data.train)
    options = {"num_cpus": cfg.resources.cpus_per_worker, "num_gpus": 1 if use_gpu(cfg) else 0}
    runs = [_el2n_task.options(**options).remote(train, data.num_classes, to_dict(cfg),
                                                  derive_seed(cfg.data.seed, "el2n", k), cfg.resources.cpus_per_worker)
            for k in range(cfg.difficulty.seeds)]
    # Scoring takes minutes before any expert starts: a bar on the driver shows the seeds finishing.
    order = order_by_score(torch.stack(gather(runs, "EL2N seeds")).mean(dim=0), data.train.labels, data.num_classes)
    cache.save(order)
    return order


def gather(refs: list[ray.ObjectRef], desc: str) -> list[Any]:
    """`ray.get` of `refs`, with a bar on the driver that counts them as they finish."""
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, file=sys.stderr) as bar:
        while pending:
            done, pending = ray.wait(pending)
            bar.update(len(done))
    return ray.get(refs)


def _split_on(arrays: tuple[np.ndarray, np.ndarray], device: torch.device) -> Split:
    """A split from its object-store arrays (read-only buffers, hence the copies)."""
    images, labels = arrays
    return Split(torch.from_numpy(images.copy()).to(device), torch.from_numpy(labels.copy()).to(device),
                 torch.arange(len(labels)))


@dataclass
class ExpertSet:
    """One expert set to complete: its config (the store key), the data it trains on, and the data's
    difficulty order."""

    cfg: RunConfig
    data: Dataset
    order: list[torch.Tensor]


def _expert_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: train this rank's share of every set's missing experts into the store."""
    from ray.experimental.tqdm_ray import tqdm

    context = ray.train.get_context()
    torch.set_num_threads(loop["threads"])
    device = task_device()
    splits: dict[int, local_stages.ExpertSplits] = {}  # by data: sets on the same data share one copy
    orders: dict[int, list[torch.Tensor]] = {}  # by set: fetched once for all of a set's experts here
    for set_index, index in loop["work"][context.get_world_rank()::context.get_world_size()]:
        job = loop["sets"][set_index]
        cfg = RunConfig.model_validate(job["config"])
        store = TrajectoryStore(cfg.store_dir, cfg)
        if store.is_valid(index):  # finished before a restart
            continue
        if job["data"] not in splits:
            splits[job["data"]] = local_stages.ExpertSplits(
                *(_split_on(ray.get(ref), device) for ref in loop["splits"][job["data"]]))
        if set_index not in orders:
            orders[set_index] = [torch.from_numpy(o.copy()) for o in ray.get(job["order"])]
        bar = tqdm(total=cfg.experts.epochs, desc=f"{store.key} expert {index}")
        local_stages.produce_expert(cfg, store, index, splits[job["data"]], orders[set_index], job["num_classes"],
                                    device, on_epoch=lambda epoch, loss: bar.update(1))
        bar.close()


def generate_experts(sets: list[ExpertSet]) -> list[TrajectoryStore]:
    """Train the experts the sets' stores lack in one Ray Train run; returns their stores (complete).

    One run for all sets: each run pays Ray Train's start-up (about 15 s here, minutes where the
    autoscaler adds nodes), and pooling the experts keeps every worker busy when one set alone has
    fewer missing experts than there are workers.
    """
    from ray.train import FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    stores = [TrajectoryStore(s.cfg.store_dir, s.cfg) for s in sets]
    for job in sets:
        check_schedule(job.order, job.cfg.schedule, job.cfg.experts.epochs)
    missing = [store.missing(job.cfg.experts.num_experts) for job, store in zip(sets, stores)]
    work = [(set_index, index) for set_index, indices in enumerate(missing) for index in indices]
    if not work:
        return stores
    first = sets[0].cfg
    for job in sets[1:]:
        if (job.cfg.resources, job.cfg.output_dir) != (first.resources, first.output_dir):
            raise ValueError("expert sets trained in one run share resources and output_dir")
    gpu = use_gpu(first)
    workers = min(first.resources.workers, len(work))
    # The workers' per-expert bars (tqdm_ray) reach this driver's output once they start; this says what comes.
    for job, store, indices in zip(sets, stores, missing):
        if indices:
            print(f"experts {store.key}: training {len(indices)} of {job.cfg.experts.num_experts} experts "
                  f"({job.cfg.experts.epochs} epochs each)", file=sys.stderr)
    print(f"experts: {len(work)} on {workers} Ray Train worker(s)", file=sys.stderr)
    data_refs: dict[int, int] = {}  # id(data) -> its index in loop["splits"]
    splits, jobs = [], []
    for job in sets:
        if id(job.data) not in data_refs:
            data_refs[id(job.data)] = len(splits)
            # Experts train on train and are measured on val and test (their stored quality).
            splits.append([ray.put((s.images.numpy(), s.labels.numpy()))
                           for s in (job.data.train, job.data.val, job.data.test)])
        jobs.append({"config": to_dict(job.cfg), "num_classes": job.data.num_classes, "data": data_refs[id(job.data)],
                     "order": ray.put([o.numpy() for o in job.order])})
    keys = [store.key for store, indices in zip(stores, missing) if indices]
    name = f"experts-{keys[0]}" + (f"-and-{len(keys) - 1}-more" if len(keys) > 1 else "")
    resources = {"CPU": first.resources.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    trainer = TorchTrainer(
        _expert_worker,
        train_loop_config={"sets": jobs, "splits": splits, "work": work, "threads": first.resources.cpus_per_worker},
        torch_config=TorchConfig(backend="gloo"),  # experts are independent: no collectives, no NCCL
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker=resources),
        run_config=TrainRunConfig(name=name, storage_path=f"{first.output_dir}/ray_train",
                                  failure_config=FailureConfig(max_failures=first.resources.max_failures)),
    )
    trainer.fit()
    for job, store in zip(sets, stores):
        still_missing = store.missing(job.cfg.experts.num_experts)
        if still_missing:
            raise RuntimeError(f"expert generation finished but experts {still_missing} are not in {store.dir}")
    return stores


def distillation_window(trajectory: np.ndarray, last_epoch: int) -> np.ndarray:
    """Rows 0..last_epoch (all that distillation samples) plus the final row (for soft labels)."""
    if last_epoch + 1 >= len(trajectory) - 1:
        return np.ascontiguousarray(trajectory)
    return np.concatenate([trajectory[: last_epoch + 1], trajectory[-1:]])


def put_trajectories(store: TrajectoryStore, count: int, last_epoch: int) -> list[ray.ObjectRef]:
    """Object-store copies (float32, owned by this driver) of each expert's distillation window;
    `last_epoch` is the latest epoch any trial using these experts samples."""
    return [ray.put(distillation_window(store.load(i), last_epoch)) for i in range(count)]
