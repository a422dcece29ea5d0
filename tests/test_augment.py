import math
from collections import Counter

import pytest
import torch

from pad_ray.augment import DEFAULT_STRATEGY, DSA, FAMILIES, DSAConfig, Draw, dsa_if


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 8, channels: int = 3, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, side, side, generator=gen(seed))


def single(family: str) -> DSA:
    return DSA(DSAConfig(strategy=family))


def draws_equal(a: Draw, b: Draw) -> bool:
    return (
        a.family == b.family
        and a.params.keys() == b.params.keys()
        and all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    )


# --- configuration -------------------------------------------------------------------------


def test_default_config_matches_reference_param_diff_aug() -> None:
    c = DSAConfig()
    assert c.families == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert (c.flip, c.scale, c.rotate, c.crop, c.cutout) == (0.5, 1.2, 15.0, 0.125, 0.5)
    assert (c.brightness, c.saturation, c.contrast) == (1.0, 2.0, 0.5)


@pytest.mark.parametrize("strategy", ["color_blur_flip", "blur", "", "color__flip"])
def test_unknown_family_is_rejected_with_name_and_allowed_list(strategy: str) -> None:
    with pytest.raises(ValueError) as err:
        DSAConfig(strategy=strategy)
    message = str(err.value)
    bad = next(f for f in strategy.split("_") if f not in FAMILIES)
    assert repr(bad) in message
    assert all(f in message for f in FAMILIES)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False")
def test_sample_rejects_cuda_generator() -> None:
    with pytest.raises(ValueError, match="CPU generator"):
        DSA().sample(4, (32, 32), torch.Generator(device="cuda"))


def test_apply_rejects_draw_for_another_batch_size() -> None:
    draw = single("flip").sample(4, (32, 32), gen(0))
    with pytest.raises(ValueError, match="4 samples"):
        DSA().apply(images(n=5), draw)


# --- reproducibility -----------------------------------------------------------------------


def test_same_seed_gives_identical_output() -> None:
    x = images()
    dsa = DSA()
    for seed in range(12):
        assert torch.equal(dsa(x, gen(seed)), dsa(x, gen(seed)))


def test_different_seeds_give_different_draws() -> None:
    dsa = DSA()
    draws = [dsa.sample(16, (32, 32), gen(seed)) for seed in range(10)]
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            assert not draws_equal(draws[i], draws[j])


def test_stored_draw_reproduces_call_bit_for_bit_for_every_family() -> None:
    x = images()
    dsa = DSA()
    seen = set()
    for seed in range(40):
        via_call = dsa(x, gen(seed))
        draw = dsa.sample(x.shape[0], (32, 32), gen(seed))
        seen.add(draw.family)
        assert torch.equal(dsa.apply(x, draw), via_call)
        # Re-applying later (the two-pass algorithm's recompute) must not drift either.
        assert torch.equal(dsa.apply(x, draw), via_call)
    assert seen == set(FAMILIES)


def test_params_are_cpu_and_per_sample() -> None:
    for family in FAMILIES:
        draw = single(family).sample(7, (28, 28), gen(1))
        assert draw.family == family
        for value in draw.params.values():
            assert value.device.type == "cpu"
            assert value.shape == (7,)


def test_family_frequencies_are_roughly_uniform() -> None:
    dsa = DSA()
    g = gen(123)
    counts = Counter(dsa.sample(1, (32, 32), g).family for _ in range(3000))
    assert set(counts) == set(FAMILIES)
    for family in FAMILIES:
        assert 400 <= counts[family] <= 600, counts


# --- individual families -------------------------------------------------------------------


def test_flip_mirrors_exactly_the_flipped_samples() -> None:
    x = images(n=32)
    draw = single("flip").sample(32, (32, 32), gen(3))
    flipped = draw.params["flip"]
    assert 0 < int(flipped.sum()) < 32  # both cases are exercised
    out = DSA().apply(x, draw)
    for i in range(32):
        expected = x[i].flip(-1) if flipped[i] else x[i]
        assert torch.equal(out[i], expected)


def test_brightness_adds_a_per_sample_constant() -> None:
    x = images(n=4)
    shift = torch.tensor([-0.5, -0.1, 0.2, 0.45])
    ones = torch.ones(4)
    draw = Draw("color", {"brightness": shift, "saturation": ones, "contrast": ones})
    out = DSA().apply(x, draw)
    assert torch.allclose(out - x, shift.view(4, 1, 1, 1).expand_as(x), atol=1e-5)


