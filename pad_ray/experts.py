"""One expert: a network trained on PAD's scheduled data, its weights recorded after every epoch.

The trajectory is a float32 array [epochs + 1, P]: row 0 holds the initial weights, row e the
weights after e epochs, in `module.parameters()` order (the flat order the matching mask uses).
Optimiser: plain SGD (MTT) or GSAM (the FTD experts DATM and PAD use). Every draw comes from the
expert's seed, so an expert is reproducible wherever and whenever it is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pad_ray.augment import DEFAULT_STRATEGY, dsa_if
from pad_ray.config import ExpertConfig, ModelConfig, ScheduleConfig
from pad_ray.data import Split
from pad_ray.models import FlatParams, seeded_model
from pad_ray.runtime import generator, keep_freed_memory_in_heap
from pad_ray.schedule import scheduled_indices

_EPS = 1e-12


def _params_with_grad(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.grad is not None]


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def gsam_step(net: nn.Module, loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
              rho: float, alpha: float, adaptive: bool) -> torch.Tensor:
    """One GSAM step (Zhuang et al. 2022): ascend to w + e, take the gradient there, subtract alpha
    times the part of the original gradient orthogonal to it, return to w, step. Two passes per step."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    params = _params_with_grad(net)
    with torch.no_grad():
        old_grads = [p.grad.clone() for p in params]
        scale = rho / (_norm([(p.abs() if adaptive else 1.0) * p.grad for p in params]) + _EPS)
        shifts = [p.grad * scale * (p.pow(2) if adaptive else 1.0) for p in params]
        for p, e in zip(params, shifts):
            p.add_(e)
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    with torch.no_grad():
        new_grads = [p.grad for p in params]
        new_norm, old_norm = _norm(new_grads), _norm(old_grads)
        cosine = sum((o * n).sum() for o, n in zip(old_grads, new_grads)) / (new_norm * old_norm + _EPS)
        for p, old, e in zip(params, old_grads, shifts):
            vertical = old - cosine * old_norm * p.grad / (new_norm + _EPS)
            p.grad.sub_(alpha * vertical)
            p.sub_(e)
    optimizer.step()
    return loss.detach()


class ExpertRun:
    """The state of one expert in training; `state_dict` allows resuming between epochs."""

    def __init__(self, train: Split, order: Sequence[torch.Tensor], num_classes: int, model: ModelConfig,
                 experts: ExpertConfig, schedule: ScheduleConfig, seed: int, device: torch.device,
                 strategy: str = DEFAULT_STRATEGY):
        self.train, self.order, self.cfg, self.schedule = train, order, experts, schedule
        self.device = device
        if torch.device(device).type == "cpu":
            keep_freed_memory_in_heap()  # reuse freed activation buffers instead of re-faulting them (runtime)
        channels, size = train.images.shape[1], train.images.shape[-1]
        self.net = seeded_model(model, channels, num_classes, size, seed).to(device)
        self.flat = FlatParams(self.net)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=experts.lr, momentum=experts.momentum,
                                         weight_decay=experts.weight_decay)
        self.gen = generator(seed)
        self.dsa = dsa_if(experts.dsa, strategy)
        self.snapshots = [self.flat.flatten().cpu()]
        # The compiled module shares self.net's parameters; it sees only full batches, so the smaller last
        # batch of an epoch (whose size changes with the schedule) never costs a compile of its own.
        self.compiled = torch.compile(self.net) if experts.compile else None

    @property
    def epoch(self) -> int:
        return len(self.snapshots) - 1

    def run_epoch(self) -> float:
        """Train one epoch on this epoch's scheduled subset; returns the mean training loss."""
        self.net.train()
        subset = scheduled_indices(self.epoch, self.order, self.schedule)
        subset = subset[torch.randperm(len(subset), generator=self.gen)]
        # Summed on the device: a .item() per batch would make a GPU wait for every step.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in subset.split(self.cfg.batch_size):
            x = self.train.images[batch].to(self.device)
            y = self.train.labels[batch].to(self.device)
            if self.dsa is not None:
                x = self.dsa(x, self.gen)
            total += self._step(x, y).detach().double() * len(batch)
        self.snapshots.append(self.flat.flatten().cpu())
        return total.item() / len(subset)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = self.compiled if self.compiled is not None and len(x) == self.cfg.batch_size else self.net

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(net(x), y)

        if self.cfg.optimizer == "gsam":
            return gsam_step(self.net, loss_fn, self.optimizer, self.cfg.rho, self.cfg.gsam_alpha,
                             self.cfg.adaptive)
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def trajectory(self) -> np.ndarray:
        return torch.stack(self.snapshots).numpy()

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.gen.get_state(), "snapshots": torch.stack(self.snapshots)}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self.snapshots = list(state["snapshots"])


def train_expert(train: Split, order: Sequence[torch.Tensor], num_classes: int, model: ModelConfig,
                 experts: ExpertConfig, schedule: ScheduleConfig, seed: int, device: torch.device,
                 on_epoch: Callable[[int, float], None] | None = None,
                 strategy: str = DEFAULT_STRATEGY) -> np.ndarray:
    """Train one expert for `experts.epochs` epochs and return its trajectory [epochs + 1, P]."""
    run = ExpertRun(train, order, num_classes, model, experts, schedule, seed, device, strategy)
    while run.epoch < experts.epochs:
        loss = run.run_epoch()
        if on_epoch is not None:
            on_epoch(run.epoch, loss)
    return run.trajectory()
