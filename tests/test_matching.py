import functools
import math
from typing import get_args

import pytest
import torch

from pad_ray import matching
from pad_ray.augment import DSA
from pad_ray.config import DistillConfig
from pad_ray.matching import (
    GRADIENT_PATHS, GraphBudget, auto_gradients, depth_cut, keep_mask, plan_steps, two_pass_gradients,
    unrolled_gradients,
)
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


@pytest.mark.parametrize("path", [unrolled_gradients, two_pass_gradients,
                                  functools.partial(auto_gradients, kept=2)])
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


def _full_graph_oracle(net, images, labels, lr, start, target, plan, dsa, alpha, selection):
    """Every step in one graph, one backward: written here apart from pad_ray.matching, whose unrolled
    and two-pass paths are both special cases of auto_gradients and so cannot check it."""
    x_all, y_all, lr = (t.detach().requires_grad_() for t in (images, labels, lr))
    theta = start.detach().requires_grad_()
    for step in plan:
        x, y = x_all[step.indices], y_all[step.indices]
        if step.draw is not None:
            x = dsa.apply(x, step.draw)
        inner = matching.soft_cross_entropy(net.forward(theta, x), y)
        theta = theta - lr * torch.autograd.grad(inner, theta, create_graph=True)[0]
    error = (theta - target) ** 2
    mask = keep_mask(error.detach(), alpha, selection)
    loss = (mask * error).sum() / (mask * (start - target) ** 2).sum()
    return loss.item(), torch.autograd.grad(loss, (x_all, y_all, lr))


@pytest.mark.parametrize("selection", ["depth", "loss", "none"])
@pytest.mark.parametrize("dsa", [False, True])
def test_auto_gives_the_unrolled_loss_and_gradients_at_every_split(selection, dsa):
    problem = _problem(selection, dsa)
    loss, expected = _full_graph_oracle(*problem)
    for kept in range(len(problem[6]) + 1):
        matched = auto_gradients(*problem, kept=kept)
        assert matched.kept == kept
        assert matched.loss == pytest.approx(loss, rel=1e-10), kept
        for name, want in zip(("grad_images", "grad_labels", "grad_lr"), expected):
            assert want.abs().sum() > 0
            torch.testing.assert_close(getattr(matched, name), want, rtol=1e-8, atol=1e-12,
                                       msg=f"{name}, kept {kept}")


def test_a_split_outside_the_plan_or_no_way_to_choose_one_is_refused():
    problem = _problem("depth", False)
    with pytest.raises(ValueError, match="kept: 6 is not between 0 and the 5 inner steps"):
        auto_gradients(*problem, kept=6)
    with pytest.raises(ValueError, match="needs a GraphBudget"):
        auto_gradients(*problem)


def test_auto_measures_a_kept_step_first_then_keeps_what_the_budget_holds():
    problem = _problem("depth", True)
    plan = problem[6]
    assert [len(step.indices) for step in plan] == [2, 4, 2, 4, 2]
    budget = GraphBudget(budget_bytes=10**12)
    assert auto_gradients(*problem, budget=budget).kept == 1  # nothing measured yet
    assert set(budget.step_bytes) == {2} and budget.step_bytes[2] > 0
    assert auto_gradients(*problem, budget=budget).kept == 5
    assert set(budget.step_bytes) == {2, 4}  # the kept 4-row steps are measured too
    two_last = budget.estimate(2) + budget.estimate(4)
    budget.budget_bytes = math.ceil(two_last)
    assert auto_gradients(*problem, budget=budget).kept == 2
    budget.budget_bytes = math.ceil(two_last) - 1
    assert auto_gradients(*problem, budget=budget).kept == 1
    budget.budget_bytes = int(0.5 * budget.estimate(2))
    assert auto_gradients(*problem, budget=budget).kept == 0


