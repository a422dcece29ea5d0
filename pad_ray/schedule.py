"""PAD's data scheduler: which training samples an expert sees in a given epoch.

Each class is ordered easy -> hard. Until epoch AEE a class keeps its easiest `int(p * n_c)` samples
with `p = min(1, IR + (1 - IR) * e / AEE)`; then everything; after each removal step its easiest
`int(fraction * n_c)` are dropped. Counts come from each class's own size (the released code
hard-codes 5000 per class and breaks on CIFAR-100 and Tiny ImageNet).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pad_ray.config import ConfigError, ScheduleConfig


def class_range(epoch: int, n: int, schedule: ScheduleConfig) -> tuple[int, int]:
    """The [start, stop) slice of one class's easy -> hard order used in `epoch`."""
    aee = schedule.add_end_epoch
    if epoch <= aee and aee > 0:
        ratio = min(1.0, schedule.init_ratio + (1.0 - schedule.init_ratio) * epoch / aee)
        return 0, int(ratio * n)
    start = 0
    for step in schedule.remove:
        if epoch > step.after_epoch:
            start = int(step.easiest_fraction * n)
    return start, n


def scheduled_indices(epoch: int, order: Sequence[torch.Tensor], schedule: ScheduleConfig) -> torch.Tensor:
    """Global indices of the samples used in `epoch`; `order[c]` lists class c easy -> hard."""
    parts = []
    for class_order in order:
        start, stop = class_range(epoch, len(class_order), schedule)
        parts.append(class_order[start:stop])
    return torch.cat(parts)


def check_schedule(order: Sequence[torch.Tensor], schedule: ScheduleConfig, epochs: int) -> None:
    """Reject a schedule under which some class would contribute no sample in some epoch."""
    for c, class_order in enumerate(order):
        for epoch in range(epochs):
            start, stop = class_range(epoch, len(class_order), schedule)
            if stop <= start:
                raise ConfigError(
                    f"schedule: class {c} ({len(class_order)} samples) would be empty at expert epoch {epoch}; "
                    "raise schedule.init_ratio or lower the removal fractions"
                )
