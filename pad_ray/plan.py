"""`python -m pad_ray.sweep SWEEP.yaml --dry-run`: what a sweep would run, train, hold and need, before
any of it is spent.

The plan reads the sweep file and the store and nothing else: it trains nothing, starts no Ray, loads
no dataset and writes nothing. It gives the trials Tune would run, the expert sets the space needs
(which the store holds and which it would train, with their cost in image-epochs and in time), the
bytes the driver would put in the object store, and each trial shape's memory on both gradient paths.

Image counts come from the datasets' published per-class sizes (so a plan needs no data on the
planning machine), put through the same subsetting, validation split and data scheduler as a run.
Times and memory come from a few constants that benchmarks measure (`plan_constants.json`, written by
`benchmarks/memory_model.py` from its own rows and from `benchmarks/experts.py`'s); each constant is
stated with its device kind, benchmark and date wherever the plan uses it.

The memory model, in float32 words (W = batch x activations of one image, P = flat parameters, N =
inner steps, S = the synthetic set, its gradient and its momentum):

    unrolled:         base + S + N x (k_unrolled_step x W + 3P) + k_unrolled_work x W
    constant_memory:  base + S + k_constant x W + N x P

The unrolled graph keeps every step (its saved activations, and theta_i, g_i and lr x g_i) until the
final backward, whose own working buffers are one step's; the two-pass path holds the graph of one
recomputed step and the N parameter vectors. `base` and the `k`s are fitted to measured peaks.
The model covers one matching iteration, the peak of a trial; the nets of an evaluation are far smaller.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pad_ray.config import ModelConfig, RunConfig
from pad_ray.schedule import class_range
from pad_ray.sweep_config import SweepConfig, finite_grid, trial_config, with_absolute_base

CONSTANTS_FILE = Path(__file__).with_name("plan_constants.json")
GB = 1e9
WORD = 4  # bytes of a float32
PATHS = ("unrolled", "constant_memory")
AUTO_NOTE = " (the unrolled peak where its budget holds every step, down to constant_memory's)"


@dataclass(frozen=True)
class DatasetShape:
    channels: int
    size: int
    train_per_class: tuple[int, ...]  # the official training set, by label
    test: int


# Published sizes of the official splits (pad_ray.data.DATASETS), so a plan needs no data.
DATASET_SHAPES = {
    "mnist": DatasetShape(1, 28, (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949), 10000),
    "fashionmnist": DatasetShape(1, 28, (6000,) * 10, 10000),
    "kmnist": DatasetShape(1, 28, (6000,) * 10, 10000),
    "svhn": DatasetShape(3, 32, (4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659), 26032),
    "cifar10": DatasetShape(3, 32, (5000,) * 10, 10000),
    "cifar100": DatasetShape(3, 32, (500,) * 100, 10000),
    "tinyimagenet": DatasetShape(3, 64, (500,) * 200, 10000),
}


# -- the network ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NetShape:
    params: int  # length of the flat parameter vector
    activations: int  # floats of all convolution outputs for one image
    flops: int  # forward FLOPs of one image (convolutions and the classifier)


def convnet_shape(channels: int, size: int, classes: int, model: ModelConfig) -> NetShape:
    """The distillation ConvNet's sizes, layer by layer as `models.ConvNet` builds it."""
    params = activations = flops = 0
    width, in_channels = model.width, channels
    for d in range(model.depth):
        padding = 3 if d == 0 and size == 28 else 1
        out = size + 2 * padding - 2
        params += 9 * in_channels * width + width + (2 * width if model.norm != "none" else 0)
        activations += width * out * out
        flops += 2 * 9 * in_channels * width * out * out
        size, in_channels = out // 2, width
    features = width * size * size
    return NetShape(params + features * classes + classes, activations, flops + 2 * features * classes)


# -- the memory model -------------------------------------------------------------------------

COEFFICIENTS = ("k_unrolled_step", "k_unrolled_work", "k_constant")


