"""Networks used by PAD and the flat-parameter view that trajectory matching works on.

The distillation network is the MTT/DATM/PAD ConvNet; the others are the cross-architecture
evaluation networks, with layer shapes and attribute names following the authors' networks.py
(so their state-dict keys line up). Every network accepts 1 or 3 input channels and square
images of 28, 32 or 64 pixels; classifier input sizes are computed from the image size instead of
being hard-coded, so an unsupported size fails at construction rather than at the first forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pad_ray.pooling import AvgPool2x2

if TYPE_CHECKING:  # the schema is only an annotation here: models stay below config in the layers
    from pad_ray.config import ModelConfig

MODELS = ("convnet", "convnet_bn", "resnet18", "resnet18_bn", "vgg11", "alexnet", "lenet", "mlp")
NORMS = ("instancenorm", "batchnorm", "none")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "instancenorm":
        # The lineage's "instance norm" is a per-channel GroupNorm with affine weights, not
        # nn.InstanceNorm2d; the two differ in parameters, so the flat layout depends on it.
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {norm!r}; expected 'instancenorm' or 'batchnorm'")


def _out_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial size after a conv/pool layer (PyTorch's floor rule)."""
    return (size + 2 * padding - kernel) // stride + 1


def _check_feature_size(size: int, image_size: int, model: str) -> None:
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for {model}")


def _first_conv_stride(image_size: int) -> int:
    # The authors' *_Tiny variants halve 64x64 inputs in the first layer so the rest of the
    # network sees CIFAR-sized feature maps.
    return 2 if image_size >= 64 else 1


class ConvNet(nn.Module):
    """depth x [conv3x3 -> norm -> ReLU -> avgpool2] followed by one linear classifier."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        layers: list[nn.Module] = []
        in_channels = channels
        size = image_size
        for d in range(depth):
            # The authors' ConvNet sizes 28x28 (MNIST-family) inputs as 32x32, so the first layer pads by 3
            # and the classifier sees 4x4 maps (2048 inputs at width 128), as VGG11/AlexNet/LeNet do here.
            padding = 3 if d == 0 and image_size == 28 else 1
            layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=padding))
            if norm != "none":
                layers.append(_norm_layer(norm, width))
            layers += [nn.ReLU(), AvgPool2x2()]
            in_channels = width
            size = _out_size(size, 3, 1, padding) // 2
        _check_feature_size(size, image_size, "ConvNet")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut gets a strided 1x1 conv + norm when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm_layer(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm_layer(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                _norm_layer(norm, planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool, 4x4 average pool before the classifier)."""

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "instancenorm") -> None:
        super().__init__()
        stride = _first_conv_stride(image_size)
        self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm_layer(norm, 64)
        size = _out_size(image_size, 3, stride, 1)
        self.layer1 = self._stage(64, 64, 1, norm)
        self.layer2 = self._stage(64, 128, 2, norm)
        self.layer3 = self._stage(128, 256, 2, norm)
        self.layer4 = self._stage(256, 512, 2, norm)
        for stage_stride in (1, 2, 2, 2):
            size = _out_size(size, 3, stage_stride, 1)
        size = _out_size(size, 4, 4)  # the final avg_pool2d(4)
        _check_feature_size(size, image_size, "ResNet18")
        self.classifier = nn.Linear(512 * size * size, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int, norm: str) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride, norm), BasicBlock(planes, planes, 1, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.classifier(out.flatten(1))


_VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 with a norm after every conv and a single linear classifier."""

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "instancenorm") -> None:
        super().__init__()
        # 28x28 inputs are padded to an effective 32x32 by the first conv, as the authors do for
        # MNIST-type data (they key it on channel == 1; the size is what actually matters).
        first_padding = 3 if image_size == 28 else 1
        layers: list[nn.Module] = []
        in_channels = channels
        size = image_size
        for index, entry in enumerate(_VGG11_CFG):
            if isinstance(entry, str):  # "M": max-pool
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size = _out_size(size, 2, 2)
            else:
                padding = first_padding if index == 0 else 1
                layers += [
                    nn.Conv2d(in_channels, entry, kernel_size=3, padding=padding),
                    _norm_layer(norm, entry),
                    nn.ReLU(),
                ]
                size = _out_size(size, 3, 1, padding)
                in_channels = entry
        # The authors' VGG11_Tiny turns this trailing 1x1 pool into a stride-2 one so 64x64 inputs
        # (2x2 after the five max-pools) reach the classifier as 1x1.
        final_stride = _first_conv_stride(image_size)
        layers.append(nn.AvgPool2d(kernel_size=1, stride=final_stride))
        size = _out_size(size, 1, final_stride)
        _check_feature_size(size, image_size, "VGG11")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512 * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AlexNet(nn.Module):
    """Small AlexNet: five convs (no norm), three max-pools, one linear classifier."""

    def __init__(self, channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        stride = _first_conv_stride(image_size)
        padding = 4 if image_size == 28 else 2  # 28x28 -> effective 32x32, as in VGG11
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, kernel_size=5, stride=stride, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(192, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        # Every conv after the first preserves size, so only the first conv and the pools count.
        size = _out_size(image_size, 5, stride, padding) // 2 // 2 // 2
        _check_feature_size(size, image_size, "AlexNet")
        self.fc = nn.Linear(192 * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class LeNet(nn.Module):
    """LeNet-5: two 5x5 convs with max-pools, then 120 -> 84 -> classes."""

    def __init__(self, channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        stride = _first_conv_stride(image_size)
        padding = 2 if image_size == 28 else 0  # 28x28 -> effective 32x32, as in VGG11
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, stride=stride, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        size = _out_size(_out_size(image_size, 5, stride, padding) // 2, 5) // 2
        _check_feature_size(size, image_size, "LeNet")
        self.fc_1 = nn.Linear(16 * size * size, 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x).flatten(1)
        out = F.relu(self.fc_1(out))
        out = F.relu(self.fc_2(out))
        return self.fc_3(out)


class MLP(nn.Module):
    """Fully connected baseline.

    The authors' code has TWO hidden layers of 128 units (fc_1, fc_2) before the output layer;
    we keep the code's version rather than a single-hidden-layer description.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(channels * image_size * image_size, 128)
        self.fc_2 = nn.Linear(128, 128)
        self.fc_3 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.fc_1(x.flatten(1)))
        out = F.relu(self.fc_2(out))
        return self.fc_3(out)


