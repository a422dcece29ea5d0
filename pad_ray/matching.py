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
flow through theta_i; this one keeps them). `auto_gradients` is the path between them that both are
special cases of: it keeps the graphs of as many trailing steps as a memory budget holds and
recomputes the rest, so an iteration recomputes only what the budget forces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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
    kept: int  # inner steps whose graphs were held; the others were recomputed


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


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation could get now: on CUDA the device's free memory plus the blocks the
    caching allocator holds unused; on the CPU the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class GraphBudget:
    """How many trailing inner steps `auto_gradients` keeps in the graph: as many as fit in `budget_bytes`.

    A kept step costs the storage its graph saves for the final backward. That is measured, not
    modelled: a kept step runs under a saved-tensors hook that sums the distinct storages it saves
    (0.30 GB for the CIFAR-10 ConvNet on 100 images), and the largest figure seen per batch size is the
    estimate. The figure depends on the batch size and the step's DSA family only (the six families of
    that ConvNet are within 1% of each other), so each pair is measured once per process. The hook
    calls Python for each of a step's 141 saved tensors and again as the backward unpacks them: a tenth
    of an iteration where per-op overhead dominates (a GPU; a narrow net on the CPU). The first call
    has no figure yet and keeps one step to get it. The estimate is multiplied by ALLOCATOR_OVERHEAD
    because the allocator holds more than the tensors: with freed memory kept in glibc's heap, as
    Distiller has it on the CPU, RSS grew by 0.485 GB per unrolled step there (BENCHMARKS.md, glibc-heap
    rows, N 10 to 20), 1.6x the saved bytes. One budget serves one model and image shape (one Distiller).

    `budget_bytes` None means: what the device has free at the first call, times FREE_FRACTION and
    `share` (a sweep trial's part of a device that other trials use too). Once, not at every call: on
    the CPU the heap keeps the freed graphs of the last iteration (see runtime.keep_freed_memory_in_heap),
    which the kernel no longer counts as available, so a budget read again would shrink by what this
    process itself holds for reuse.
    """

    ALLOCATOR_OVERHEAD = 1.6
    # The rest of the free memory is for what the iteration needs besides kept graphs: the reverse
    # sweep's one recomputed step, the final backward's buffers, and other processes' growth.
    FREE_FRACTION = 0.8

    def __init__(self, budget_bytes: int | None = None, share: float = 1.0):
        self.budget_bytes, self.share = budget_bytes, share
        self.step_bytes: dict[int, int] = {}  # batch rows -> largest saved bytes of one kept step
        self.measured: set[tuple[int, str | None]] = set()  # (batch rows, DSA family) of the measured steps

    def estimate(self, rows: int) -> float:
        """Bytes one kept step of `rows` images will hold. A figure from a smaller batch is scaled up
        in proportion and one from a larger batch is taken as it is, so both err on the large side."""
        return self.ALLOCATOR_OVERHEAD * max(saved * max(1.0, rows / measured_rows)
                                             for measured_rows, saved in self.step_bytes.items())

    def kept_steps(self, plan: list[InnerStep], device: torch.device) -> int:
        if self.budget_bytes is None:
            self.budget_bytes = int(self.FREE_FRACTION * self.share * free_memory_bytes(device))
        if not self.step_bytes:
            return min(1, len(plan))
        kept, used = 0, 0.0
        for step in reversed(plan):
            used += self.estimate(len(step.indices))
            if used > self.budget_bytes:
                break
            kept += 1
        return kept

    def state_dict(self) -> dict[str, Any]:
        """What decides the next split: a resumed run that loads it keeps the steps the straight run keeps
        (a fresh budget would measure again and keep one step, and the two splits round differently)."""
        return {"budget_bytes": self.budget_bytes, "step_bytes": dict(self.step_bytes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget_bytes, self.step_bytes = state["budget_bytes"], dict(state["step_bytes"])

    @contextlib.contextmanager
    def measuring(self, rows: int, draw: Draw | None) -> Iterator[None]:
        key = (rows, None if draw is None else draw.family)
        if key in self.measured:
            yield
            return
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
        self.step_bytes[rows] = max(self.step_bytes.get(rows, 0), sum(storages.values()))
        self.measured.add(key)


def auto_gradients(net: FlatParams, images: torch.Tensor, labels: torch.Tensor, syn_lr: torch.Tensor,
                   start: torch.Tensor, target: torch.Tensor, plan: list[InnerStep], dsa: DSA | None,
                   alpha: float, selection: str, budget: GraphBudget | None = None,
                   kept: int | None = None) -> Matching:
    """The last `kept` inner steps held in the graph, the ones before them recomputed by the exact
    reverse sweep; `kept` defaults to as many as `budget` allows.

    Steps 0..h-1 (h = N - kept) run without graphs, storing theta_0..theta_h. Steps h..N-1 run
    unrolled from theta_h as a leaf, and one backward from the loss gives the kept steps' share of
    the gradients of images, labels and syn_lr, and lam_h = dL/dtheta_h. The reverse sweep of
    `two_pass_gradients` carries lam from there back to theta_0, adding the recomputed steps' shares.
    kept = N is the unrolled path, kept = 0 the two-pass path: the same exact gradient either way.
    """
    if kept is None:
        if budget is None:
            # A budget made here would be new at every call and never get past its measuring step.
            raise ValueError("auto_gradients needs a GraphBudget that lives across iterations, or kept")
        kept = budget.kept_steps(plan, images.device)
    if not 0 <= kept <= len(plan):
        raise ValueError(f"kept: {kept} is not between 0 and the {len(plan)} inner steps")
    head = len(plan) - kept
    if head and images.device.type == "cpu":
        # The recomputed steps' buffers are freed and allocated again one step at a time, as in the
        # two-pass path: keeping them in the heap saves re-faulting them.
        keep_freed_memory_in_heap()
    rows_of = _rows_on(plan, images.device)
    leaves = [t.detach().requires_grad_() for t in (images, labels, syn_lr)]
    x_all, y_all, lr = leaves
    images, labels, lr_value = (t.detach() for t in leaves)

    thetas = [start.detach()]
    for step, rows in zip(plan[:head], rows_of[:head]):
        theta = thetas[-1].detach().requires_grad_()
        grad = torch.autograd.grad(_batch_loss(net, theta, images[rows], labels[rows], step.draw, dsa), theta)[0]
        thetas.append(theta.detach() - lr_value * grad)

    anchor = theta = thetas.pop().detach().requires_grad_()
    for step, rows in zip(plan[head:], rows_of[head:]):
        with budget.measuring(len(rows), step.draw) if budget is not None else contextlib.nullcontext():
            loss = _batch_loss(net, theta, x_all[rows], y_all[rows], step.draw, dsa)
            grad = torch.autograd.grad(loss, theta, create_graph=True)[0]
            theta = theta - lr * grad
    loss, _, _ = _distance_ratio(theta, start, target, alpha, selection)
    # dL/dtheta_h only where a sweep needs it: with kept = N it would cost a Hessian-vector product
    # through step 0 that the unrolled path never computes. With kept = 0 the loss depends on none of
    # the leaves, and their share is zero.
    grads = torch.autograd.grad(loss, [*leaves, anchor] if head else leaves, materialize_grads=True)
    grad_images, grad_labels, grad_lr = grads[:3]
    lam = grads[3] if head else None

    for step, rows, theta in zip(reversed(plan[:head]), reversed(rows_of[:head]), reversed(thetas)):
        theta = theta.detach().requires_grad_()
        x = images[rows].requires_grad_()
        y = labels[rows].requires_grad_()
        grad = torch.autograd.grad(_batch_loss(net, theta, x, y, step.draw, dsa), theta, create_graph=True)[0]
        d_theta, d_x, d_y = torch.autograd.grad((grad * lam).sum(), (theta, x, y))
        grad_lr = grad_lr - (grad.detach() * lam).sum()
        # A step's rows are distinct (one chunk of a permutation), so each row receives one addition
        # and the result does not depend on the order of CUDA's atomic adds.
        grad_images.index_add_(0, rows, -lr_value * d_x)
        grad_labels.index_add_(0, rows, -lr_value * d_y)
        lam = lam - lr_value * d_theta
    return Matching(loss.item(), grad_images, grad_labels, grad_lr, kept)


def unrolled_gradients(net: FlatParams, images: torch.Tensor, labels: torch.Tensor, syn_lr: torch.Tensor,
                       start: torch.Tensor, target: torch.Tensor, plan: list[InnerStep], dsa: DSA | None,
                       alpha: float, selection: str) -> Matching:
    """The reference path: every inner step is kept in the graph (create_graph=True)."""
    return auto_gradients(net, images, labels, syn_lr, start, target, plan, dsa, alpha, selection, kept=len(plan))


def two_pass_gradients(net: FlatParams, images: torch.Tensor, labels: torch.Tensor, syn_lr: torch.Tensor,
                       start: torch.Tensor, target: torch.Tensor, plan: list[InnerStep], dsa: DSA | None,
                       alpha: float, selection: str) -> Matching:
    """Constant-memory path: forward without graphs, then reverse through one recomputed step at a time.

    With theta_{i+1} = theta_i - lr * g_i and lam_{i+1} = dL/dtheta_{i+1}:
        dL/dtheta_i = lam_{i+1} - lr * H_i lam_{i+1},  dL/d(batch_i) = -lr * d(g_i . lam_{i+1})/d(batch_i),
        dL/dlr = -sum_i g_i . lam_{i+1}.
    """
    return auto_gradients(net, images, labels, syn_lr, start, target, plan, dsa, alpha, selection, kept=0)


class AutoPath:
    """`auto_gradients` with the GraphBudget it keeps across iterations, which checkpoints carry."""

    def __init__(self, budget: GraphBudget):
        self.budget = budget

    def __call__(self, *args: Any, **kwargs: Any) -> Matching:
        return auto_gradients(*args, budget=self.budget, **kwargs)


GRADIENT_PATHS = ("unrolled", "constant_memory", "auto")


def gradient_path(name: str, memory_budget_gb: float | None = None,
                  memory_share: float = 1.0) -> Callable[..., Matching]:
    """The function `distill.gradient` names; `auto` gets its own GraphBudget, so build one per Distiller.
    `memory_share` scales the default budget only: an explicit `memory_budget_gb` is the trial's own."""
    if name == "auto":
        return AutoPath(GraphBudget(None if memory_budget_gb is None else int(memory_budget_gb * 1e9), memory_share))
    paths = {"unrolled": unrolled_gradients, "constant_memory": two_pass_gradients}
    if name not in paths:
        raise ValueError(f"gradient: unknown path {name!r}; allowed: {', '.join(GRADIENT_PATHS)}")
    return paths[name]