@dataclass(frozen=True)
class MemoryModel:
    """Fitted constants of one device kind; `tolerance` is the largest relative error on the rows it
    was fitted to."""

    device: str
    base_bytes: float
    k_unrolled_step: float
    k_unrolled_work: float
    k_constant: float
    tolerance: float
    source: str

    def peak_bytes(self, path: str, net: NetShape, steps: int, batch: int, images: int, image_floats: int,
                   classes: int) -> float:
        known, multipliers = _memory_terms(path, net, steps, batch, images, image_floats, classes)
        return self.base_bytes + known + sum(getattr(self, k) * m for k, m in multipliers.items())


def _memory_terms(path: str, net: NetShape, steps: int, batch: int, images: int, image_floats: int,
                  classes: int) -> tuple[float, dict[str, float]]:
    """(bytes the model fixes, bytes that each fitted coefficient multiplies)."""
    synthetic = 3 * images * (image_floats + classes) * WORD
    work = batch * net.activations * WORD
    if path == "unrolled":
        return synthetic + steps * 3 * net.params * WORD, {"k_unrolled_step": steps * work, "k_unrolled_work": work}
    if path == "constant_memory":
        return synthetic + steps * net.params * WORD, {"k_constant": work}
    raise ValueError(f"unknown gradient path {path!r}; allowed: {', '.join(PATHS)}")


def fit_memory(rows: list[dict[str, Any]], device: str, source: str) -> MemoryModel:
    """Least squares in relative error over measured rows (`path`, `params`, `activations`, `steps`,
    `batch`, `images`, `image_floats`, `classes`, `peak_bytes`): one base for both paths."""
    import numpy as np

    design, target = [], []
    for row in rows:
        known, multipliers = _memory_terms(row["path"], NetShape(row["params"], row["activations"], 0), row["steps"],
                                           row["batch"], row["images"], row["image_floats"], row["classes"])
        scale = 1.0 / row["peak_bytes"]
        design.append([scale] + [scale * multipliers.get(k, 0.0) for k in COEFFICIENTS])
        target.append(scale * (row["peak_bytes"] - known))
    solution, *_ = np.linalg.lstsq(np.array(design), np.array(target), rcond=None)
    fitted = dict(zip(("base_bytes", *COEFFICIENTS), (float(x) for x in solution)))
    model = MemoryModel(device, **fitted, tolerance=0.0, source=source)
    worst = max(abs(_row_estimate(model, row) / row["peak_bytes"] - 1) for row in rows)
    # Stated in whole percent, rounded up, so that every fitted row is within it.
    return MemoryModel(device, **fitted, tolerance=math.ceil(worst * 100) / 100, source=source)


def _row_estimate(model: MemoryModel, row: dict[str, Any]) -> float:
    net = NetShape(row["params"], row["activations"], 0)
    return model.peak_bytes(row["path"], net, row["steps"], row["batch"], row["images"], row["image_floats"],
                            row["classes"])


@cache
def constants() -> dict[str, Any]:
    return json.loads(CONSTANTS_FILE.read_text())


def memory_models() -> dict[str, MemoryModel]:
    return {device: MemoryModel(device, **fields) for device, fields in constants()["memory"].items()}


def trial_memory(cfg: RunConfig, model: MemoryModel, path: str) -> float:
    """Estimated peak bytes of one trial of `cfg` on `path`."""
    shape = DATASET_SHAPES[cfg.data.dataset]
    classes = len(shape.train_per_class)
    net = convnet_shape(shape.channels, shape.size, classes, cfg.model)
    images = cfg.distill.ipc * classes
    return model.peak_bytes(path, net, cfg.distill.syn_steps, min(cfg.distill.batch_syn, images), images,
                            shape.channels * shape.size ** 2, classes)


# -- the data and the experts -----------------------------------------------------------------

def split_sizes(cfg: RunConfig) -> tuple[list[int], int, int]:
    """(training images per class, validation images, test images) as `data.prepare` splits them."""
    from pad_ray.data import _val_count  # the split's own rule, so the counts cannot drift from it

    shape = DATASET_SHAPES[cfg.data.dataset]
    per_class = [min(n, cfg.data.train_per_class or n) for n in shape.train_per_class]
    val = [_val_count(n, cfg.data.val_fraction) for n in per_class]
    test = min(shape.test, cfg.data.test_size or shape.test)
    return [n - v for n, v in zip(per_class, val)], sum(val), test


