"""The ConvNet's 2x2 average pooling: on the CPU 1.3 to 1.6 times as fast as `F.avg_pool2d`, to the same bits.

PyTorch's CPU kernel for `avg_pool2d` on NCHW tensors walks each output's window element by element, and
its backward scatters one window at a time. Four strided adds in the kernel's own order, then a multiply by
0.25 (exactly its division by 4), give the same floats forward; the backward spreads `grad / 4` over each
window with two broadcasts, as the kernel's backward writes it. Each direction is the other's derivative,
so the second-order gradients that trajectory matching takes through an inner step are the same as well.
An MNIST preset's distillation iteration and its evaluation at IPC 10 take 5 to 11% less time; at 10 images
a step, the difference is inside the noise (BENCHMARKS.md, section 1, `benchmarks/pooling.py`).

Elsewhere the library's kernel is kept: on CUDA, under `torch.compile` (Inductor fuses it), for other
dtypes (the kernel accumulates half precision in float32), for odd sizes (its floor rule) and for small maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# Written in the form torch.func accepts (forward without ctx, setup_context, a generated vmap rule), so a
# ConvNet built with this pooling also runs under vmap and grad (benchmarks/evaluation.py trains nets that way).
class _Pool(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # ((x00 + x01) + x10) + x11: the order in which avg_pool2d's CPU kernel sums a window. In place after
        # the first add: one new tensor instead of four.
        total = x[..., ::2, ::2] + x[..., ::2, 1::2]
        total += x[..., 1::2, ::2]
        total += x[..., 1::2, 1::2]
        return total.mul_(0.25)

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:  # type: ignore[override]
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _Spread.apply(grad, ctx.shape)


class _Spread(torch.autograd.Function):
    """The pooling's adjoint: each window's four inputs get a quarter of its output's gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:  # type: ignore[override]
        *lead, h, w = shape
        quarter = (grad * 0.25).unsqueeze(-1).expand(*lead, h // 2, w // 2, 2)
        return quarter.reshape(*lead, h // 2, 1, w).expand(*lead, h // 2, 2, w).reshape(shape)

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor, torch.Size],  # type: ignore[override]
                      output: torch.Tensor) -> None:
        pass  # the adjoint of a linear map needs nothing from its inputs

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _Pool.apply(grad), None


# Below this many elements the Functions' own cost (about 0.1 ms of Python and small ops per forward and
# backward) exceeds what they save: the 8x8 and 16x16 maps of a 10-image batch pool faster in the kernel.
MIN_ELEMENTS = 1 << 18


def pool_2x2_by_strides(x: torch.Tensor) -> torch.Tensor:
    """`F.avg_pool2d(x, 2)` for even sizes, computed by strided adds; the same floats and gradients of every order."""
    return _Pool.apply(x)


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """`F.avg_pool2d(x, 2)`, by strides where that is faster (large CPU maps in float32 or float64)."""
    h, w = x.shape[-2:]
    if (x.device.type != "cpu" or torch.compiler.is_compiling() or x.dtype not in (torch.float32, torch.float64)
            or h % 2 or w % 2 or x.numel() < MIN_ELEMENTS):
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return pool_2x2_by_strides(x)


class AvgPool2x2(nn.Module):
    """`nn.AvgPool2d(kernel_size=2, stride=2)` through `avg_pool_2x2`; no parameters, so state dicts match."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool_2x2(x)
