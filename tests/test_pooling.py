import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pad_ray.augment import DSA
from pad_ray.matching import plan_steps, two_pass_gradients, unrolled_gradients
from pad_ray.models import ConvNet, FlatParams
from pad_ray.pooling import AvgPool2x2, avg_pool_2x2


def _inputs(shape, dtype=torch.float32, channels_last=False):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, dtype=dtype, generator=gen) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(*shape[:-2], shape[-2] // 2, shape[-1] // 2, dtype=dtype, generator=gen)
    probe = torch.randn(shape, dtype=dtype, generator=gen)
    return x, weight, probe


def _three_orders(pool, x, weight, probe):
    """The pooled values, the gradient of a weighted sum, and how a function of that gradient changes with the
    weights (the pooling is linear, so its second order is the derivative of its backward in the upstream
    gradient, as in trajectory matching)."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    y = pool(x)
    (grad,) = torch.autograd.grad((y * weight).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad((grad.sin() * probe).sum(), weight)
    return y.detach(), grad.detach(), second


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (4, 3, 32, 32), (3, 5, 16, 12), (2, 7, 8, 30)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_fast_pool_equals_avg_pool2d_bit_for_bit_to_the_second_order(shape, channels_last):
    reference = _three_orders(lambda t: F.avg_pool2d(t, 2, 2), *_inputs(shape, channels_last=channels_last))
    fast = _three_orders(avg_pool_2x2, *_inputs(shape, channels_last=channels_last))
    for name, a, b in zip(("values", "gradient", "second order"), reference, fast):
        assert b.shape == a.shape and b.abs().sum() > 0, name
        assert torch.equal(b, a), (name, (b - a).abs().max().item())


def test_the_fast_pool_passes_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(avg_pool_2x2, (x,))
    assert torch.autograd.gradgradcheck(avg_pool_2x2, (x,))


@pytest.mark.parametrize("shape, dtype", [((2, 3, 7, 8), torch.float32), ((2, 3, 9, 9), torch.float32),
                                          ((2, 3, 8, 8), torch.bfloat16)])
def test_odd_sizes_and_half_precision_take_the_library_kernel(shape, dtype):
    x = torch.randn(shape).to(dtype)
    y = avg_pool_2x2(x)
    assert y.shape == F.avg_pool2d(x, 2, 2).shape == (*shape[:2], shape[2] // 2, shape[3] // 2)
    assert torch.equal(y, F.avg_pool2d(x, 2, 2))


def _with_library_pooling(net: ConvNet) -> ConvNet:
    net.features = nn.Sequential(*(nn.AvgPool2d(2, 2) if isinstance(m, AvgPool2x2) else m for m in net.features))
    return net


@pytest.mark.parametrize("gradients", [unrolled_gradients, two_pass_gradients])
def test_trajectory_matching_through_the_convnet_is_unchanged_by_the_fast_pool(gradients):
    """The ConvNet's second-order matching gradients, on MNIST-sized images with DSA, are the ones the
    library's pooling gives, to the last bit: expert trajectories and distilled sets do not change."""
    results = []
    for swap in (False, True):
        torch.manual_seed(0)
        net = ConvNet(1, 10, 28, width=8, depth=3)
        if swap:
            net = _with_library_pooling(net)
        flat = FlatParams(net)
        gen = torch.Generator().manual_seed(1)
        images, labels = torch.randn(20, 1, 28, 28, generator=gen), torch.randn(20, 10, generator=gen)
        start = flat.flatten()
        target = start + 0.01 * torch.randn(flat.size, generator=gen)
        plan = plan_steps(20, 10, 4, (28, 28), DSA(), gen)
        results.append(gradients(flat, images, labels, torch.tensor(0.05), start, target, plan, DSA(), 0.2, "depth"))
    fast, library = results
    assert fast.loss == library.loss
    for name in ("grad_images", "grad_labels", "grad_lr"):
        assert getattr(fast, name).abs().sum() > 0 and torch.equal(getattr(fast, name), getattr(library, name)), name