def images_per_expert(cfg: RunConfig) -> int:
    """Images one expert trains on over all its epochs, under the data scheduler."""
    train, _, _ = split_sizes(cfg)
    return sum(stop - start for epoch in range(cfg.experts.epochs) for n in train
               for start, stop in [class_range(epoch, n, cfg.schedule)])


def dataset_bytes(cfg: RunConfig) -> int:
    """The prepared dataset the driver puts once per data seed: float32 images, int64 labels and
    indices, and the ZCA whitening (mean, transform, inverse)."""
    shape = DATASET_SHAPES[cfg.data.dataset]
    train, val, test = split_sizes(cfg)
    floats = shape.channels * shape.size ** 2
    zca = (floats + 2 * floats ** 2) * WORD if cfg.data.zca else 0
    return (sum(train) + val + test) * (floats * WORD + 16) + zca


def window_rows(cfg: RunConfig, last_epoch: int) -> int:
    """Rows of `ray_stages.distillation_window` of one expert."""
    rows = cfg.experts.epochs + 1
    return rows if last_epoch + 1 >= rows - 1 else last_epoch + 2


@dataclass(frozen=True)
class ExpertRate:
    """Expert training throughput of one device kind, as forward GFLOP/s per worker."""

    device: str
    gflop_per_s: float
    source: str

    def seconds(self, images: int, net: NetShape, passes: int) -> float:
        return images * net.flops * passes / (self.gflop_per_s * 1e9)


def expert_rates() -> dict[str, ExpertRate]:
    return {device: ExpertRate(device, **fields) for device, fields in constants()["experts"].items()}


# -- the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertSetPlan:
    key: str
    cfg: RunConfig  # with num_experts the most any trial of the set needs
    missing: int  # experts the store lacks (or holds damaged)
    last_epoch: int  # the latest epoch a trial samples
    difficulty_to_score: str | None  # the EL2N cache this set would score first, None when cached


def expert_sets(sweep: SweepConfig) -> dict[str, tuple[RunConfig, int, int]]:
    """Distinct expert sets of the space, as the run makes them: store key -> (a config, last sampled
    epoch, experts needed)."""
    from pad_ray.trajectories import TrajectoryStore

    groups: dict[str, tuple[RunConfig, int, int]] = {}
    for params in finite_grid(sweep, 0) + finite_grid(sweep, 1):
        cfg = trial_config(sweep, params)
        key = TrajectoryStore(cfg.store_dir, cfg).key
        last, count = cfg.distill.last_sampled_epoch, cfg.experts.num_experts
        if key in groups:
            _, seen_last, seen_count = groups[key]
            last, count = max(last, seen_last), max(count, seen_count)
            cfg = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"num_experts": count})})
        groups[key] = (cfg, last, count)
    return groups


def expert_set_plans(sweep: SweepConfig) -> list[ExpertSetPlan]:
    """The expert sets a run of `sweep` (with absolute paths) makes, and what the store holds of them."""
    from pad_ray.trajectories import DifficultyCache, TrajectoryStore

    plans = []
    for key, (cfg, last_epoch, count) in expert_sets(sweep).items():
        missing = len(TrajectoryStore(cfg.store_dir, cfg).missing(count))
        cache = DifficultyCache(cfg.store_dir, cfg)
        cached = bool(cfg.difficulty.index_file) or cache.load() is not None
        plans.append(ExpertSetPlan(key, cfg, missing, last_epoch, None if cached else str(cache.path)))
    return plans


def _trial_configs(sweep: SweepConfig) -> list[RunConfig]:
    """Every config the finite axes give, distributions at both ends: memory grows with N and batch, so
    the largest trial is among them."""
    return [trial_config(sweep, params) for params in finite_grid(sweep, 0) + finite_grid(sweep, 1)]


def _net(cfg: RunConfig) -> NetShape:
    shape = DATASET_SHAPES[cfg.data.dataset]
    return convnet_shape(shape.channels, shape.size, len(shape.train_per_class), cfg.model)


