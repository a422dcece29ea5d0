"""The stages of a PAD run on one machine, each reusing what the store already holds:
data -> difficulty order -> experts -> distillation -> evaluation."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from pad_ray import data as datasets
from pad_ray import files
from pad_ray.config import ConfigError, RunConfig, to_dict
from pad_ray.difficulty import el2n_run, load_index_file, order_by_score
from pad_ray.distill import Distiller, distill
from pad_ray.distilled import FILE_NAME as DISTILLED_FILE, save_distilled
from pad_ray.evaluate import Scores, SyntheticSet, accuracy, evaluate, random_real_subset
from pad_ray.experts import ExpertRun
from pad_ray.runtime import derive_seed, generator
from pad_ray.schedule import check_schedule
from pad_ray.trajectories import DifficultyCache, TrajectoryStore


def load_data(cfg: RunConfig, max_ipc: int | None = None) -> datasets.Dataset:
    """The prepared dataset; settings that only the data can check are checked here, before any work."""
    d = cfg.data
    if cfg.difficulty.index_file and not Path(cfg.difficulty.index_file).is_file():
        raise ConfigError(f"difficulty.index_file: file not found: {cfg.difficulty.index_file}")
    data = datasets.prepare(d.dataset, d.root, val_fraction=d.val_fraction, zca=d.zca, seed=d.seed,
                            train_per_class=d.train_per_class, test_size=d.test_size)
    smallest = int(torch.bincount(data.train.labels, minlength=data.num_classes).min())
    ipc = max_ipc or cfg.distill.ipc
    if ipc > smallest:
        raise ConfigError(f"distill.ipc: {ipc} is larger than the smallest class "
                          f"({smallest} training samples)")
    if cfg.difficulty.index_file:  # read and checked here, before any Ray work, then again where it is used
        load_index_file(cfg.difficulty.index_file, data.train.index, data.train.labels, data.num_classes)
    return data


def difficulty_order(cfg: RunConfig, data: datasets.Dataset, device: torch.device,
                     progress: bool = True) -> list[torch.Tensor]:
    """Per-class easy -> hard order of the training split: cached, else scored (EL2N) or read from a file."""
    cache = DifficultyCache(cfg.store_dir, cfg)
    order = cache.load()
    if order is not None:
        return order
    train = data.train
    if cfg.difficulty.index_file:
        order = load_index_file(cfg.difficulty.index_file, train.index, train.labels, data.num_classes)
    else:
        seeds = range(cfg.difficulty.seeds)
        runs = [el2n_run(train, data.num_classes, cfg.model, cfg.difficulty, derive_seed(cfg.data.seed, "el2n", k), device)
                for k in tqdm(seeds, desc="EL2N seeds", disable=not progress)]
        order = order_by_score(torch.stack(runs).mean(dim=0), train.labels, data.num_classes)
    cache.save(order)
    return order


@dataclass(frozen=True)
class ExpertSplits:
    """What an expert trains on and is measured on, already on its device."""

    train: datasets.Split
    val: datasets.Split
    test: datasets.Split

    @classmethod
    def of(cls, data: datasets.Dataset, device: torch.device) -> ExpertSplits:
        return cls(*(datasets.Split(s.images.to(device), s.labels.to(device), s.index)
                     for s in (data.train, data.val, data.test)))


def produce_expert(cfg: RunConfig, store: TrajectoryStore, index: int, splits: ExpertSplits,
                   order: list[torch.Tensor], num_classes: int, device: torch.device,
                   on_epoch: Callable[[int, float], None] | None = None) -> None:
    """Train expert `index` into the store, checkpointing after every epoch and resuming from the
    last checkpoint, so a killed process loses at most the epoch it was in. Its loss and validation
    accuracy per epoch and its final train, validation and test accuracy are stored beside it:
    distillation cannot beat the trajectories it imitates, so weak experts must be visible."""
    run = ExpertRun(splits.train, order, num_classes, cfg.model, cfg.experts, cfg.schedule,
                    derive_seed(cfg.experts.seed, "expert", index), device, cfg.augment.strategy)
    partial = store.load_partial(index)
    resumed_at: list[int] = []
    history: dict[str, list[float]] = {"loss": [], "val_accuracy": []}
    if partial is not None:
        run.load_state_dict(partial["run"])
        resumed_at = partial["resumed_at"] + [run.epoch]
        history = partial.get("history", history)
    while run.epoch < cfg.experts.epochs:
        loss = run.run_epoch()
        history["loss"].append(loss)
        history["val_accuracy"].append(accuracy(run.net, splits.val, device))
        if run.epoch < cfg.experts.epochs:
            store.save_partial(index, {"run": run.state_dict(), "resumed_at": resumed_at, "history": history})
        if on_epoch is not None:
            on_epoch(run.epoch, loss)
    quality = {**history, "train_accuracy": accuracy(run.net, splits.train, device),
               "final_val_accuracy": history["val_accuracy"][-1],
               "test_accuracy": accuracy(run.net, splits.test, device)}
    store.save(index, run.trajectory(), resumed_at, quality)


def ensure_experts(cfg: RunConfig, data: datasets.Dataset, order: list[torch.Tensor], device: torch.device,
                   progress: bool = True) -> list[np.ndarray]:
    """Train the experts the store lacks in this process, then return all `num_experts` trajectories."""
    check_schedule(order, cfg.schedule, cfg.experts.epochs)
    store = TrajectoryStore(cfg.store_dir, cfg)
    missing = store.missing(cfg.experts.num_experts)
    splits = ExpertSplits.of(data, device) if missing else None  # on a GPU, a copy of the data for nothing
    for index in tqdm(missing, desc="experts", disable=not progress or not missing):
        produce_expert(cfg, store, index, splits, order, data.num_classes, device)
    return [store.load(i) for i in range(cfg.experts.num_experts)]


def run_dir(cfg: RunConfig) -> Path:
    """Output folder of a run, named by its settings so a rerun resumes the same run."""
    settings = to_dict(cfg)
    for where in ("output_dir", "store_dir", "resources", "device"):
        settings.pop(where)
    settings["data"].pop("root")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    name = cfg.preset or f"{cfg.data.dataset}-ipc{cfg.distill.ipc}"
    return Path(cfg.output_dir) / f"{name}-{digest}"


def save_synthetic(path: Path, synthetic: SyntheticSet) -> None:
    digest = files.save_arrays(path, images=synthetic.images.numpy(), labels=synthetic.labels.numpy(),
                               lr=np.float32(synthetic.lr))
    files.write_json(path.with_suffix(".json"), {"sha256": digest})


def load_synthetic(path: Path, data: datasets.Dataset | None = None) -> SyntheticSet:
    """A distilled set verified by its checksum, and (given `data`) shaped for that dataset."""
    if path.is_dir():
        raise files.IntegrityError(f"{path}: is a directory (expected a distilled set, synthetic_*.npz)")
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise files.IntegrityError(f"{sidecar}: missing (needed to verify {path.name})")
    arrays = files.load_arrays(path, files.read_checksum(sidecar))
    layout = "expected float images [n, C, H, W], float labels [n, classes] or integer labels [n], and lr"
    if {"images", "labels", "lr"} - set(arrays):
        raise files.IntegrityError(f"{path}: not a distilled set (holds {sorted(arrays)}; {layout})")
    images, labels, lr = arrays["images"], arrays["labels"], arrays["lr"]
    soft = labels.ndim == 2 and labels.dtype.kind == "f"
    hard = labels.ndim == 1 and labels.dtype.kind in "iu"
    if images.ndim != 4 or images.dtype.kind != "f" or not (soft or hard) or not len(images) or len(labels) != len(images) \
            or lr.size != 1 or lr.dtype.kind not in "fiu":
        raise files.IntegrityError(f"{path}: not a distilled set (images {images.dtype} {list(images.shape)}, "
                                   f"labels {labels.dtype} {list(labels.shape)}, lr {list(lr.shape)}; {layout})")
    if data is not None:
        wanted = [data.channels, data.image_size, data.image_size]
        fits = labels.shape[1] == data.num_classes if soft else (labels.min(initial=0) >= 0
                                                                  and labels.max(initial=0) < data.num_classes)
        if list(images.shape[1:]) != wanted or not fits:
            raise files.IntegrityError(
                f"{path}: a distilled set of {list(images.shape[1:])} images with labels {list(labels.shape)}, but "
                f"{data.name} has {wanted} images and {data.num_classes} classes")
    if hard:
        labels = labels.astype(np.int64)
    return SyntheticSet(torch.from_numpy(images), torch.from_numpy(labels), float(lr))


def run_distillation(cfg: RunConfig, data: datasets.Dataset, trajectories: list[np.ndarray], device: torch.device,
                     out: Path, progress: bool = True) -> Distiller:
    """Distil (resuming from `out/checkpoint.pt`), then write the best and final sets and an image grid."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    checkpoint = out / "checkpoint.pt"

    def on_eval(distiller: Distiller, metrics: dict[str, Any]) -> None:
        distiller.save(checkpoint)
        if progress:
            shown = {k: v for k, v in metrics.items() if k != "steps"}
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()),
                       file=sys.stderr)

    state = files.load_torch(checkpoint) if checkpoint.is_file() else None
    distiller = distill(cfg, data, trajectories, device, state=state, on_eval=on_eval, progress=progress)
    save_synthetic(out / "synthetic_best.npz", distiller.best_synthetic())
    save_distilled(out / DISTILLED_FILE, distiller.best_synthetic(), data, cfg,
                   {"run_dir": str(out), "best_iteration": distiller.best.iteration,
                    "best_val_accuracy": distiller.best.val})
    save_synthetic(out / "synthetic_final.npz", distiller.synthetic())
    save_grid(out / "synthetic.png", distiller.best_synthetic(), data, cfg.distill.ipc)
    return distiller


