import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pad_ray.models import MODELS, ConvNet, FlatParams, build_model

# CIFAR-10 ConvNet (width 128, depth 3, instancenorm): the flat index table of the authors' code.
CIFAR10_SPANS = [
    ("features.0.weight", 0, 3456),
    ("features.0.bias", 3456, 3584),
    ("features.1.weight", 3584, 3712),
    ("features.1.bias", 3712, 3840),
    ("features.4.weight", 3840, 151296),
    ("features.4.bias", 151296, 151424),
    ("features.5.weight", 151424, 151552),
    ("features.5.bias", 151552, 151680),
    ("features.8.weight", 151680, 299136),
    ("features.8.bias", 299136, 299264),
    ("features.9.weight", 299264, 299392),
    ("features.9.bias", 299392, 299520),
    ("classifier.weight", 299520, 320000),
    ("classifier.bias", 320000, 320010),
]


def small_convnet() -> ConvNet:
    return ConvNet(channels=3, num_classes=5, image_size=8, width=8, depth=2)


def test_cifar10_convnet_span_table() -> None:
    model = ConvNet(3, 10, 32)
    flat = FlatParams(model)
    assert flat.spans() == CIFAR10_SPANS
    assert flat.size == 320_010
    assert isinstance(model.features[1], nn.GroupNorm)
    assert model.features[1].num_groups == 128
    assert model.classifier.in_features == 2048


@pytest.mark.parametrize(
    ("channels", "num_classes", "image_size", "depth", "total", "feat"),
    [
        (3, 10, 32, 3, 320_010, 128 * 4 * 4),  # CIFAR-10
        (3, 100, 32, 3, 504_420, 128 * 4 * 4),  # CIFAR-100
        (3, 200, 64, 4, 857_160, 128 * 4 * 4),  # Tiny ImageNet, depth 4
        (1, 10, 28, 3, 317_706, 128 * 4 * 4),  # MNIST: padded to 32 -> 16 -> 8 -> 4, as the authors do
    ],
)
def test_convnet_totals(
    channels: int, num_classes: int, image_size: int, depth: int, total: int, feat: int
) -> None:
    model = build_model("convnet", channels, num_classes, image_size, depth=depth)
    assert FlatParams(model).size == total
    assert sum(p.numel() for p in model.parameters()) == total
    assert model.classifier.in_features == feat


def test_convnet_norm_variants() -> None:
    bn = build_model("convnet_bn", 3, 10, 32, norm="instancenorm")  # convnet_bn overrides norm
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 3
    assert not any(isinstance(m, nn.GroupNorm) for m in bn.modules())
    # Same affine parameter count as instancenorm, plus running-stat buffers.
    assert FlatParams(bn).size == 320_010
    assert len(list(bn.buffers())) == 9

    plain = build_model("convnet", 3, 10, 32, norm="none")
    names = [name for name, _, _ in FlatParams(plain).spans()]
    assert names[:4] == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]
    assert FlatParams(plain).size == 320_010 - 3 * 256

    narrow = build_model("convnet", 3, 10, 32, width=16, depth=2)
    assert narrow.classifier.in_features == 16 * 8 * 8


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="convnet_bn.*resnet18"):
        build_model("resnet50", 3, 10, 32)
    with pytest.raises(ValueError, match="norm"):
        ConvNet(3, 10, 32, norm="layernorm")
    with pytest.raises(ValueError, match="too small"):
        ConvNet(3, 10, 4, depth=3)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("channels", "image_size"), [(1, 28), (3, 32), (3, 64)])