def _gb(value: float) -> str:
    if value < GB:
        return f"{value / 1e6:.0f} MB"
    return f"{value / GB:.1f} GB" if value < 100 * GB else f"{value / GB:.0f} GB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 360000 else f"{seconds / 3600:,.0f} h"


def _expert_lines(sets: list[ExpertSetPlan]) -> list[str]:
    rates = expert_rates()
    lines = [f"expert sets: {len(sets)} ({sum(not s.missing for s in sets)} cached, "
             f"{sum(bool(s.missing) for s in sets)} to train)"]
    scored: set[str] = set()
    total_images, total_seconds = 0, dict.fromkeys(rates, 0.0)
    for s in sets:
        cfg = s.cfg
        name = (f"IR {cfg.schedule.init_ratio:g}, AEE {cfg.schedule.add_end_epoch}, data seed {cfg.data.seed}, "
                f"expert seed {cfg.experts.seed}")
        if not s.missing:
            lines.append(f"  {s.key} {name}: cached ({cfg.experts.num_experts} experts)")
            continue
        # GSAM takes two forward/backward passes per step, SGD (and EL2N) one.
        work = [(s.missing * images_per_expert(cfg), 2 if cfg.experts.optimizer == "gsam" else 1)]
        line = (f"  {s.key} {name}: to train {s.missing} of {cfg.experts.num_experts} experts x "
                f"{cfg.experts.epochs} epochs = {work[0][0]:,} images")
        if s.difficulty_to_score and s.difficulty_to_score not in scored:
            scored.add(s.difficulty_to_score)
            work.append((cfg.difficulty.seeds * cfg.difficulty.epochs * sum(split_sizes(cfg)[0]), 1))
            line += f", after EL2N ({cfg.difficulty.seeds} runs x {cfg.difficulty.epochs} epochs = {work[1][0]:,} images)"
        workers = max(1, min(cfg.resources.workers, s.missing))
        times = []
        for device, rate in rates.items():
            seconds = sum(rate.seconds(images, _net(cfg), passes) for images, passes in work)
            total_seconds[device] += seconds
            times.append(f"{device} {_duration(seconds)} on one worker, {_duration(seconds / workers)} on {workers}")
        total_images += sum(images for images, _ in work)
        lines.append(f"{line}; {'; '.join(times) or 'no measured expert rate'}")
    if total_images:
        lines.append(f"  to train in all: {total_images:,} images; "
                     + "; ".join(f"{d} {_duration(t)} on one worker" for d, t in total_seconds.items()))
        lines += [f"  ({d} rate: {r.gflop_per_s:g} forward GFLOP/s per worker, {r.source}; scaled to each "
                  "network by its FLOPs)" for d, r in rates.items()]
    return lines


def _object_store_lines(sweep: SweepConfig, sets: list[ExpertSetPlan]) -> list[str]:
    trajectories = sum(s.cfg.experts.num_experts * window_rows(s.cfg, s.last_epoch) * _net(s.cfg).params * WORD
                       for s in sets)
    by_seed = {cfg.data.seed: cfg for cfg in _trial_configs(sweep)}
    data = sum(dataset_bytes(cfg) for cfg in by_seed.values())
    windows = ", ".join(sorted({f"rows 0..{s.last_epoch} and the last of {s.cfg.experts.epochs + 1}"
                                if window_rows(s.cfg, s.last_epoch) < s.cfg.experts.epochs + 1
                                else f"all {s.cfg.experts.epochs + 1} rows" for s in sets}))
    return [f"object store: {_gb(trajectories + data)} = trajectories {_gb(trajectories)} "
            f"({sum(s.cfg.experts.num_experts for s in sets)} experts; {windows}) + dataset {_gb(data)} "
            f"({len(by_seed)} data seed{'s' * (len(by_seed) > 1)})"]


