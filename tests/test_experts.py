"""Expert trajectories: layout, reproducibility, resuming, the scheduled subset, and the GSAM step."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from pad_ray import files
from pad_ray.data import Split
from pad_ray.experts import ExpertRun, gsam_step, train_expert
from pad_ray.models import seeded_model
from pad_ray.models import FlatParams
from pad_ray.runtime import derive_seed

CPU = torch.device("cpu")


def _train(cfg, data, order, seed, train=None):
    return train_expert(train or data.train, order, 3, cfg.model, cfg.experts, cfg.schedule, seed, CPU)


def _run(cfg, data, order, seed, train=None):
    return ExpertRun(train or data.train, order, 3, cfg.model, cfg.experts, cfg.schedule, seed, CPU)


def _poisoned(train: Split, indices: torch.Tensor) -> Split:
    """A copy of the split whose images at `indices` are NaN: touching any of them ruins the weights."""
    images = train.images.clone()
    images[indices] = float("nan")
    return Split(images, train.labels, train.index)


def test_trajectory_layout_and_initial_weights(tiny):
    cfg, _, _, trajectories = tiny
    seed = derive_seed(cfg.experts.seed, "expert", 0)
    trajectory = trajectories[0]
    initial = FlatParams(seeded_model(cfg.model, 1, 3, 8, seed)).flatten().numpy()
    assert trajectory.dtype == np.float32
    assert trajectory.shape == (cfg.experts.epochs + 1, initial.size)
    np.testing.assert_array_equal(trajectory[0], initial)
    assert np.isfinite(trajectory).all()
    for epoch in range(cfg.experts.epochs):
        assert not np.array_equal(trajectory[epoch], trajectory[epoch + 1]), f"epoch {epoch} changed nothing"


def test_seeded_model_leaves_the_global_rng_alone():
    cfg = tiny_config()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    seeded_model(cfg.model, 1, 3, 8, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_same_seed_is_bit_identical_and_another_seed_differs(tiny):
    cfg, data, order, trajectories = tiny
    again = _train(cfg, data, order, derive_seed(cfg.experts.seed, "expert", 0))
    np.testing.assert_array_equal(again, trajectories[0])
    other = trajectories[1]
    assert not np.array_equal(other[0], trajectories[0][0])
    assert not np.array_equal(other[-1], trajectories[0][-1])


def test_on_epoch_reports_every_epoch_with_a_finite_loss(tiny):
    cfg, data, order, _ = tiny
    seen = []
    train_expert(data.train, order, 3, cfg.model, cfg.experts, cfg.schedule, 11, CPU,
                 on_epoch=lambda epoch, loss: seen.append((epoch, loss)))
    assert [epoch for epoch, _ in seen] == list(range(1, cfg.experts.epochs + 1))
    assert all(np.isfinite(loss) and loss > 0 for _, loss in seen)


def test_resuming_from_a_saved_state_gives_the_same_trajectory(tiny, tmp_path):
    # Momentum and DSA make the optimizer state and the generator state matter.
    _, data, order, _ = tiny
    cfg = tiny_config(experts={"momentum": 0.9, "dsa": True})
    uninterrupted = _train(cfg, data, order, seed=21)

    first = _run(cfg, data, order, seed=21)
    first.run_epoch()
    first.run_epoch()
    files.save_torch(tmp_path / "expert.pt", first.state_dict())  # as a worker would before being killed
    del first

    resumed = _run(cfg, data, order, seed=21)
    resumed.load_state_dict(files.load_torch(tmp_path / "expert.pt"))
    assert resumed.epoch == 2
    while resumed.epoch < cfg.experts.epochs:
        resumed.run_epoch()
    np.testing.assert_array_equal(resumed.trajectory(), uninterrupted)


def _epochs(cfg, data, order, seed, count, train=None):
    run = _run(cfg, data, order, seed, train)
    for _ in range(count):
        run.run_epoch()
    return run.trajectory()


def test_epoch_zero_trains_only_on_the_easiest_samples(tiny):
    # Tiny schedule: epoch 0 keeps the int(0.5 * 20) = 10 easiest of each class, epoch 1 keeps 15.
    cfg, data, order, _ = tiny
    poisoned = _poisoned(data.train, torch.cat([o[10:] for o in order]))
    clean = _epochs(cfg, data, order, 4, 1)
    dirty = _epochs(cfg, data, order, 4, 1, train=poisoned)
    assert np.isfinite(dirty).all()
    np.testing.assert_array_equal(dirty, clean)
    # Epoch 1 adds harder samples: the poison then reaches the weights (so it would have been seen).
    assert not np.isfinite(_epochs(cfg, data, order, 4, 2, train=poisoned)[2]).all()


def test_the_order_decides_which_samples_are_easy(tiny):
    cfg, data, order, _ = tiny
    forward = _epochs(cfg, data, order, 4, 1)
    # Reversed per-class order: epoch 0 sees the other half, so the weights differ.
    backward = _epochs(cfg, data, [o.flip(0) for o in order], 4, 1)
    np.testing.assert_array_equal(forward[0], backward[0])
    assert not np.array_equal(forward[1], backward[1])
    # Reordering only the unscheduled (hard) half changes nothing in epoch 0.
    shuffled = [torch.cat([o[:10], o[10:].flip(0)]) for o in order]
    np.testing.assert_array_equal(_epochs(cfg, data, shuffled, 4, 1), forward)


def test_removed_easy_samples_are_not_trained_on_after_the_removal_epoch(tiny):
    # Tiny schedule: after epoch 3 the easiest int(0.2 * 20) = 4 of each class are dropped.
    cfg, data, order, _ = tiny
    reference = _train(cfg, data, order, seed=8)
    run = _run(cfg, data, order, seed=8)
    while run.epoch < 4:
        run.run_epoch()
    late = _run(cfg, data, order, seed=8, train=_poisoned(data.train, torch.cat([o[:4] for o in order])))
    late.load_state_dict(run.state_dict())
    late.run_epoch()
    assert np.isfinite(late.trajectory()).all()
    np.testing.assert_array_equal(late.trajectory(), reference)


def _problem(seed=0):
    cfg = tiny_config()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 1, 8, 8, generator=gen)
    y = torch.arange(3).repeat(4)
    x[torch.arange(12), 0, 2 * y, :] += 2.0
    return cfg, x, y


def _net_and_sgd(cfg, lr=0.05, momentum=0.0):
    net = seeded_model(cfg.model, 1, 3, 8, seed=7)
    return net, torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_without_perturbation_or_decomposition_is_a_plain_sgd_step(adaptive):
    cfg, x, y = _problem()
    sam_net, sam_opt = _net_and_sgd(cfg, momentum=0.9)
    sgd_net, sgd_opt = _net_and_sgd(cfg, momentum=0.9)
    for _ in range(3):
        loss = gsam_step(sam_net, lambda: F.cross_entropy(sam_net(x), y), sam_opt, rho=0.0, alpha=0.0,
                         adaptive=adaptive)
        sgd_opt.zero_grad()
        expected = F.cross_entropy(sgd_net(x), y)
        expected.backward()
        sgd_opt.step()
        assert loss.item() == expected.item()
    for a, b in zip(sam_net.parameters(), sgd_net.parameters()):
        assert torch.equal(a, b)


def _reference_gsam(net, x, y, lr, rho, alpha, adaptive):
    """FTD's GSAM update (perturb, decompose the gradient, undo, SGD step) written out on the flat
    parameter vector."""
    flat = FlatParams(net)
    w = flat.flatten()

    def grad(at):
        at = at.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(flat.forward(at, x), y), at)[0]

    g = grad(w)
    if adaptive:
        e = rho * g * w.pow(2) / (w.abs() * g).norm()
    else:
        e = rho * g / g.norm()
    g_new = grad(w + e)
    cosine = (g @ g_new) / (g.norm() * g_new.norm())
    vertical = g - cosine * g.norm() * g_new / g_new.norm()
    return w - lr * (g_new - alpha * vertical)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_gsam_step_matches_the_written_out_update(adaptive, alpha):
    cfg, x, y = _problem()
    rho = 0.5 if adaptive else 0.05  # adaptive scales e by w^2, so it needs a larger rho to show
    reference_net, _ = _net_and_sgd(cfg)
    expected = _reference_gsam(reference_net, x, y, 0.05, rho, alpha, adaptive)
    net, optimizer = _net_and_sgd(cfg)
    gsam_step(net, lambda: F.cross_entropy(net(x), y), optimizer, rho=rho, alpha=alpha, adaptive=adaptive)
    got = FlatParams(net).flatten()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # And it is not the plain SGD step.
    sgd_net, sgd_opt = _net_and_sgd(cfg)
    F.cross_entropy(sgd_net(x), y).backward()
    sgd_opt.step()
    assert (got - FlatParams(sgd_net).flatten()).abs().max() > 1e-6


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_lowers_the_loss(adaptive):
    cfg, x, y = _problem()
    net, optimizer = _net_and_sgd(cfg, lr=0.1)
    with torch.no_grad():
        before = F.cross_entropy(net(x), y).item()
    losses = [gsam_step(net, lambda: F.cross_entropy(net(x), y), optimizer, rho=0.05, alpha=0.3,
                        adaptive=adaptive).item() for _ in range(15)]
    with torch.no_grad():
        after = F.cross_entropy(net(x), y).item()
    assert losses[0] == pytest.approx(before)  # the returned loss is the one at the unperturbed weights
    assert after < 0.5 * before


def test_train_expert_with_gsam(tiny):
    cfg, data, order, trajectories = tiny
    gsam = tiny_config(experts={"optimizer": "gsam", "rho": 0.05, "adaptive": False})
    seed = derive_seed(cfg.experts.seed, "expert", 0)
    with_gsam = _train(gsam, data, order, seed)
    with_sgd = trajectories[0]
    assert with_gsam.shape == with_sgd.shape
    assert np.isfinite(with_gsam).all()
    np.testing.assert_array_equal(with_gsam[0], with_sgd[0])
    assert not np.array_equal(with_gsam[1], with_sgd[1])
    np.testing.assert_array_equal(_train(gsam, data, order, seed), with_gsam)


def test_train_expert_with_gsam_at_rho_zero_is_the_sgd_expert(tiny):
    cfg, data, order, trajectories = tiny
    gsam = tiny_config(experts={"optimizer": "gsam", "rho": 0.0, "gsam_alpha": 0.0})
    np.testing.assert_array_equal(_train(gsam, data, order, derive_seed(cfg.experts.seed, "expert", 1)), trajectories[1])


def test_stored_expert_carries_its_curves_and_the_accuracy_of_its_final_weights(tiny, tmp_path):
    from pad_ray import local_stages
    from pad_ray.evaluate import accuracy
    from pad_ray.trajectories import TrajectoryStore

    _, data, order, _ = tiny
    cfg = tiny_config(tmp_path)
    store = TrajectoryStore(cfg.store_dir, cfg)
    local_stages.produce_expert(cfg, store, 0, local_stages.ExpertSplits.of(data, CPU), order, 3, CPU)

    quality = store.quality(1)
    expert = quality.experts[0]
    assert len(expert["loss"]) == len(expert["val_accuracy"]) == cfg.experts.epochs
    assert expert["loss"][-1] < expert["loss"][0]
    # The stored accuracies are those of the stored final weights, on each split.
    net = seeded_model(cfg.model, 1, 3, 8, 0)
    FlatParams(net).load_into(net, torch.from_numpy(np.array(store.load(0)[-1])))
    for split, name in ((data.train, "train_accuracy"), (data.val, "final_val_accuracy"),
                        (data.test, "test_accuracy")):
        assert expert[name] == pytest.approx(accuracy(net, split, CPU))
    assert expert["final_val_accuracy"] == expert["val_accuracy"][-1]
    assert quality.summary()["test_accuracy"] == pytest.approx(expert["test_accuracy"])
    assert f"{100 * expert['test_accuracy']:.1f}%" in quality.line()


def test_a_resumed_expert_keeps_the_curves_of_the_epochs_before_the_interruption(tiny, tmp_path):
    from pad_ray import local_stages
    from pad_ray.trajectories import TrajectoryStore

    _, data, order, _ = tiny
    cfg = tiny_config(tmp_path)
    splits = local_stages.ExpertSplits.of(data, CPU)
    whole = TrajectoryStore(cfg.store_dir, cfg)
    local_stages.produce_expert(cfg, whole, 0, splits, order, 3, CPU)

    cut = tiny_config(tmp_path / "cut")
    store = TrajectoryStore(cut.store_dir, cut)

    class Interrupt(Exception):
        pass

    def stop_after_two(epoch, loss):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        local_stages.produce_expert(cut, store, 0, splits, order, 3, CPU, on_epoch=stop_after_two)
    local_stages.produce_expert(cut, store, 0, splits, order, 3, CPU)
    assert store.info(0)["resumed_at"] == [2]
    assert store.quality(1).experts[0] == whole.quality(1).experts[0]


@pytest.mark.slow  # two compiles of the tiny net, about 20 CPU-seconds
def test_a_compiled_expert_follows_the_eager_one_and_resumes_bit_for_bit(tiny, tmp_path):
    from torch._dynamo.utils import counters

    from pad_ray.trajectories import TrajectoryStore

    _, data, order, _ = tiny
    eager_cfg = tiny_config(tmp_path, experts={"momentum": 0.9, "dsa": True})
    cfg = tiny_config(tmp_path, experts={"momentum": 0.9, "dsa": True, "compile": True})
    torch._dynamo.reset()
    compiled = _train(cfg, data, order, seed=21)
    assert counters["stats"]["unique_graphs"] >= 1  # the full batches ran through a compiled graph
    # Compiled kernels sum in another order, so the last bits move, as with another thread count.
    np.testing.assert_allclose(compiled, _train(eager_cfg, data, order, seed=21), rtol=1e-4, atol=1e-5)

    # Loading a checkpoint into the network reaches the compiled module, which shares its parameters.
    first = _run(cfg, data, order, seed=21)
    first.run_epoch()
    files.save_torch(tmp_path / "expert.pt", first.state_dict())
    resumed = _run(cfg, data, order, seed=21)
    resumed.load_state_dict(files.load_torch(tmp_path / "expert.pt"))
    while resumed.epoch < cfg.experts.epochs:
        resumed.run_epoch()
    np.testing.assert_array_equal(resumed.trajectory(), compiled)

    # How the experts run is not what they are: both configs name one expert set.
    assert TrajectoryStore(cfg.store_dir, cfg).dir == TrajectoryStore(eager_cfg.store_dir, eager_cfg).dir
