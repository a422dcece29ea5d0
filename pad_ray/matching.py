"""Trajectory matching with PAD's parameter selection, and its two gradient paths.

The student starts at expert snapshot `start` (epoch s), takes N SGD steps of size `syn_lr` on
minibatches of the synthetic set, and is compared with the expert at epoch s + M (`target`):

    L = sum_K (theta_N - target)^2 / sum_K (start - target)^2

K is the set of kept flat-parameter indices: `depth` drops the first int(alpha * P) (shallow
layers, paper Eq. 4), `loss` drops the alpha fraction with the smallest current error (the
released PAD.py), `none` keeps all. Both sums use the same K.

`unrolled_gradients` keeps every step's graph (memory grows with N x batch). `two_pass_gradients`
stores only the N flat parameter vectors and back-propagates through one step at a time,
recomputing it, so its memory does not grow with N; it is exact reverse-mode differentiation of the
same computation, hence gives the unrolled path's gradients (TESLA's variant drops the terms that
flow through theta_i; this one keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pad_ray.augment import DSA, Draw
from pad_ray.models import FlatParams
from pad_ray.runtime import keep_freed_memory_in_heap


@dataclass(frozen=True)
class InnerStep:
    """What one inner step trains on; recorded so that both gradient paths replay it exactly."""

    indices: torch.Tensor  # rows of the synthetic set, on the CPU where they were drawn
    draw: Draw | None  # DSA parameters, None when augmentation is off


@dataclass(frozen=True)
class Matching:
    loss: float
    grad_images: torch.Tensor
    grad_labels: torch.Tensor
    grad_lr: torch.Tensor


def depth_cut(size: int, alpha: float) -> int:
    """Number of leading (shallowest) flat parameters that the depth rule drops."""
    return int(alpha * size)


def keep_mask(error: torch.Tensor, alpha: float, selection: str) -> torch.Tensor:
    """Float 0/1 mask of the kept parameters, from the detached per-element error."""
    size = error.numel()
    mask = torch.ones_like(error)
    if selection == "depth":
        mask[: depth_cut(size, alpha)] = 0
    elif selection == "loss":
        mask[torch.argsort(error)[: int(alpha * size)]] = 0
    elif selection != "none":
        raise ValueError(f"selection: unknown rule {selection!r}; allowed: depth, loss, none")
    return mask


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against softmax(target_logits): DATM's learnable soft labels."""
    return -(F.log_softmax(logits, dim=1) * F.softmax(target_logits, dim=1)).sum(dim=1).mean()


def plan_steps(num_images: int, batch: int, steps: int, image_size: tuple[int, int],
               dsa: DSA | None, gen: torch.Generator) -> list[InnerStep]:
    """Minibatches as the reference draws them: a fresh permutation split into chunks, popped from
    the end, refilled when empty; one DSA draw per step."""
    plan, chunks = [], []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(num_images, generator=gen).split(batch))
        indices = chunks.pop()
        draw = dsa.sample(len(indices), image_size, gen) if dsa is not None else None
        plan.append(InnerStep(indices, draw))
    return plan


def _rows_on(plan: list[InnerStep], device: torch.device) -> list[torch.Tensor]:
    """Each step's rows on the images' device: plans are drawn on the CPU (so a seed gives the same plan
    on every device), and index_add_ needs its index beside the tensor it adds into."""
    return [step.indices.to(device) for step in plan]


def _batch_loss(net: FlatParams, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                draw: Draw | None, dsa: DSA | None) -> torch.Tensor:
    if draw is not None:
        x = dsa.apply(x, draw)
    return soft_cross_entropy(net.forward(theta, x), y)