def _memory_lines(sweep: SweepConfig) -> list[str]:
    shapes: dict[tuple, RunConfig] = {}
    for cfg in _trial_configs(sweep):
        d = cfg.distill
        shapes.setdefault((cfg.data.dataset, cfg.model, d.ipc, d.syn_steps, d.batch_syn, d.gradient), cfg)
    lines = []
    for model in memory_models().values():
        lines.append(f"memory per trial, peak of a matching iteration ({model.device} model within "
                     f"{model.tolerance:.0%} of its rows; {model.source}):")
        for cfg in sorted(shapes.values(), key=lambda c: (c.distill.ipc, c.distill.syn_steps, c.distill.batch_syn)):
            d = cfg.distill
            estimates = ", ".join(f"{path} {_gb(trial_memory(cfg, model, path))}" for path in PATHS)
            batch = min(d.batch_syn, d.ipc * len(DATASET_SHAPES[cfg.data.dataset].train_per_class))
            note = AUTO_NOTE if d.gradient == "auto" else ""
            lines.append(f"  IPC {d.ipc}, N {d.syn_steps}, batch {batch}: {estimates}; "
                         f"this sweep uses {d.gradient}{note}")
    if "cuda" not in memory_models():
        lines.append("  (no CUDA constants yet: autograd saves the same tensors on a GPU, where CUDA's context "
                     "and its allocator's slack come on top)")
    return lines


def describe(sweep: SweepConfig, source: str) -> str:
    """The plan of a sweep (as `load_sweep` returns it): the lines `--dry-run` prints."""
    from pad_ray import files

    sweep = with_absolute_base(sweep)
    first = _trial_configs(sweep)[0]
    # The run's own checks of its outputs, which create nothing.
    for key, where in (("storage_path", sweep.storage_path), ("base.output_dir", first.output_dir),
                       ("base.store_dir", first.store_dir)):
        files.check_writable(where, key)
    grid = [f"{key} {len(axis.values)}" for key, axis in sweep.space.items() if axis.kind == "grid"]
    drawn = [f"{key} {axis.kind} {list(axis.values)}" for key, axis in sweep.space.items() if axis.kind != "grid"]
    repeats = [f"{sweep.num_samples} repeats"] if sweep.num_samples > 1 else []
    if sweep.search.kind == "grid":
        trials = (f"trials: {sweep.total_trials} ({' x '.join(grid + repeats) or 'one point'}"
                  + (f"; drawn once per trial: {', '.join(drawn)}" if drawn else "") + ")")
    else:
        trials = f"trials: {sweep.total_trials} ({sweep.search.kind} search budget: num_samples draws of the space)"
    sets = expert_set_plans(sweep)
    return "\n".join([
        f"plan of sweep {sweep.name} ({source}); nothing has been trained, started or written", trials,
        _stopping_line(sweep), _controls_line(sweep), *_expert_lines(sets), *_object_store_lines(sweep, sets),
        *_memory_lines(sweep)])


def _stopping_line(sweep: SweepConfig) -> str:
    """How ASHA cuts trials short, and whether timing can change which (pad_ray.scheduling)."""
    asha = sweep.asha
    where = f"within each {' x '.join(sweep.group_by)}" if sweep.group_by else "over all trials"
    how = ("judged in trial order (asha.repeatable), so every run stops the same trials" if asha.repeatable else
           "judged as results arrive, so timing can decide close calls (asha.repeatable: true judges in trial order)")
    return (f"early stopping: ASHA on {asha.metric} ({asha.mode}) {where}, from evaluation {asha.grace_period}, "
            f"keeping 1 in {asha.reduction_factor:g} at each rung; {how}")


def _controls_line(sweep: SweepConfig) -> str:
    """What the controls (pad_ray.controls) add once the trials end: final evaluations of other sets."""
    sets = [*(["its starting set"] if sweep.controls.starting_set else []),
            *([f"{sweep.controls.random_subsets} random real subsets"] if sweep.controls.random_subsets else [])]
    if not sets:
        return "controls: none"
    tops = 1
    for key in sweep.group_by:
        tops *= len(sweep.space[key].values)
    which = f"the top trial of each {' x '.join(sweep.group_by)} ({tops})" if sweep.group_by else "the top trial"
    evaluations = tops * (sweep.controls.starting_set + sweep.controls.random_subsets)
    return f"controls: {which} against {' and '.join(sets)}: {evaluations} more final evaluations in all"
