import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pad_ray.augment import DSA
from pad_ray.matching import plan_steps, two_pass_gradients, unrolled_gradients
from pad_ray.models import ConvNet, FlatParams
from pad_ray.pooling import MIN_ELEMENTS, AvgPool2x2, avg_pool_2x2, pool_2x2_by_strides


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
    fast = _three_orders(pool_2x2_by_strides, *_inputs(shape, channels_last=channels_last))
    for name, a, b in zip(("values", "gradient", "second order"), reference, fast):
        assert b.shape == a.shape and b.abs().sum() > 0, name
        assert torch.equal(b, a), (name, (b - a).abs().max().item())


def test_the_fast_pool_passes_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pool_2x2_by_strides, (x,))
    assert torch.autograd.gradgradcheck(pool_2x2_by_strides, (x,))


def test_large_cpu_maps_pool_by_strides_and_small_ones_in_the_kernel():
    large = torch.randn(MIN_ELEMENTS // 1024, 4, 16, 16, requires_grad=True)
    small = torch.randn(MIN_ELEMENTS // 1024 - 1, 4, 16, 16, requires_grad=True)
    assert type(avg_pool_2x2(large).grad_fn).__name__ == "_PoolBackward"
    assert type(avg_pool_2x2(small).grad_fn).__name__ == "AvgPool2DBackward0"
    assert torch.equal(avg_pool_2x2(large), F.avg_pool2d(large, 2, 2))


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
    library's pooling gives, to the last bit: expert trajectories and distilled sets do not change. At width 16
    and 20 images the first block's maps are large enough to pool by strides."""
    results = []
    for swap in (False, True):
        torch.manual_seed(0)
        net = ConvNet(1, 10, 28, width=16, depth=3)
        if swap:
            net = _with_library_pooling(net)
        flat = FlatParams(net)
        gen = torch.Generator().manual_seed(1)
        images, labels = torch.randn(20, 1, 28, 28, generator=gen), torch.randn(20, 10, generator=gen)
        start = flat.flatten()
        target = start + 0.01 * torch.randn(flat.size, generator=gen)
        plan = plan_steps(20, 20, 4, (28, 28), DSA(), gen)
        results.append(gradients(flat, images, labels, torch.tensor(0.05), start, target, plan, DSA(), 0.2, "depth"))
    fast, library = results
    assert 20 * 16 * 32 * 32 >= MIN_ELEMENTS  # an inner step's batch by the first block's maps
    assert fast.loss == library.loss
    for name in ("grad_images", "grad_labels", "grad_lr"):
        assert getattr(fast, name).abs().sum() > 0 and torch.equal(getattr(fast, name), getattr(library, name)), name


def test_the_fast_pool_runs_under_torch_func_with_the_library_results():
    """vmap and grad (benchmarks/evaluation.py trains nets under them) accept the pooling and agree with the
    library's kernel."""
    from torch.func import grad, vmap

    x, weight, _ = _inputs((5, 3, 8, 6))
    library = lambda t: F.avg_pool2d(t, 2, 2)  # noqa: E731
    weighted = lambda pool: lambda t, w: (pool(t) * w).sum()  # noqa: E731
    cases = [(lambda pool: grad(weighted(pool)), (x, weight)),
             (lambda pool: vmap(pool), (x,)),
             (lambda pool: vmap(grad(weighted(pool))), (x, weight))]
    for transform, inputs in cases:
        assert torch.equal(transform(pool_2x2_by_strides)(*inputs), transform(library)(*inputs))