def _distance_ratio(end: torch.Tensor, start: torch.Tensor, target: torch.Tensor,
                    alpha: float, selection: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mask, denominator); the mask depends on the error only through a non-differentiable sort."""
    error = (end - target) ** 2
    mask = keep_mask(error.detach(), alpha, selection)
    denominator = (mask * (start - target) ** 2).sum()
    return (mask * error).sum() / denominator, mask, denominator


def unrolled_gradients(net: FlatParams, images: torch.Tensor, labels: torch.Tensor, syn_lr: torch.Tensor,
                       start: torch.Tensor, target: torch.Tensor, plan: list[InnerStep], dsa: DSA | None,
                       alpha: float, selection: str) -> Matching:
    """The reference path: every inner step is kept in the graph (create_graph=True)."""
    leaves = [t.detach().requires_grad_() for t in (images, labels, syn_lr)]
    x_all, y_all, lr = leaves
    theta = start.detach().clone().requires_grad_()
    for step, rows in zip(plan, _rows_on(plan, images.device)):
        loss = _batch_loss(net, theta, x_all[rows], y_all[rows], step.draw, dsa)
        grad = torch.autograd.grad(loss, theta, create_graph=True)[0]
        theta = theta - lr * grad
    loss, _, _ = _distance_ratio(theta, start, target, alpha, selection)
    grads = torch.autograd.grad(loss, leaves)
    return Matching(loss.item(), *grads)


def two_pass_gradients(net: FlatParams, images: torch.Tensor, labels: torch.Tensor, syn_lr: torch.Tensor,
                       start: torch.Tensor, target: torch.Tensor, plan: list[InnerStep], dsa: DSA | None,
                       alpha: float, selection: str) -> Matching:
    """Constant-memory path: forward without graphs, then reverse through one recomputed step at a time.

    With theta_{i+1} = theta_i - lr * g_i and lam_{i+1} = dL/dtheta_{i+1}:
        dL/dtheta_i = lam_{i+1} - lr * H_i lam_{i+1},  dL/d(batch_i) = -lr * d(g_i . lam_{i+1})/d(batch_i),
        dL/dlr = -sum_i g_i . lam_{i+1}.
    """
    if images.device.type == "cpu":
        # Its memory is bounded by one step, so keeping freed blocks costs little and saves re-faulting them.
        keep_freed_memory_in_heap()
    images, labels = images.detach(), labels.detach()
    lr = syn_lr.detach()
    rows_of = _rows_on(plan, images.device)
    thetas = [start.detach()]
    for step, rows in zip(plan, rows_of):
        theta = thetas[-1].detach().requires_grad_()
        loss = _batch_loss(net, theta, images[rows], labels[rows], step.draw, dsa)
        grad = torch.autograd.grad(loss, theta)[0]
        thetas.append(thetas[-1] - lr * grad)

    end = thetas.pop().requires_grad_()
    loss, _, _ = _distance_ratio(end, start, target, alpha, selection)
    lam = torch.autograd.grad(loss, end)[0]

    grad_images, grad_labels = torch.zeros_like(images), torch.zeros_like(labels)
    grad_lr = torch.zeros_like(lr)
    for step, rows, theta in zip(reversed(plan), reversed(rows_of), reversed(thetas)):
        theta = theta.detach().requires_grad_()
        x = images[rows].requires_grad_()
        y = labels[rows].requires_grad_()
        grad = torch.autograd.grad(_batch_loss(net, theta, x, y, step.draw, dsa), theta, create_graph=True)[0]
        d_theta, d_x, d_y = torch.autograd.grad((grad * lam).sum(), (theta, x, y))
        grad_lr -= (grad.detach() * lam).sum()
        # A step's rows are distinct (one chunk of a permutation), so each row receives one addition
        # and the result does not depend on the order of CUDA's atomic adds.
        grad_images.index_add_(0, rows, -lr * d_x)
        grad_labels.index_add_(0, rows, -lr * d_y)
        lam = lam - lr * d_theta
    return Matching(loss.item(), grad_images, grad_labels, grad_lr.reshape(syn_lr.shape))


GRADIENT_PATHS = {"unrolled": unrolled_gradients, "constant_memory": two_pass_gradients}