def test_auto_measures_each_batch_size_and_dsa_family_once_then_runs_unhooked():
    problem = _problem("depth", True)
    plan = problem[6]
    budget = GraphBudget(budget_bytes=10**12)
    auto_gradients(*problem, budget=budget)
    auto_gradients(*problem, budget=budget)
    assert budget.measured == {(len(step.indices), step.draw.family) for step in plan}
    figures = dict(budget.step_bytes)
    # A step measured again would raise its batch size's figure back from 1.
    budget.step_bytes = dict.fromkeys(figures, 1)
    assert auto_gradients(*problem, budget=budget).kept == len(plan)
    assert budget.step_bytes == dict.fromkeys(figures, 1)
    # Forgetting what was measured measures every kept step again, to the same figures.
    budget.measured.clear()
    auto_gradients(*problem, budget=budget)
    assert budget.step_bytes == figures
    # Without DSA a step's pair has no family.
    undrawn = _problem("depth", False)
    plain = GraphBudget(budget_bytes=10**12)
    auto_gradients(*undrawn, budget=plain)
    assert plain.measured == {(len(undrawn[6][-1].indices), None)}


def test_a_loaded_budget_keeps_the_steps_the_saved_one_would_keep():
    problem = _problem("depth", True)
    budget = GraphBudget(budget_bytes=10**12)
    auto_gradients(*problem, budget=budget)
    budget.budget_bytes = math.ceil(budget.estimate(2) + budget.estimate(4))
    loaded = GraphBudget()
    loaded.load_state_dict(budget.state_dict())
    assert loaded.kept_steps(problem[6], torch.device("cpu")) == budget.kept_steps(problem[6], torch.device("cpu"))
    assert auto_gradients(*problem, budget=loaded).kept == auto_gradients(*problem, budget=budget).kept == 2


def test_step_estimate_scales_up_from_smaller_batches_only():
    budget = GraphBudget()
    budget.step_bytes = {4: 1000}
    overhead = GraphBudget.ALLOCATOR_OVERHEAD
    assert budget.estimate(8) == pytest.approx(2000 * overhead)
    assert budget.estimate(2) == pytest.approx(1000 * overhead)
    budget.step_bytes[2] = 700  # a small batch's fixed share makes its per-row figure the larger one
    assert budget.estimate(8) == pytest.approx(2800 * overhead)


def test_default_budget_is_a_fraction_of_the_memory_free_at_the_first_call(monkeypatch):
    problem = _problem("none", False)
    budget = GraphBudget()
    budget.step_bytes = {4: 1000}
    step = budget.estimate(4)
    monkeypatch.setattr(matching, "free_memory_bytes", lambda device: 2.1 * step / GraphBudget.FREE_FRACTION)
    # Every step is estimated at the 4-row figure or below: two of them fit in 2.1 such steps, and the
    # third trailing step, of 2 rows, at 1000 bytes as measured on 4, does not.
    assert budget.kept_steps(problem[6], torch.device("cpu")) == 2
    # Later calls keep that budget: the memory this process frees and reuses is not free to the kernel.
    monkeypatch.setattr(matching, "free_memory_bytes", lambda device: 0)
    assert budget.kept_steps(problem[6], torch.device("cpu")) == 2
    # A sweep trial with half of its node budgets half of what is free: twice the memory, the same two steps.
    shared = GraphBudget(share=0.5)
    shared.step_bytes = dict(budget.step_bytes)
    monkeypatch.setattr(matching, "free_memory_bytes", lambda device: 4.2 * step / GraphBudget.FREE_FRACTION)
    assert shared.kept_steps(problem[6], torch.device("cpu")) == 2


def test_free_memory_is_positive_on_this_machine():
    assert matching.free_memory_bytes(torch.device("cpu")) > 0


def test_the_config_allows_exactly_the_gradient_paths():
    assert get_args(DistillConfig.model_fields["gradient"].annotation) == GRADIENT_PATHS
    for name in GRADIENT_PATHS:
        assert callable(matching.gradient_path(name, 1.0))
    with pytest.raises(ValueError, match="allowed: unrolled, constant_memory, auto"):
        matching.gradient_path("tesla")