def test_every_model_runs(name: str, channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, channels, 7, image_size)
    out = model(torch.randn(2, channels, image_size, image_size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_tiny_variants_follow_authors_shapes() -> None:
    # 64x64 inputs are halved by the first layer (ResNet/AlexNet/LeNet) or the last pool (VGG),
    # so classifier sizes equal the 32x32 ones.
    for name in ("resnet18", "vgg11", "alexnet", "lenet"):
        small = FlatParams(build_model(name, 3, 10, 32)).size
        tiny = FlatParams(build_model(name, 3, 10, 64)).size
        assert small == tiny, name
    assert build_model("resnet18", 3, 10, 64).conv1.stride == (2, 2)
    assert build_model("alexnet", 3, 10, 32).fc.in_features == 192 * 4 * 4
    assert build_model("lenet", 1, 10, 28).fc_1.in_features == 16 * 5 * 5
    mlp = build_model("mlp", 3, 10, 32)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [128, 128, 10]


def test_flatten_unflatten_round_trip() -> None:
    model = small_convnet()
    flat_params = FlatParams(model)
    flat = flat_params.flatten()
    assert flat.dtype == torch.float32 and not flat.requires_grad
    assert flat.shape == (flat_params.size,)
    named = dict(model.named_parameters())
    views = flat_params.unflatten(flat)
    assert list(views) == list(named)
    for name, view in views.items():
        assert torch.equal(view, named[name])
    # Views, not copies: writing through flat shows up in the unflattened tensors.
    flat[-1] = 123.0
    assert views["classifier.bias"][-1].item() == 123.0
    # flatten is a copy: it did not write into the module.
    assert named["classifier.bias"][-1].item() != 123.0


def test_load_into_copies_values() -> None:
    torch.manual_seed(1)
    source = small_convnet()
    torch.manual_seed(2)
    target = small_convnet()
    flat_params = FlatParams(source)
    flat = flat_params.flatten()
    assert not torch.equal(flat_params.flatten(target), flat)
    flat_params.load_into(target, flat)
    assert torch.equal(flat_params.flatten(target), flat)
    with pytest.raises(ValueError):
        flat_params.load_into(target, flat[:-1])
    with pytest.raises(ValueError):
        flat_params.flatten(ConvNet(3, 5, 8, width=4, depth=2))


def test_unflatten_views_carry_gradients() -> None:
    flat_params = FlatParams(small_convnet())
    flat = flat_params.flatten().requires_grad_()
    flat_params.unflatten(flat)["classifier.bias"].sum().backward()
    assert flat.grad is not None
    assert torch.equal(flat.grad[-5:], torch.ones(5))
    assert flat.grad[:-5].abs().sum().item() == 0.0


@pytest.mark.parametrize("name", ["convnet", "convnet_bn", "resnet18_bn", "lenet"])
def test_functional_forward_matches_module(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 3, 10, 32, width=16)  # width only affects the convnets
    if name.endswith("_bn"):
        # Non-trivial running stats, read in eval mode: the functional call must use the buffers.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1.0, 1.0)
                module.running_var.uniform_(0.5, 2.0)
        model.eval()
    flat_params = FlatParams(model)
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    got = flat_params.forward(flat_params.flatten(), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # A different parameter vector changes the output, so the flat values are really used.
    other = flat_params.forward(flat_params.flatten() * 0.5, x)
    assert not torch.allclose(other, expected)


def test_gradient_wrt_flat_matches_module_grads() -> None:
    torch.manual_seed(0)
    model = small_convnet()
    flat_params = FlatParams(model)
    x = torch.randn(6, 3, 8, 8)
    y = torch.randint(0, 5, (6,))

    F.cross_entropy(model(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    flat = flat_params.flatten().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(flat_params.forward(flat, x), y), flat)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_second_order_gradient_matches_finite_differences() -> None:
    # One unrolled student step, as in trajectory matching: theta1 = theta0 - lr * grad(loss(theta0, x)),
    # then a loss on theta1 differentiated w.r.t. the synthetic images x. Checked in float64.
    torch.manual_seed(0)
    model = small_convnet().double()
    flat_params = FlatParams(model)
    theta0 = flat_params.flatten().double().requires_grad_()
    target = theta0.detach() + 0.01 * torch.randn_like(theta0)
    y = torch.randint(0, 5, (4,))
    lr = 0.1

    def unrolled_loss(x: torch.Tensor) -> torch.Tensor:
        inner = F.cross_entropy(flat_params.forward(theta0, x), y)
        (grad,) = torch.autograd.grad(inner, theta0, create_graph=True)
        return ((theta0 - lr * grad - target) ** 2).sum()

    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(unrolled_loss(x), x)
    assert grad_x.abs().sum().item() > 0.0

    direction = torch.randn_like(x)
    eps = 1e-6
    plus = unrolled_loss((x + eps * direction).detach()).item()
    minus = unrolled_loss((x - eps * direction).detach()).item()
    numeric = (plus - minus) / (2 * eps)
    analytic = (grad_x * direction).sum().item()
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_hessian_vector_product_through_forward() -> None:
    torch.manual_seed(0)
    model = small_convnet().double()
    flat_params = FlatParams(model)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    vector = torch.randn(flat_params.size, dtype=torch.float64)

    def grad_at(theta: torch.Tensor, create_graph: bool) -> torch.Tensor:
        loss = F.cross_entropy(flat_params.forward(theta, x), y)
        return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]

    theta = flat_params.flatten().double().requires_grad_()
    (hvp,) = torch.autograd.grad(grad_at(theta, create_graph=True) @ vector, theta)

    eps = 1e-6
    plus = grad_at((theta.detach() + eps * vector).requires_grad_(), create_graph=False)
    minus = grad_at((theta.detach() - eps * vector).requires_grad_(), create_graph=False)
    torch.testing.assert_close(hvp, (plus - minus) / (2 * eps), rtol=1e-4, atol=1e-6)


def test_seeded_init_is_reproducible() -> None:
    def init_vector(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        model = build_model("convnet", 3, 10, 32)
        return FlatParams(model).flatten()

    assert torch.equal(init_vector(0), init_vector(0))
    assert not torch.equal(init_vector(0), init_vector(1))