def build_model(
    name: str,
    channels: int,
    num_classes: int,
    image_size: int,
    *,
    width: int = 128,
    depth: int = 3,
    norm: str = "instancenorm",
) -> nn.Module:
    """Build a network by name. width/depth/norm apply to convnet; 'convnet_bn' forces batchnorm."""
    if name == "convnet":
        return ConvNet(channels, num_classes, image_size, width, depth, norm)
    if name == "convnet_bn":
        return ConvNet(channels, num_classes, image_size, width, depth, "batchnorm")
    if name == "resnet18":
        return ResNet18(channels, num_classes, image_size, "instancenorm")
    if name == "resnet18_bn":
        return ResNet18(channels, num_classes, image_size, "batchnorm")
    if name == "vgg11":
        return VGG11(channels, num_classes, image_size, "instancenorm")
    if name == "alexnet":
        return AlexNet(channels, num_classes, image_size)
    if name == "lenet":
        return LeNet(channels, num_classes, image_size)
    if name == "mlp":
        return MLP(channels, num_classes, image_size)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")


class FlatParams:
    """The flat-parameter view used by trajectory matching.

    The flat vector is the concatenation of module.parameters() in order.
    """

    def __init__(self, model: nn.Module) -> None:
        self.module = model
        self._names: list[str] = []
        self._shapes: list[torch.Size] = []
        self._numels: list[int] = []
        self._offsets: list[int] = []
        offset = 0
        # named_parameters() and parameters() enumerate the same tensors in the same order.
        for name, param in model.named_parameters():
            self._names.append(name)
            self._shapes.append(param.shape)
            self._numels.append(param.numel())
            self._offsets.append(offset)
            offset += param.numel()
        self._size = offset

    @property
    def size(self) -> int:
        return self._size

    def _params_of(self, model: nn.Module) -> list[nn.Parameter]:
        params = list(model.parameters())
        if [p.shape for p in params] != self._shapes:
            raise ValueError("model's parameter layout does not match this FlatParams")
        return params

    def _check_flat(self, flat: torch.Tensor) -> None:
        if flat.shape != (self._size,):
            raise ValueError(f"expected a flat vector of shape ({self._size},), got {tuple(flat.shape)}")

    def flatten(self, model: nn.Module | None = None) -> torch.Tensor:
        """Detached float32 copy [P] of the model's (default: own module's) parameters."""
        params = self._params_of(self.module if model is None else model)
        return torch.cat([p.detach().reshape(-1) for p in params]).to(torch.float32)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view into flat; views keep the autograd graph back to flat."""
        self._check_flat(flat)
        # One split yields all slices as views, which keeps the per-step overhead small.
        chunks = flat.split(self._numels)
        return {name: chunk.view(shape) for name, chunk, shape in zip(self._names, chunks, self._shapes)}

    def load_into(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Copy the values of flat into the module's parameters (outside autograd)."""
        self._check_flat(flat)
        params = self._params_of(model)
        with torch.no_grad():
            for param, chunk in zip(params, flat.split(self._numels)):
                param.copy_(chunk.view_as(param))

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Run the module with its parameters replaced by views of flat; differentiable in flat and x.

        Buffers (BatchNorm running statistics) are not in the dict, so functional_call uses the
        module's own buffers and train-mode BatchNorm updates them in place, as a normal call would.
        """
        return functional_call(self.module, self.unflatten(flat), (x,))

    def spans(self) -> list[tuple[str, int, int]]:
        """(name, start, end) for each parameter tensor, in flat order."""
        return [
            (name, start, start + numel)
            for name, start, numel in zip(self._names, self._offsets, self._numels)
        ]


def seeded_model(model: ModelConfig, channels: int, num_classes: int, image_size: int, seed: int,
                 name: str | None = None) -> nn.Module:
    """Build a network whose initial weights depend only on `seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name or model.name, channels, num_classes, image_size,
                           width=model.width, depth=model.depth, norm=model.norm)
