"""Evaluation: fresh networks trained on a (synthetic) set, then tested on real data.

The protocol of DATM/PAD: SGD with momentum 0.9 and weight decay 5e-4 at the learned lr, soft-label
cross-entropy on the learned logit labels (plain cross-entropy for hard labels), DSA on every batch,
lr x0.1 at half the epochs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pad_ray.augment import DEFAULT_STRATEGY, dsa_if
from pad_ray.config import EvalConfig, ModelConfig
from pad_ray.data import Split
from pad_ray.models import seeded_model
from pad_ray.matching import soft_cross_entropy
from pad_ray.runtime import derive_seed, generator, keep_freed_memory_in_heap


@dataclass(frozen=True)
class SyntheticSet:
    images: torch.Tensor  # [n, C, H, W] in the preprocessed space
    labels: torch.Tensor  # float logits [n, classes] (soft) or int64 [n] (hard)
    lr: float


@dataclass(frozen=True)
class Scores:
    """Accuracies of each evaluation net, per architecture."""

    val: dict[str, list[float]]
    test: dict[str, list[float]]

    @staticmethod
    def summary(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def random_real_subset(train: Split, num_classes: int, ipc: int, lr: float, gen: torch.Generator) -> SyntheticSet:
    """The control every distilled set must beat: `ipc` random real images per class, hard labels."""
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(train.labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[:ipc]])
    picks = torch.cat(picks)
    return SyntheticSet(train.images[picks], train.labels[picks], lr)


def accuracy(net: nn.Module, split: Split, device: torch.device, batch: int = 1024) -> float:
    if len(split.labels) == 0:
        return float("nan")
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)  # one sync at the end, not one per batch
    with torch.no_grad():
        for start in range(0, len(split.labels), batch):
            x = split.images[start:start + batch].to(device)
            y = split.labels[start:start + batch].to(device)
            correct += (net(x).argmax(dim=1) == y).sum()
    return correct.item() / len(split.labels)


def train_on(synthetic: SyntheticSet, net: nn.Module, cfg: EvalConfig, seed: int, device: torch.device,
             strategy: str = DEFAULT_STRATEGY, on_epoch: Callable[[], object] | None = None) -> nn.Module:
    """Train `net` on the synthetic set with the evaluation protocol; returns it trained. `on_epoch` is
    called after every epoch."""
    if torch.device(device).type == "cpu":
        keep_freed_memory_in_heap()  # reuse freed activation buffers instead of re-faulting them (see matching)
    images, labels = synthetic.images.detach().to(device), synthetic.labels.detach().to(device)
    loss_fn = F.cross_entropy if labels.dtype == torch.long else soft_cross_entropy
    optimizer = torch.optim.SGD(net.parameters(), lr=synthetic.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    dsa = dsa_if(cfg.dsa, strategy)
    gen = generator(seed)
    net.train()
    for epoch in range(cfg.epochs):
        if epoch == cfg.epochs // 2:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        for batch in torch.randperm(len(images), generator=gen).split(cfg.batch_size):
            batch = batch.to(device)
            x = images[batch]
            if dsa is not None:
                x = dsa(x, gen)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(x), labels[batch]).backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch()
    return net


def evaluate(synthetic: SyntheticSet, val: Split, test: Split, num_classes: int, model: ModelConfig,
             cfg: EvalConfig, seed: int, device: torch.device, *, num_nets: int | None = None,
             models: tuple[str, ...] | None = None, strategy: str = DEFAULT_STRATEGY,
             progress: bool = False, leave: bool = True) -> Scores:
    """Train `num_nets` fresh nets per architecture and measure validation and test accuracy. With `progress`,
    a bar counts the nets' epochs (a final evaluation can take longer than the distillation before it); it
    stays when done if `leave`, else it is cleared (an evaluation under the distill bar)."""
    channels, size = synthetic.images.shape[1], synthetic.images.shape[-1]
    names, nets = models or cfg.models, num_nets or cfg.num_nets
    val_acc: dict[str, list[float]] = {}
    test_acc: dict[str, list[float]] = {}
    # Explicit, not tqdm's leave=None (keep the bar only at position 0): any other bar still open in the process
    # would move a final evaluation's bar down, and it would vanish with its last count.
    with tqdm(total=len(names) * nets * cfg.epochs, desc="evaluation", unit="epoch", disable=not progress,
              leave=leave) as bar:
        for name in names:
            for k in range(nets):
                bar.set_postfix_str(f"{name} net {k + 1}/{nets}")
                net_seed = derive_seed(seed, "eval", name, k)
                net = seeded_model(model, channels, num_classes, size, net_seed, name=name).to(device)
                train_on(synthetic, net, cfg, net_seed, device, strategy, on_epoch=bar.update)
                val_acc.setdefault(name, []).append(accuracy(net, val, device))
                test_acc.setdefault(name, []).append(accuracy(net, test, device))
    return Scores(val_acc, test_acc)
