"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) as used by MTT, DATM and PAD.

Each call picks ONE family uniformly at random from the strategy (the reference's aug_mode 'S')
and draws its parameters independently per sample (the reference's seed=-1 mode).

Unlike the reference, drawing and applying are separate steps: `sample` turns a CPU
torch.Generator into a `Draw` of plain per-sample tensors, and `apply` is a pure function of
(images, draw). A two-pass gradient algorithm can therefore store the draw of every step and
recompute that step's augmented batch bit for bit, and a seeded generator reproduces a whole run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pad_ray.config import DEFAULT_DSA_STRATEGY as DEFAULT_STRATEGY, DSA_FAMILIES as FAMILIES, check_dsa_strategy

Params = dict[str, torch.Tensor]
Sampler = Callable[[int, tuple[int, int], torch.Generator], Params]
Applier = Callable[[torch.Tensor, Params], torch.Tensor]


@dataclass(frozen=True)
class DSAConfig:
    """Strategy and magnitudes; the defaults are the reference's ParamDiffAug values."""

    strategy: str = DEFAULT_STRATEGY
    flip: float = 0.5  # probability that a sample is mirrored
    scale: float = 1.2  # each axis scaled by a factor in [1/scale, scale]
    rotate: float = 15.0  # degrees, angle in [-rotate, rotate]
    crop: float = 0.125  # largest translation, as a fraction of the side
    cutout: float = 0.5  # side of the erased square, as a fraction of the image side
    brightness: float = 1.0  # additive shift in [-brightness/2, brightness/2]
    saturation: float = 2.0  # chroma factor in [0, saturation]
    contrast: float = 0.5  # contrast factor in [contrast, contrast + 1]

    def __post_init__(self) -> None:
        check_dsa_strategy(self.strategy)

    @property
    def families(self) -> tuple[str, ...]:
        # Kept in strategy order because the family index is drawn from the generator.
        return tuple(self.strategy.split("_"))


@dataclass(frozen=True)
class Draw:
    """One random draw: the chosen family and its per-sample parameters (CPU tensors).

    Parameters per family, each of shape [n]:
      color:  brightness (additive shift), saturation (factor), contrast (factor)
      crop:   shift_h, shift_w (int64; output pixel (i, j) reads input (i + shift_h, j + shift_w))
      cutout: top, left, height, width (int64; erased rectangle, may overhang the border)
      flip:   flip (bool; mirror along the width axis)
      scale:  scale_x, scale_y (affine factors on the width / height coordinates)
      rotate: angle (radians; the affine matrix is [[cos, -sin], [sin, cos]])
    """

    family: str
    params: dict[str, torch.Tensor]


class DSA:
    """Samples and applies DSA augmentations; `apply` is differentiable w.r.t. the images."""

    def __init__(self, config: DSAConfig = DSAConfig()) -> None:
        self.config = config
        self._samplers: dict[str, Sampler] = {
            "color": self._sample_color,
            "crop": self._sample_crop,
            "cutout": self._sample_cutout,
            "flip": self._sample_flip,
            "scale": self._sample_scale,
            "rotate": self._sample_rotate,
        }
        self._appliers: dict[str, Applier] = {
            "color": _apply_color,
            "crop": _apply_crop,
            "cutout": _apply_cutout,
            "flip": _apply_flip,
            "scale": _apply_scale,
            "rotate": _apply_rotate,
        }

    def sample(self, n: int, image_size: tuple[int, int], generator: torch.Generator) -> Draw:
        """Draw the family (uniform over the strategy), then its parameters, from `generator`."""
        if generator.device.type != "cpu":
            raise ValueError(f"DSA.sample needs a CPU generator, got one on {generator.device}")
        families = self.config.families
        index = int(torch.randint(len(families), (1,), generator=generator).item())
        family = families[index]
        height, width = int(image_size[0]), int(image_size[1])
        return Draw(family, self._samplers[family](n, (height, width), generator))

    def apply(self, images: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Apply a stored draw to images [n, C, H, W]; deterministic for a given draw and device."""
        if images.dim() != 4:
            raise ValueError(f"DSA expects images of shape [n, C, H, W], got {tuple(images.shape)}")
        if draw.family not in self._appliers:
            raise ValueError(
                f"unknown DSA family {draw.family!r}; allowed families: {', '.join(FAMILIES)}"
            )
        for name, value in draw.params.items():
            if value.shape[0] != images.shape[0]:
                raise ValueError(
                    f"draw parameter {name!r} is for {value.shape[0]} samples, "
                    f"images have {images.shape[0]}"
                )
        params = {name: _to_images(value, images) for name, value in draw.params.items()}
        return self._appliers[draw.family](images, params).contiguous()

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        height, width = images.shape[-2:]
        return self.apply(images, self.sample(images.shape[0], (height, width), generator))

    # Samplers: every draw is float32 or int64 on the CPU, so a seed gives the same draw
    # whatever the default dtype or the device the images will live on.

    def _sample_color(self, n: int, size: tuple[int, int], g: torch.Generator) -> Params:
        # Drawn in the reference's application order: brightness, saturation, contrast.
        c = self.config
        return {
            "brightness": (_uniform(n, g) - 0.5) * c.brightness,
            "saturation": _uniform(n, g) * c.saturation,
            "contrast": _uniform(n, g) + c.contrast,
        }

    def _sample_crop(self, n: int, size: tuple[int, int], g: torch.Generator) -> Params:
        # Largest shift rounds half up, as the reference's int(side * ratio + 0.5).
        max_h, max_w = (int(side * self.config.crop + 0.5) for side in size)
        return {
            "shift_h": torch.randint(-max_h, max_h + 1, (n,), generator=g),
            "shift_w": torch.randint(-max_w, max_w + 1, (n,), generator=g),
        }

    def _sample_cutout(self, n: int, size: tuple[int, int], g: torch.Generator) -> Params:
        side_h, side_w = (int(side * self.config.cutout + 0.5) for side in size)
        # The reference draws the square's centre in [0, side] for an even square and
        # [0, side - 1] for an odd one, so the square always overlaps the image.
        centre_h = torch.randint(0, size[0] + 1 - side_h % 2, (n,), generator=g)
        centre_w = torch.randint(0, size[1] + 1 - side_w % 2, (n,), generator=g)
        return {
            "top": centre_h - side_h // 2,
            "left": centre_w - side_w // 2,
            "height": torch.full((n,), side_h, dtype=torch.int64),
            "width": torch.full((n,), side_w, dtype=torch.int64),
        }

    def _sample_flip(self, n: int, size: tuple[int, int], g: torch.Generator) -> Params:
        return {"flip": _uniform(n, g) < self.config.flip}

    def _sample_scale(self, n: int, size: tuple[int, int], g: torch.Generator) -> Params:
        ratio = self.config.scale
        return {
            "scale_x": _uniform(n, g) * (ratio - 1.0 / ratio) + 1.0 / ratio,
            "scale_y": _uniform(n, g) * (ratio - 1.0 / ratio) + 1.0 / ratio,
        }

    def _sample_rotate(self, n: int, size: tuple[int, int], g: torch.Generator) -> Params:
        max_angle = math.radians(self.config.rotate)
        return {"angle": (_uniform(n, g) - 0.5) * 2.0 * max_angle}


def dsa_if(enabled: bool, strategy: str = DEFAULT_STRATEGY) -> DSA | None:
    """A stage's augmentation: its `dsa` switch and the run's `augment.strategy`."""
    return DSA(DSAConfig(strategy=strategy)) if enabled else None


def _uniform(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float32)


def _to_images(value: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    # Float parameters follow the images' dtype so mixed precision never upcasts the batch;
    # integer offsets and flags keep their dtype because they index or select.
    if value.is_floating_point():
        return value.to(device=images.device, dtype=images.dtype)
    return value.to(device=images.device)


def _per_sample(value: torch.Tensor) -> torch.Tensor:
    """[n] -> [n, 1, 1, 1], to broadcast over [n, C, H, W]."""
    return value.view(-1, 1, 1, 1)


def _apply_color(x: torch.Tensor, p: Params) -> torch.Tensor:
    x = x + _per_sample(p["brightness"])
    # Saturation scales each pixel's distance from its own channel mean (a no-op for one channel).
    pixel_mean = x.mean(dim=1, keepdim=True)
    x = (x - pixel_mean) * _per_sample(p["saturation"]) + pixel_mean
    # Contrast scales the distance from the whole sample's mean.
    sample_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - sample_mean) * _per_sample(p["contrast"]) + sample_mean


def _apply_crop(x: torch.Tensor, p: Params) -> torch.Tensor:
    # Translation with zero fill: equivalent to the reference's pad-then-crop, done with two
    # gathers so the gradient reaches exactly the source pixels.
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device) + p["shift_h"].view(-1, 1)  # [n, H]
    cols = torch.arange(w, device=x.device) + p["shift_w"].view(-1, 1)  # [n, W]
    rows_inside = ((rows >= 0) & (rows < h)).view(n, 1, h, 1)
    cols_inside = ((cols >= 0) & (cols < w)).view(n, 1, 1, w)
    inside = rows_inside & cols_inside
    x = x.gather(2, rows.clamp(0, h - 1).view(n, 1, h, 1).expand(n, c, h, w))
    x = x.gather(3, cols.clamp(0, w - 1).view(n, 1, 1, w).expand(n, c, h, w))
    return torch.where(inside, x, x.new_zeros(()))


def _apply_cutout(x: torch.Tensor, p: Params) -> torch.Tensor:
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = p["top"].view(-1, 1, 1), p["left"].view(-1, 1, 1)
    erased = (
        (rows >= top)
        & (rows < top + p["height"].view(-1, 1, 1))
        & (cols >= left)
        & (cols < left + p["width"].view(-1, 1, 1))
    )
    # Multiplying by a 0/1 mask, as the reference does, keeps erased pixels' gradient at zero.
    keep = (~erased).to(x.dtype).unsqueeze(1)
    return x * keep


def _apply_flip(x: torch.Tensor, p: Params) -> torch.Tensor:
    return torch.where(_per_sample(p["flip"]), x.flip(3), x)


def _apply_scale(x: torch.Tensor, p: Params) -> torch.Tensor:
    zero = torch.zeros_like(p["scale_x"])
    theta = torch.stack(
        [
            torch.stack([p["scale_x"], zero, zero], dim=1),
            torch.stack([zero, p["scale_y"], zero], dim=1),
        ],
        dim=1,
    )
    return _warp(x, theta)


def _apply_rotate(x: torch.Tensor, p: Params) -> torch.Tensor:
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    zero = torch.zeros_like(cos)
    theta = torch.stack(
        [
            torch.stack([cos, -sin, zero], dim=1),
            torch.stack([sin, cos, zero], dim=1),
        ],
        dim=1,
    )
    return _warp(x, theta)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    # align_corners=True in both calls, as the reference: the corner pixel centres sit at +-1,
    # so the identity matrix reproduces the image; out-of-image samples read zeros.
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
