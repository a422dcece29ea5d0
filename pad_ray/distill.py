"""PAD distillation: learn synthetic images, soft labels and a step size by matching expert trajectories.

Each outer iteration: take the next expert (shuffled, without replacement), draw a start epoch s
from DATM's growing window, run the student from snapshot s for N steps on the synthetic set, match
it against snapshot s + M with the PAD-masked loss, and update images, labels and syn_lr (skipped
when the loss is above the threshold). The whole state can be checkpointed and resumed exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pad_ray import files
from pad_ray.augment import dsa_if
from pad_ray.clipping import AdaptiveClip, norms_of
from pad_ray.config import ConfigError, RunConfig
from pad_ray.data import Dataset
from pad_ray.evaluate import Scores, SyntheticSet, evaluate
from pad_ray.models import seeded_model
from pad_ray.matching import AutoPath, depth_cut, gradient_path, plan_steps
from pad_ray.models import FlatParams
from pad_ray.runtime import derive_seed, generator, keep_freed_memory_in_heap, peak_memory_mb

Trajectory = np.ndarray  # [epochs + 1, P] float32; memory-mapped file or object-store buffer


class DivergenceError(RuntimeError):
    """Distillation diverged (non-finite loss, or a step size that is no longer positive)."""


def _snapshot(trajectory: Trajectory, epoch: int, device: torch.device) -> torch.Tensor:
    # A copy: buffers from files and the object store are read-only.
    return torch.tensor(np.asarray(trajectory[epoch]), device=device)


def _logits(net: FlatParams, flat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net.forward(flat, x) for x in images.split(256)])


def initial_images(cfg: RunConfig, data: Dataset, net: FlatParams, finals: list[torch.Tensor],
                   gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """`ipc` images per class, class-contiguous: real samples some expert classifies correctly
    (`correct`), random real samples (`real`) or N(0, 1) noise (`noise`)."""
    ipc, train = cfg.distill.ipc, data.train
    chosen = []
    for c in range(data.num_classes):
        members = torch.nonzero(train.labels == c).flatten()
        if len(members) < ipc:
            raise ConfigError(f"distill.ipc: {ipc} is larger than class {c} ({len(members)} training samples)")
        members = members[torch.randperm(len(members), generator=gen)]
        if cfg.distill.pix_init == "correct":
            members = _correct_first(net, finals, train.images, members, c, ipc, device)
        chosen.append(members[:ipc])
    images = train.images[torch.cat(chosen)].to(device)
    if cfg.distill.pix_init == "noise":
        images = torch.randn(images.shape, generator=gen).to(device)
    return images


_SCAN_BATCH = 256  # images per forward pass while looking for correctly predicted ones (the reference's)


def _correct_first(net: FlatParams, finals: list[torch.Tensor], images: torch.Tensor, members: torch.Tensor,
                   label: int, ipc: int, device: torch.device) -> torch.Tensor:
    """The `ipc` members of class `label` to start from: samples an expert predicts correctly, taken in
    `members`' order expert by expert as the reference does, then samples no expert gets right. An expert
    scans in batches and stops once `ipc` are picked: scoring a whole class took seconds per class on
    MNIST, at every run start and resume, where the first batch of a trained expert is usually enough."""
    picked: list[int] = []
    remaining = torch.ones(len(members), dtype=torch.bool)
    for final in finals:
        for begin in range(0, len(members), _SCAN_BATCH):
            if len(picked) == ipc:
                break
            batch = images[members[begin:begin + _SCAN_BATCH]].to(device)
            correct = (_logits(net, final, batch).argmax(dim=1) == label).cpu() & remaining[begin:begin + _SCAN_BATCH]
            take = torch.nonzero(correct).flatten()[: ipc - len(picked)] + begin
            picked += take.tolist()
            remaining[take] = False
    fill = torch.nonzero(remaining).flatten()[: ipc - len(picked)].tolist()
    return members[torch.tensor(picked + fill, dtype=torch.long)]


def initial_labels(net: FlatParams, finals: list[torch.Tensor], images: torch.Tensor,
                   hard: torch.Tensor, pix_init: str = "correct") -> torch.Tensor:
    """DATM's soft labels: per image, the mean logits of the experts that classify it correctly
    (of all experts where none does). For `pix_init: real` the released code instead takes the raw
    logits of its first expert, unfiltered (docs/decisions.md); so does this."""
    if pix_init == "real":
        return _logits(net, finals[0], images)
    all_logits = torch.stack([_logits(net, f, images) for f in finals])  # [E, n, C]
    correct = (all_logits.argmax(dim=2) == hard.to(all_logits.device)).float()  # [E, n]
    none = correct.sum(dim=0) == 0
    correct[:, none] = 1.0
    return (correct.unsqueeze(2) * all_logits).sum(dim=0) / correct.sum(dim=0).unsqueeze(1)


def _warn_if_cut_reaches_classifier(net: FlatParams, alpha: float, selection: str) -> None:
    """Classifier rows are class-specific: a depth cut there ignores whole classes (docs/decisions.md)."""
    if selection != "depth":
        return
    cut = depth_cut(net.size, alpha)
    name = next(name for name, _, end in net.spans() if cut < end) if cut < net.size else "classifier"
    if name.startswith("classifier"):
        warnings.warn(f"distill.alpha={alpha} drops part of {name}: the depth cut reaches the classifier, "
                      "so some classes' rows are not matched", stacklevel=3)


@dataclass(frozen=True)
class StepStats:
    iteration: int
    loss: float
    skipped: bool
    syn_lr: float
    expert: int
    start_epoch: int
    grad_norm: float  # of the images' outer gradient before any clipping: where an exploding step shows
    clipped: bool


@dataclass(frozen=True)
class Best:
    """The synthetic set with the best validation accuracy so far (None before the first evaluation)."""

    val: float = -1.0
    iteration: int = -1
    synthetic: SyntheticSet | None = None

    def state_dict(self) -> dict[str, Any]:
        # Plain tensors and numbers: checkpoints are read with torch.load(weights_only=True).
        state: dict[str, Any] = {"val": self.val, "iteration": self.iteration}
        if self.synthetic is not None:
            state.update(images=self.synthetic.images, labels=self.synthetic.labels, lr=self.synthetic.lr)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Best:
        synthetic = SyntheticSet(state["images"], state["labels"], state["lr"]) if "images" in state else None
        return cls(state["val"], state["iteration"], synthetic)


class Distiller:
    """The distillation state and one outer iteration (`step`)."""

    def __init__(self, cfg: RunConfig, data: Dataset, trajectories: Sequence[Trajectory], device: torch.device,
                 memory_share: float = 1.0):
        if not trajectories:
            raise ConfigError("experts.num_experts: distillation needs at least one expert trajectory")
        self.cfg, self.data, self.trajectories, self.device = cfg, data, trajectories, device
        if device.type == "cpu":
            # The unrolled graph's buffers are freed and allocated again every iteration: keep them in the heap.
            keep_freed_memory_in_heap()
        d = cfg.distill
        model = seeded_model(cfg.model, data.channels, data.num_classes, data.image_size, 0).to(device)
        self.net = FlatParams(model)
        _warn_if_cut_reaches_classifier(self.net, d.alpha, d.selection)
        self.dsa = dsa_if(d.dsa, cfg.augment.strategy)
        self.gradients = gradient_path(d.gradient, d.memory_budget_gb, memory_share)
        self.gen = generator(derive_seed(cfg.seed, "distill"))

        finals = [_snapshot(t, len(t) - 1, device) for t in trajectories]
        hard = torch.arange(data.num_classes).repeat_interleave(d.ipc)
        images = initial_images(cfg, data, self.net, finals, self.gen, device)
        self.images = images.detach().clone().requires_grad_()
        self.labels = initial_labels(self.net, finals, images, hard, d.pix_init).detach().requires_grad_()
        self.syn_lr = torch.tensor(d.lr_teacher, device=device).requires_grad_()
        self.opt_images = torch.optim.SGD([self.images], lr=d.lr_img, momentum=d.momentum_img)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=d.lr_lr, momentum=d.momentum_lr)
        self.opt_labels = torch.optim.SGD([self.labels], lr=d.lr_y, momentum=d.momentum_y)

        self.iteration = 0
        self.skipped = 0
        self.clip = AdaptiveClip(d.clip_ratio) if d.clip_ratio is not None else None
        self.clipped = 0
        self.elapsed = 0.0  # seconds spent in outer iterations, across resumptions
        self.expert_order = torch.empty(0, dtype=torch.long)
        self.expert_cursor = 0
        self.best = Best()

    # -- one outer iteration ------------------------------------------------------------------

    def upper_start_epoch(self, iteration: int) -> int:
        """DATM's window: the start-epoch bound grows from T to T+ over `expansion_end_iteration`."""
        d = self.cfg.distill
        span = d.expansion_end_iteration
        if span == 0:
            return d.max_start_epoch
        grown = d.current_max_start_epoch + int((d.max_start_epoch - d.current_max_start_epoch) * iteration / span)
        return min(grown, d.max_start_epoch)

    def _next_expert(self) -> int:
        if self.expert_cursor >= len(self.expert_order):
            self.expert_order = torch.randperm(len(self.trajectories), generator=self.gen)
            self.expert_cursor = 0
        self.expert_cursor += 1
        return int(self.expert_order[self.expert_cursor - 1])

    def step(self) -> StepStats:
        d = self.cfg.distill
        expert = self._next_expert()
        start_epoch = int(torch.randint(d.min_start_epoch, self.upper_start_epoch(self.iteration), (1,),
                                        generator=self.gen))
        trajectory = self.trajectories[expert]
        start = _snapshot(trajectory, start_epoch, self.device)
        target = _snapshot(trajectory, start_epoch + d.expert_epochs, self.device)
        plan = plan_steps(len(self.images), d.batch_syn, d.syn_steps, tuple(self.images.shape[-2:]),
                          self.dsa, self.gen)
        matched = self.gradients(self.net, self.images, self.labels, self.syn_lr, start, target,
                                 plan, self.dsa, d.alpha, d.selection)
        if not math.isfinite(matched.loss):
            raise DivergenceError(f"matching loss is {matched.loss} at iteration {self.iteration}")
        skipped, clipped = matched.loss > d.threshold, False
        grads = [matched.grad_images, matched.grad_labels, matched.grad_lr]
        norms = norms_of(grads)
        if skipped:
            self.skipped += 1
        else:
            if self.clip is not None:
                grads, clipped = self.clip(grads, norms)
                self.clipped += clipped
            for tensor, grad, opt in zip((self.images, self.labels, self.syn_lr), grads,
                                         (self.opt_images, self.opt_labels, self.opt_lr)):
                tensor.grad = grad
                opt.step()
        lr = self.syn_lr.item()
        if not (math.isfinite(lr) and lr > 0):
            raise DivergenceError(f"syn_lr became {lr} at iteration {self.iteration}")
        self.iteration += 1
        return StepStats(self.iteration, matched.loss, skipped, lr, expert, start_epoch, float(norms[0]), clipped)

    # -- results, evaluation, checkpoints -----------------------------------------------------

    def synthetic(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu().clone(), self.labels.detach().cpu().clone(),
                            self.syn_lr.item())

    def evaluate_now(self, progress: bool = False) -> Scores:
        """The during-distillation evaluation: `eval_nets` fresh agent nets, the same nets (initial weights, DSA
        draws, batch orders) at every iteration. The scores choose the set a run keeps, and one net's luck is
        larger than what consecutive sets differ by; with common nets it is shared between the sets compared
        (docs/decisions.md, "Evaluation")."""
        cfg = self.cfg
        return evaluate(self.synthetic(), self.data.val, self.data.test, self.data.num_classes, cfg.model,
                        cfg.evaluate, derive_seed(cfg.seed, "distill-eval"), self.device,
                        num_nets=cfg.distill.eval_nets, models=(cfg.model.name,), strategy=cfg.augment.strategy,
                        progress=progress, leave=False)

    def evaluate_summary(self, progress: bool = False) -> tuple[float, float]:
        """Mean validation and test accuracy of `evaluate_now` on the run's own architecture."""
        scores = self.evaluate_now(progress)
        name = self.cfg.model.name
        return Scores.summary(scores.val[name])[0], Scores.summary(scores.test[name])[0]

    def record_best(self, val_accuracy: float) -> bool:
        """Keep the synthetic set with the best validation accuracy (never selected on test)."""
        if val_accuracy <= self.best.val:
            return False
        self.best = Best(val_accuracy, self.iteration, self.synthetic())
        return True

    def best_synthetic(self) -> SyntheticSet:
        return self.best.synthetic if self.best.synthetic is not None else self.synthetic()

    def state_dict(self) -> dict[str, Any]:
        return {
            "images": self.images.detach().cpu(), "labels": self.labels.detach().cpu(),
            "syn_lr": self.syn_lr.detach().cpu(),
            "opt_images": self.opt_images.state_dict(), "opt_labels": self.opt_labels.state_dict(),
            "opt_lr": self.opt_lr.state_dict(), "generator": self.gen.get_state(),
            "iteration": self.iteration, "skipped": self.skipped, "elapsed": self.elapsed,
            **({"clip": self.clip.state_dict(), "clipped": self.clipped} if self.clip is not None else {}),
            "expert_order": self.expert_order,
            "expert_cursor": self.expert_cursor, "num_experts": len(self.trajectories),
            "best": self.best.state_dict(),
            **({"graph_budget": self.gradients.budget.state_dict()} if isinstance(self.gradients, AutoPath) else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_experts"] != len(self.trajectories):
            raise ConfigError(f"checkpoint was made with {state['num_experts']} experts, "
                              f"this run has {len(self.trajectories)}")
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.labels.copy_(state["labels"])
            self.syn_lr.copy_(state["syn_lr"])
        self.opt_images.load_state_dict(state["opt_images"])
        self.opt_labels.load_state_dict(state["opt_labels"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self.gen.set_state(state["generator"])
        self.iteration, self.skipped, self.elapsed = state["iteration"], state["skipped"], state["elapsed"]
        self.expert_order, self.expert_cursor = state["expert_order"], state["expert_cursor"]
        if self.clip is not None and "clip" in state:
            self.clip.load_state_dict(state["clip"])
            self.clipped = state["clipped"]
        self.best = Best.from_state_dict(state["best"])
        if isinstance(self.gradients, AutoPath) and "graph_budget" in state:
            self.gradients.budget.load_state_dict(state["graph_budget"])

    def save(self, path: Path) -> None:
        files.save_torch(path, self.state_dict())

    def restore(self, path: Path) -> None:
        self.load_state_dict(files.load_torch(path))


def distill(cfg: RunConfig, data: Dataset, trajectories: Sequence[Trajectory], device: torch.device, *,
            state: dict[str, Any] | None = None,
            on_eval: Callable[[Distiller, dict[str, Any]], None] | None = None,
            progress: bool = True, memory_share: float = 1.0) -> Distiller:
    """Run (or resume from a `state_dict`) to `distill.iterations`, evaluating every `eval_every`
    iterations and at the end. `on_eval(distiller, metrics)` is where callers checkpoint and report;
    `metrics["steps"]` holds the per-iteration statistics since the previous evaluation.
    `memory_share`: this run's part of the device's free memory, for `auto`'s default budget."""
    d = cfg.distill
    distiller = Distiller(cfg, data, trajectories, device, memory_share)
    if state is not None:
        distiller.load_state_dict(state)
    start: dict[str, float] = {}
    if d.eval_start and distiller.iteration == 0:
        # Not a report of its own (a sweep's rungs count evaluations of the distillation); its scores
        # ride on the first report.
        val, test = distiller.evaluate_summary(progress)
        distiller.record_best(val)
        start = {"start_val_accuracy": val, "start_test_accuracy": test}
    steps: list[StepStats] = []
    # A with-block: a run that raises (divergence, a stopped trial) closes its bar, which would otherwise stay
    # open in the process and push every later bar down a line.
    with tqdm(total=d.iterations, initial=distiller.iteration, desc="distill", disable=not progress) as bar:
        while distiller.iteration < d.iterations:
            began = time.perf_counter()
            stats = distiller.step()
            distiller.elapsed += time.perf_counter() - began
            steps.append(stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{stats.syn_lr:.4g}")
            if stats.iteration % d.eval_every == 0 or stats.iteration == d.iterations:
                # At IPC 50 one evaluation net takes minutes, during which the distill bar would stand still.
                val, test = distiller.evaluate_summary(progress)
                distiller.record_best(val)
                metrics = {"iteration": stats.iteration, "loss": stats.loss, "skipped": distiller.skipped,
                           "clipped": distiller.clipped,
                           "syn_lr": stats.syn_lr, "val_accuracy": val, "test_accuracy": test,
                           "best_val_accuracy": distiller.best.val, "best_iteration": distiller.best.iteration,
                           "distill_time_s": distiller.elapsed,
                           "peak_memory_mb": peak_memory_mb(device), "steps": [asdict(s) for s in steps], **start}
                steps, start = [], {}
                if on_eval is not None:
                    on_eval(distiller, metrics)
    return distiller