def save_grid(path: Path, synthetic: SyntheticSet, data: datasets.Dataset, ipc: int) -> None:
    """One row per class, as pixels (ZCA or normalisation undone)."""
    from torchvision.utils import save_image

    images = data.to_pixels(synthetic.images)
    save_image(images, path, nrow=ipc if ipc > 1 else min(data.num_classes, 10), padding=1)


def control_sets(kind: str, cfg: RunConfig, data: datasets.Dataset, trajectories: list, draws: int,
                 device: torch.device) -> list[SyntheticSet]:
    """The sets of a control: `draws` random real subsets of the run's size (hard labels at lr_teacher), or
    the starting set its distillation begins from (`kind` "start", from the experts' trajectories)."""
    if kind == "random":
        return [random_real_subset(data.train, data.num_classes, cfg.distill.ipc, cfg.distill.lr_teacher,
                                   generator(derive_seed(cfg.seed, "random-subset", draw))) for draw in range(draws)]
    return [Distiller(cfg, data, trajectories, device).synthetic()]


def control_tests(kind: str, cfg: RunConfig, data: datasets.Dataset, trajectories: list, draws: int,
                  device: torch.device, progress: bool = False) -> list[float]:
    """Each final-evaluation net's test accuracy on every set of a control, on the headline architecture
    (the first of `evaluate.models`, as a run's `final_test_accuracy`)."""
    head = cfg.evaluate.models[0]
    return [acc for synthetic in control_sets(kind, cfg, data, trajectories, draws, device)
            for acc in final_evaluation(cfg, data, synthetic, device, progress=progress)[head]["test"]]


def final_evaluation(cfg: RunConfig, data: datasets.Dataset, synthetic: SyntheticSet, device: torch.device,
                     progress: bool = True) -> dict:
    """`evaluate.num_nets` fresh nets per architecture: mean and std of validation and test accuracy."""
    scores = evaluate(synthetic, data.val, data.test, data.num_classes, cfg.model, cfg.evaluate,
                      derive_seed(cfg.seed, "final-eval"), device, strategy=cfg.augment.strategy, progress=progress)
    result = {}
    for name in scores.test:
        val_mean, val_std = Scores.summary(scores.val[name])
        test_mean, test_std = Scores.summary(scores.test[name])
        result[name] = {"val_mean": val_mean, "val_std": val_std, "test_mean": test_mean, "test_std": test_std,
                        "test": scores.test[name]}
    return result
