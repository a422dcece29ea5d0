import pytest
import torch

from conftest import tiny_config
from pad_ray.clipping import AdaptiveClip, norms_of
from pad_ray.distill import Distiller

CPU = torch.device("cpu")


def _grads(scale_images: float = 1.0, scale_labels: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [scale_images * torch.randn(4, 3, generator=gen), scale_labels * torch.randn(2, 5, generator=gen),
            torch.tensor(0.5)]


def _clip(clip: AdaptiveClip, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    return clip(grads, norms_of(grads))


def test_first_update_passes_and_a_spike_is_cut_to_ratio_times_the_average_in_its_own_direction():
    clip = AdaptiveClip(3.0)
    first, clipped = _clip(clip, _grads())
    assert not clipped and all(torch.equal(a, b) for a, b in zip(first, _grads()))
    average = clip.average.clone()

    spike = _grads(scale_images=100.0)
    out, clipped = _clip(clip, spike)
    assert clipped
    assert out[0].norm().item() == pytest.approx(3.0 * average[0].item(), rel=1e-5)
    torch.testing.assert_close(out[0] / out[0].norm(), spike[0] / spike[0].norm())
    # Only the tensor that spiked is scaled: each has its own average.
    assert torch.equal(out[1], spike[1]) and torch.equal(out[2], spike[2])
    # The average takes the clipped norm, so the spike cannot raise its own bound.
    expected = clip.DECAY * average[0] + (1 - clip.DECAY) * 3.0 * average[0]
    assert clip.average[0].item() == pytest.approx(expected.item(), rel=1e-9)


def test_gradients_within_the_bound_pass_unchanged():
    clip = AdaptiveClip(3.0)
    _clip(clip, _grads())
    ordinary = _grads(scale_images=2.0, scale_labels=0.5)
    out, clipped = _clip(clip, ordinary)
    assert not clipped and all(torch.equal(a, b) for a, b in zip(out, ordinary))


def test_state_round_trip_gives_the_same_bounds():
    clip = AdaptiveClip(2.0)
    for scale in (1.0, 1.5, 40.0):
        _clip(clip, _grads(scale_images=scale))
    restored = AdaptiveClip(2.0)
    restored.load_state_dict(clip.state_dict())
    a, _ = _clip(clip, _grads(scale_images=30.0))
    b, _ = _clip(restored, _grads(scale_images=30.0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _exploding(distiller: Distiller, at: int, factor: float) -> None:
    """Multiply the outer gradients of iteration `at` by `factor`: the exploding step, on demand."""
    gradients = distiller.gradients

    def wrapped(*args, **kwargs):
        matched = gradients(*args, **kwargs)
        if distiller.iteration == at:
            for name in ("grad_images", "grad_labels", "grad_lr"):
                getattr(matched, name).mul_(factor)
        return matched

    distiller.gradients = wrapped


def test_an_exploding_step_moves_the_images_no_further_than_the_bound_allows(tiny):
    check_an_exploding_step_is_bounded(tiny, CPU)


def check_an_exploding_step_is_bounded(tiny, device: torch.device) -> None:
    """Also run on CUDA by tests/test_cuda.py."""
    _, data, _, trajectories = tiny
    moves = {}
    for ratio in (None, 3.0):
        d = Distiller(tiny_config(distill={"clip_ratio": ratio, "iterations": 6}), data, trajectories, device)
        _exploding(d, at=4, factor=1e4)
        for _ in range(4):
            d.step()
        before = d.images.detach().clone()
        buffer = d.opt_images.state[d.images]["momentum_buffer"].norm().item()
        average = d.clip.average[0].item() if d.clip is not None else None
        stats = d.step()
        moves[ratio] = ((d.images.detach() - before).norm().item(), average, buffer, stats.clipped, stats.grad_norm)
    cfg = tiny_config().distill
    move, average, buffer, clipped, grad_norm = moves[3.0]
    bound = cfg.lr_img * (3.0 * average + cfg.momentum_img * buffer)
    assert clipped and move <= bound * (1 + 1e-5)
    assert moves[None][0] > 100 * bound and not moves[None][3]
    # The logged norm is the one before clipping, with or without it: the spike stays visible.
    assert grad_norm == pytest.approx(moves[None][4], rel=1e-5) and grad_norm > 1000 * average
