"""Adaptive clipping of the outer gradients: a guard against the rare exploding step of unrolled matching.

Backpropagating through N unrolled student steps now and then returns a gradient tens of times its
usual size at an ordinary matching loss: on MNIST IPC 10 (N 30), 110 times the median on the images at
a loss of 0.48, always from a start epoch of 0. With `lr_img` 100 and momentum, that one step moves the
images further than the 90 iterations before it together, and the loss climbs above the skip
threshold for the next hundred or more (BENCHMARKS.md, section 6). The threshold cannot see it: the
loss of the exploding step itself is low. The released code has no such guard; `distill.clip_ratio:
null` keeps its behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def norms_of(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradients' L2 norms as one float64 CPU tensor: a single device transfer per step."""
    return torch.stack([g.detach().norm() for g in grads]).double().cpu()


class AdaptiveClip:
    """Scale each gradient down to at most `ratio` times the running average of its own earlier norms.

    The average is an exponential one over applied updates, fed the norms after clipping, so that a
    spike cannot raise its own bound. Each tensor (images, labels, syn_lr) has its own: their scales
    differ by two orders of magnitude. The first update only starts the averages."""

    DECAY = 0.9  # about the last ten updates

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.average: torch.Tensor | None = None

    def __call__(self, grads: Sequence[torch.Tensor], norms: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
        """`norms`: `norms_of(grads)`, which the caller also logs."""
        if self.average is None:
            self.average = norms
            return list(grads), False
        bounds = self.ratio * self.average
        over = norms > bounds
        scale = torch.where(over, bounds / norms.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
        self.average = self.DECAY * self.average + (1 - self.DECAY) * torch.minimum(norms, bounds)
        return [g * float(s) if o else g for g, s, o in zip(grads, scale, over)], bool(over.any())

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = state["average"]