def test_zero_saturation_makes_channels_equal_to_their_pixel_mean() -> None:
    x = images(n=3)
    draw = Draw(
        "color",
        {"brightness": torch.zeros(3), "saturation": torch.zeros(3), "contrast": torch.ones(3)},
    )
    out = DSA().apply(x, draw)
    assert torch.allclose(out, x.mean(dim=1, keepdim=True).expand_as(x), atol=1e-6)


def test_contrast_scales_distance_from_sample_mean() -> None:
    x = images(n=3)
    factor = torch.tensor([0.0, 0.5, 1.5])
    draw = Draw("color", {"brightness": torch.zeros(3), "saturation": torch.ones(3), "contrast": factor})
    out = DSA().apply(x, draw)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, (x - mean) * factor.view(3, 1, 1, 1) + mean, atol=1e-5)
    assert torch.allclose(out[0], mean[0].expand_as(out[0]), atol=1e-6)


def test_color_draw_ranges_follow_config() -> None:
    p = single("color").sample(2000, (32, 32), gen(4)).params
    assert -0.5 <= p["brightness"].min() < -0.45 and 0.45 < p["brightness"].max() < 0.5
    assert 0.0 <= p["saturation"].min() < 0.05 and 1.95 < p["saturation"].max() < 2.0
    assert 0.5 <= p["contrast"].min() < 0.55 and 1.45 < p["contrast"].max() < 1.5


@pytest.mark.parametrize("channels", [1, 3])
def test_color_keeps_shape_and_dtype(channels: int) -> None:
    x = images(channels=channels).double()
    out = single("color")(x, gen(5))
    assert out.shape == x.shape and out.dtype == torch.float64


def test_crop_with_zero_translation_is_identity() -> None:
    x = images()
    zeros = torch.zeros(8, dtype=torch.int64)
    out = DSA().apply(x, Draw("crop", {"shift_h": zeros, "shift_w": zeros}))
    assert torch.equal(out, x)


def test_crop_translates_and_fills_with_zeros() -> None:
    x = images(n=1)
    draw = Draw("crop", {"shift_h": torch.tensor([2]), "shift_w": torch.tensor([-3])})
    out = DSA().apply(x, draw)
    # Output pixel (i, j) reads input (i + 2, j - 3); rows past the bottom and the first
    # three columns come from outside the image.
    assert torch.equal(out[:, :, :30, 3:], x[:, :, 2:, :29])
    assert out[:, :, 30:, :].abs().sum() == 0
    assert out[:, :, :, :3].abs().sum() == 0


@pytest.mark.parametrize(("side", "max_shift"), [(28, 4), (32, 4), (64, 8)])
def test_crop_shift_range_rounds_like_reference(side: int, max_shift: int) -> None:
    p = single("crop").sample(500, (side, side), gen(6)).params
    for key in ("shift_h", "shift_w"):
        assert p[key].min() == -max_shift and p[key].max() == max_shift


@pytest.mark.parametrize(("side", "square"), [(28, 14), (32, 16), (64, 32)])
def test_cutout_zeroes_a_square_of_the_expected_size(side: int, square: int) -> None:
    n = 64
    x = torch.rand(n, 3, side, side, generator=gen(7)) + 0.5  # strictly positive
    draw = single("cutout").sample(n, (side, side), gen(8))
    out = DSA().apply(x, draw)
    assert (draw.params["height"] == square).all() and (draw.params["width"] == square).all()
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # same mask on every channel
    full = 0
    for i in range(n):
        top, left = int(draw.params["top"][i]), int(draw.params["left"][i])
        rows = range(max(top, 0), min(top + square, side))
        cols = range(max(left, 0), min(left + square, side))
        expected = torch.zeros(side, side, dtype=torch.bool)
        expected[rows.start : rows.stop, cols.start : cols.stop] = True
        assert len(rows) > 0 and len(cols) > 0  # the square always overlaps the image
        assert torch.equal(zero[i, 0], expected)
        assert torch.equal(out[i][:, ~expected], x[i][:, ~expected])
        full += len(rows) == square and len(cols) == square
    assert full > 0  # some squares lie wholly inside


def test_scale_with_unit_factors_is_identity() -> None:
    x = images()
    ones = torch.ones(8)
    out = DSA().apply(x, Draw("scale", {"scale_x": ones, "scale_y": ones}))
    assert torch.allclose(out, x, atol=1e-5)


