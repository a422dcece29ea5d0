import pytest
import torch

from pad_ray.augment import DSA
from pad_ray.matching import depth_cut, keep_mask, plan_steps, two_pass_gradients, unrolled_gradients
from pad_ray.models import ConvNet, FlatParams


def _cut_position(spans, cut):
    """(tensor name, fraction of it dropped) where a depth cut falls."""
    for name, start, end in spans:
        if start <= cut < end:
            return name, (cut - start) / (end - start)
    raise AssertionError("cut beyond the parameters")


@pytest.mark.parametrize(
    ("alpha", "tensor", "fraction"),
    # Where the depth cut falls on the CIFAR-10 ConvNet (P = 320,010), from its layer shapes.
    [(0.25, "features.4.weight", 0.517), (0.5, "features.8.weight", 0.056), (0.75, "features.8.weight", 0.599)],
)
def test_depth_cut_on_the_cifar10_convnet(alpha, tensor, fraction):
    flat = FlatParams(ConvNet(3, 10, 32))
    cut = depth_cut(flat.size, alpha)
    name, dropped = _cut_position(flat.spans(), cut)
    assert name == tensor
    assert dropped == pytest.approx(fraction, abs=1e-3)
    mask = keep_mask(torch.zeros(flat.size), alpha, "depth")
    assert mask[:cut].sum() == 0 and bool(mask[cut:].all())


def test_depth_cut_reaches_the_classifier_on_cifar100_at_075():
    flat = FlatParams(ConvNet(3, 100, 32))
    name, dropped = _cut_position(flat.spans(), depth_cut(flat.size, 0.75))
    assert name == "classifier.weight" and dropped == pytest.approx(0.385, abs=1e-3)


def test_loss_selection_drops_the_smallest_errors():
    error = torch.tensor([5.0, 0.1, 3.0, 0.2, 9.0])
    assert keep_mask(error, 0.4, "loss").tolist() == [1, 0, 1, 0, 1]
    assert keep_mask(error, 0.4, "none").tolist() == [1] * 5
    with pytest.raises(ValueError, match="selection"):
        keep_mask(error, 0.4, "random")


def _problem(selection: str, dsa: bool, device: str = "cpu"):
    """Drawn on the CPU, then moved, so every device gets the same problem; the plan stays on the CPU
    as `Distiller.step` makes it."""
    torch.manual_seed(0)
    net = FlatParams(ConvNet(1, 3, 12, width=4, depth=2).double())
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(6, 1, 12, 12, dtype=torch.float64, generator=gen)
    labels = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    start = net.flatten().double()
    target = start + 0.05 * torch.randn(net.size, dtype=torch.float64, generator=gen)
    augment = DSA() if dsa else None
    plan = plan_steps(6, 4, 5, (12, 12), augment, gen)
    lr = torch.tensor(0.05, dtype=torch.float64)
    net.module.to(device)
    images, labels, lr, start, target = (t.to(device) for t in (images, labels, lr, start, target))
    return net, images, labels, lr, start, target, plan, augment, 0.3, selection


def check_two_pass_equals_unrolled(selection: str, dsa: bool, device: str) -> None:
    """Shared with tests/test_cuda.py, which runs it on a GPU."""
    problem = _problem(selection, dsa, device)
    unrolled = unrolled_gradients(*problem)
    two_pass = two_pass_gradients(*problem)
    assert two_pass.loss == pytest.approx(unrolled.loss, rel=1e-10)
    for name in ("grad_images", "grad_labels", "grad_lr"):
        a, b = getattr(unrolled, name), getattr(two_pass, name)
        assert a.abs().sum() > 0
        assert a.device == b.device == problem[1].device, name
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("selection", ["depth", "loss", "none"])
@pytest.mark.parametrize("dsa", [False, True])
def test_two_pass_gradients_equal_the_unrolled_ones(selection, dsa):
    check_two_pass_equals_unrolled(selection, dsa, "cpu")


@pytest.mark.parametrize("path", [unrolled_gradients, two_pass_gradients])
@pytest.mark.parametrize("dsa", [False, True])
def test_gradient_paths_keep_every_tensor_on_the_images_device(path, dsa):
    # The meta device checks devices as CUDA does but holds no data, so this catches on the CPU a path
    # that mixes in the plan's CPU indices or draws (index_add_ refuses them): a device-correct path
    # runs every op and fails only where it reads the loss out as a number.
    problem = _problem("loss", dsa, "meta")
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors"):
        path(*problem)


def test_unrolled_loss_is_one_when_the_student_does_not_move():
    net, images, labels, lr, start, target, plan, augment, alpha, _ = _problem("none", False)
    matched = unrolled_gradients(net, images, labels, lr * 0, start, target, plan, augment, alpha, "none")
    assert matched.loss == pytest.approx(1.0)


def test_plan_refills_chunks_from_fresh_permutations():
    plan = plan_steps(10, 4, 6, (8, 8), None, torch.Generator().manual_seed(0))
    sizes = [len(step.indices) for step in plan]
    assert sizes == [2, 4, 4, 2, 4, 4]  # chunks popped from the end, refilled when empty
    first_epoch = torch.cat([s.indices for s in plan[:3]]).sort().values
    assert first_epoch.tolist() == list(range(10))