def test_scale_x_acts_on_the_width_axis() -> None:
    # A factor of -1 on x mirrors the width; with align_corners=True this is exact up to rounding.
    x = images()
    draw = Draw("scale", {"scale_x": -torch.ones(8), "scale_y": torch.ones(8)})
    assert torch.allclose(DSA().apply(x, draw), x.flip(-1), atol=1e-5)


def test_scale_draw_range_follows_config() -> None:
    p = single("scale").sample(2000, (32, 32), gen(9)).params
    for key in ("scale_x", "scale_y"):
        assert p[key].min() >= 1 / 1.2 and p[key].min() < 0.85 and 1.18 < p[key].max() <= 1.2


def test_rotate_with_zero_angle_is_identity() -> None:
    x = images()
    out = DSA().apply(x, Draw("rotate", {"angle": torch.zeros(8)}))
    assert torch.allclose(out, x, atol=1e-5)


def test_rotate_direction_matches_affine_convention() -> None:
    # [[cos, -sin], [sin, cos]] at +90 degrees is torch.rot90 with k=1 on a square image.
    x = images()
    out = DSA().apply(x, Draw("rotate", {"angle": torch.full((8,), math.pi / 2)}))
    assert torch.allclose(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)


def test_rotate_draw_range_is_plus_minus_15_degrees() -> None:
    angle = single("rotate").sample(2000, (32, 32), gen(10)).params["angle"]
    limit = math.radians(15.0)
    assert -limit <= angle.min() < -0.95 * limit and 0.95 * limit < angle.max() <= limit


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("channels", "side"), [(1, 28), (3, 32), (3, 64)])
def test_every_family_keeps_shape(family: str, channels: int, side: int) -> None:
    x = images(n=4, channels=channels, side=side)
    out = single(family)(x, gen(11))
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_flows_to_images(family: str) -> None:
    x = images().requires_grad_()
    weight = torch.randn(x.shape, generator=gen(12))
    (single(family)(x, gen(13)) * weight).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --- devices -------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_cpu_and_is_reproducible(family: str) -> None:
    x = images()
    dsa = single(family)
    draw = dsa.sample(x.shape[0], (32, 32), gen(14))
    on_gpu = dsa.apply(x.cuda(), draw)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu, dsa(x.cuda(), gen(14)))
    assert torch.allclose(on_gpu.cpu(), dsa.apply(x, draw), atol=1e-5)
    x_grad = x.cuda().requires_grad_()
    dsa.apply(x_grad, draw).square().sum().backward()
    assert x_grad.grad is not None and x_grad.grad.abs().sum() > 0


# --- the run's strategy ----------------------------------------------------------------------


def test_a_strategy_draws_only_its_own_families() -> None:
    digits = dsa_if(True, "color_crop_cutout_scale_rotate")
    drawn = {digits.sample(4, (8, 8), gen(seed)).family for seed in range(200)}
    assert drawn == {"color", "crop", "cutout", "scale", "rotate"}  # never a mirrored digit
    assert dsa_if(False, "crop") is None


def test_every_stage_of_a_run_augments_with_the_runs_strategy(tmp_path, monkeypatch) -> None:
    import conftest
    from pad_ray import distill, evaluate, experts, local_stages

    used = []

    def spy(module):
        def recording(enabled, strategy=DEFAULT_STRATEGY):
            used.append((module.__name__, strategy))
            return dsa_if(enabled, strategy)
        monkeypatch.setattr(module, "dsa_if", recording)

    for module in (experts, distill, evaluate):
        spy(module)
    cfg = conftest.tiny_config(tmp_path, augment={"strategy": "crop_scale"}, experts={"num_experts": 1},
                               distill={"eval_every": 1, "iterations": 1})
    data, cpu = conftest.tiny_dataset(), torch.device("cpu")
    order = [torch.nonzero(data.train.labels == c).flatten() for c in range(3)]
    trajectories = local_stages.ensure_experts(cfg, data, order, cpu, progress=False)
    run = distill.distill(cfg, data, trajectories, cpu)
    local_stages.final_evaluation(cfg, data, run.best_synthetic(), cpu)
    assert {module for module, _ in used} == {"pad_ray.experts", "pad_ray.distill", "pad_ray.evaluate"}
    assert {strategy for _, strategy in used} == {"crop_scale"}
