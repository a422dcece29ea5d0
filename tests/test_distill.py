import re

import pytest
import torch
from tqdm.auto import tqdm

from conftest import tiny_config
from pad_ray import files
from pad_ray.config import ConfigError
from pad_ray.distill import Best, Distiller, DivergenceError, _correct_first, _logits, distill
from pad_ray.models import FlatParams, seeded_model

CPU = torch.device("cpu")


def _run(distiller: Distiller, steps: int) -> None:
    for _ in range(steps):
        distiller.step()


def _same_state(a: Distiller, b: Distiller) -> None:
    assert a.iteration == b.iteration
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    torch.testing.assert_close(a.labels, b.labels, rtol=0, atol=0)
    assert a.syn_lr.item() == b.syn_lr.item()


def test_initial_set_is_class_contiguous_and_correctly_predicted(tiny):
    cfg, data, _, trajectories = tiny
    d = Distiller(cfg, data, trajectories, CPU)
    assert d.images.shape == (3 * cfg.distill.ipc, 1, 8, 8)
    hard = torch.arange(3).repeat_interleave(cfg.distill.ipc)
    # Soft labels average the logits of experts that are right, so their argmax is the true class.
    assert torch.equal(d.labels.argmax(dim=1), hard)
    # Every initial image is a real training image of its class.
    for image, label in zip(d.images, hard):
        match = (data.train.images == image).flatten(1).all(dim=1)
        assert data.train.labels[match].tolist() == [label.item()]
    assert d.syn_lr.item() == pytest.approx(cfg.distill.lr_teacher)


def _correct_first_over_whole_class(net, finals, images, members, label, ipc):
    """The rule on every member's logits at once: each expert in turn adds the correctly predicted members
    not yet picked, in `members`' order, then the rest fill up."""
    picked, remaining = [], torch.ones(len(members), dtype=torch.bool)
    for final in finals:
        correct = (_logits(net, final, images[members]).argmax(dim=1) == label) & remaining
        take = torch.nonzero(correct).flatten()[: ipc - len(picked)]
        picked += take.tolist()
        remaining[take] = False
    fill = torch.nonzero(remaining).flatten()[: ipc - len(picked)].tolist()
    return members[picked + fill]


@pytest.mark.parametrize("ipc", [1, 40, 300, 700])
def test_correct_first_scans_only_until_it_has_ipc_and_picks_as_the_whole_class_would(ipc):
    """Untrained experts on noise: the first gets 2% of class 2 right, the others about 75%, so larger `ipc`
    need more batches and more experts, and at 700 (the whole class) members no expert gets right."""
    cfg = tiny_config()
    net = FlatParams(seeded_model(cfg.model, 1, 3, 8, 0))
    finals = [FlatParams(seeded_model(cfg.model, 1, 3, 8, seed)).flatten() for seed in (1, 2, 3)]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(900, 1, 8, 8, generator=gen)
    members = torch.randperm(900, generator=gen)[:700]
    forwarded = []
    forward = net.forward
    net.forward = lambda flat, x: forwarded.append(len(x)) or forward(flat, x)
    got = _correct_first(net, finals, images, members, 2, ipc, CPU)
    net.forward = forward

    assert torch.equal(got, _correct_first_over_whole_class(net, finals, images, members, 2, ipc))
    assert len(set(got.tolist())) == ipc
    whole = len(finals) * len(members)
    assert sum(forwarded) < whole if ipc < len(members) else sum(forwarded) == whole
    assert ipc != 1 or forwarded == [256]  # the first batch of the first expert holds one


def test_real_init_takes_the_first_experts_raw_logits_as_the_released_code_does(tiny):
    _, data, _, trajectories = tiny
    cfg = tiny_config(distill={"pix_init": "real"})
    d = Distiller(cfg, data, trajectories, CPU)
    first = torch.from_numpy(trajectories[0][-1].copy())
    second = torch.from_numpy(trajectories[1][-1].copy())
    with torch.no_grad():
        torch.testing.assert_close(d.labels, d.net.forward(first, d.images))
        assert not torch.allclose(d.labels, (d.net.forward(first, d.images) + d.net.forward(second, d.images)) / 2)


def test_ipc_larger_than_a_class_is_rejected(tiny):
    _, data, _, trajectories = tiny
    cfg = tiny_config(distill={"ipc": 21})
    with pytest.raises(ConfigError, match="distill.ipc: 21 is larger than class 0"):
        Distiller(cfg, data, trajectories, CPU)


def test_steps_change_images_labels_and_lr(tiny):
    cfg, data, _, trajectories = tiny
    d = Distiller(cfg, data, trajectories, CPU)
    before = d.synthetic()
    stats = [d.step() for _ in range(3)]
    assert all(not s.skipped for s in stats)
    assert not torch.equal(before.images, d.images.detach())
    assert not torch.equal(before.labels, d.labels.detach())
    assert d.syn_lr.item() != before.lr
    assert {s.expert for s in stats[:2]} == {0, 1}  # experts visited without replacement


def test_loss_above_threshold_skips_the_update(tiny):
    _, data, _, trajectories = tiny
    cfg = tiny_config(distill={"threshold": 1e-9})
    d = Distiller(cfg, data, trajectories, CPU)
    before = d.synthetic()
    _run(d, 2)
    assert d.skipped == 2 and d.iteration == 2
    assert torch.equal(before.images, d.images.detach())


def test_start_epoch_window_grows_from_t_to_t_plus(tiny):
    cfg, data, _, trajectories = tiny  # T=2, T+=3, interval 2
    d = Distiller(cfg, data, trajectories, CPU)
    assert [d.upper_start_epoch(i) for i in (0, 1, 2, 50)] == [2, 2, 3, 3]
    d = Distiller(tiny_config(distill={"current_max_start_epoch": 3}), data, trajectories, CPU)
    assert d.upper_start_epoch(0) == 3


def test_nan_loss_raises_divergence(tiny):
    cfg, data, _, trajectories = tiny
    d = Distiller(cfg, data, trajectories, CPU)
    with torch.no_grad():
        d.images.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="matching loss is nan at iteration 0"):
        d.step()


def test_non_positive_lr_raises_divergence(tiny):
    cfg, data, _, trajectories = tiny
    d = Distiller(cfg, data, trajectories, CPU)
    with torch.no_grad():
        d.syn_lr.fill_(-0.01)
    with pytest.raises(DivergenceError, match="syn_lr became"):
        d.step()


def test_a_run_that_raises_leaves_no_bar_open(tiny):
    """Divergence or a stopped trial: an open bar would stay in the process and push every later one down."""
    cfg, data, _, trajectories = tiny
    before = set(tqdm._instances)

    def stop(distiller, metrics):
        raise RuntimeError("stopped")

    # Kept, as a caller that reports the error keeps it: its traceback holds the run's frame, and so its bar.
    with pytest.raises(RuntimeError, match="stopped") as raised:
        distill(cfg, data, trajectories, CPU, progress=True, on_eval=stop)
    assert set(tqdm._instances) == before, raised


# auto: the budget rides in the checkpoint, or the resumed run measures again, keeps one step where the
# straight run keeps all, and rounds differently (1.2e-7 in the images).
# clip: its running averages ride in the checkpoint too; at ratio 1.01 most steps clip.
@pytest.mark.parametrize("options", [{"gradient": "unrolled"}, {"gradient": "auto"},
                                     {"gradient": "unrolled", "clip_ratio": 1.01}])
def test_checkpoint_resume_gives_the_same_result(tiny, tmp_path, options):
    _, data, _, trajectories = tiny
    cfg = tiny_config(distill=options)
    straight = Distiller(cfg, data, trajectories, CPU)
    _run(straight, 4)

    first = Distiller(cfg, data, trajectories, CPU)
    _run(first, 2)
    first.save(tmp_path / "ckpt.pt")
    resumed = Distiller(cfg, data, trajectories, CPU)
    resumed.restore(tmp_path / "ckpt.pt")
    _run(resumed, 2)
    _same_state(straight, resumed)
    assert resumed.expert_cursor == straight.expert_cursor
    assert resumed.clipped == straight.clipped and (straight.clipped > 0) == ("clip_ratio" in options)


def test_distill_resumes_from_its_checkpoint_file(tiny, tmp_path):
    cfg, data, _, trajectories = tiny
    reports = []
    straight = distill(cfg, data, trajectories, CPU, progress=False, on_eval=lambda d, m: reports.append(m))
    assert [r["iteration"] for r in reports] == [2, 4]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in reports)
    assert [s["iteration"] for r in reports for s in r["steps"]] == [1, 2, 3, 4]
    assert reports[1]["distill_time_s"] > reports[0]["distill_time_s"] > 0

    checkpoint = tmp_path / "ckpt.pt"
    distill(tiny_config(distill={"iterations": 2}), data, trajectories, CPU, progress=False,
            on_eval=lambda d, m: d.save(checkpoint))
    resumed = distill(cfg, data, trajectories, CPU, state=files.load_torch(checkpoint), progress=False)
    _same_state(straight, resumed)
    assert (resumed.best.iteration, resumed.best.val) == (straight.best.iteration, straight.best.val)


def test_distill_shows_a_bar_for_each_of_its_evaluations_and_changes_nothing(tiny, capsys):
    cfg, data, _, trajectories = tiny
    quiet = distill(cfg, data, trajectories, CPU, progress=False)
    assert capsys.readouterr().err == ""
    shown = distill(cfg, data, trajectories, CPU, progress=True)
    err = capsys.readouterr().err
    _same_state(quiet, shown)
    assert shown.best.iteration == quiet.best.iteration
    # The start, iteration 2 and iteration 4 (eval_every 2): each opens an evaluation bar on its one net.
    assert len(re.findall(r"evaluation: +0%[^\r]*convnet net 1/1", err)) == 3, err
    assert "distill: 100%" in err


def test_every_evaluation_during_distillation_trains_the_same_nets(tiny):
    # The kept set is the one whose nets score best on validation; with the same nets at every iteration the
    # comparison is between sets, not between luckier and unluckier nets (on this problem one net of another
    # seed scores 0.42 to 0.58 on the same set).
    cfg, data, _, trajectories = tiny
    distiller = Distiller(cfg, data, trajectories, CPU)
    first = distiller.evaluate_now()
    for later in (1, 2, 4):
        distiller.iteration = later  # the same set, at a later iteration
        assert distiller.evaluate_now() == first


def test_the_starting_set_is_evaluated_and_can_be_the_best(tiny):
    cfg, data, _, trajectories = tiny
    start_val, start_test = Distiller(cfg, data, trajectories, CPU).evaluate_summary()  # the nets of every evaluation
    reports = []
    run = distill(cfg, data, trajectories, CPU, progress=False, on_eval=lambda d, m: reports.append(m))
    # Its scores ride on the first report; the sweep's count of reports is unchanged.
    assert [r["iteration"] for r in reports] == [2, 4]
    assert (reports[0]["start_val_accuracy"], reports[0]["start_test_accuracy"]) == (start_val, start_test)
    assert "start_val_accuracy" not in reports[1]
    assert run.best.val == max(start_val, *(r["val_accuracy"] for r in reports))
    assert reports[0]["best_val_accuracy"] >= start_val
    assert reports[-1]["best_iteration"] == run.best.iteration  # 0 when no later set beat the start

    untouched = distill(tiny_config(distill={"iterations": 0}), data, trajectories, CPU, progress=False)
    assert (untouched.best.iteration, untouched.best.val) == (0, start_val)
    torch.testing.assert_close(untouched.best_synthetic().images, untouched.images.detach(), rtol=0, atol=0)

    unscored = []
    skipped = distill(tiny_config(distill={"eval_start": False}), data, trajectories, CPU, progress=False,
                      on_eval=lambda d, m: unscored.append(m))
    assert "start_val_accuracy" not in unscored[0] and skipped.best.iteration in (2, 4)


def test_the_best_set_survives_a_checkpoint(tiny, tmp_path):
    cfg, data, _, trajectories = tiny
    first = Distiller(cfg, data, trajectories, CPU)
    assert first.best == Best() and first.best_synthetic().images.shape == first.images.shape
    _run(first, 2)
    first.record_best(0.5)
    _run(first, 1)
    assert not first.record_best(0.4)
    first.save(tmp_path / "ckpt.pt")
    resumed = Distiller(cfg, data, trajectories, CPU)
    resumed.restore(tmp_path / "ckpt.pt")
    assert (resumed.best.val, resumed.best.iteration) == (0.5, 2)
    torch.testing.assert_close(resumed.best_synthetic().images, first.best.synthetic.images, rtol=0, atol=0)
    assert not torch.equal(resumed.best_synthetic().images, resumed.images.detach())


@pytest.mark.parametrize("gradient", [
    {"gradient": "constant_memory"},
    {"gradient": "auto"},  # keeps one step while it measures, then all of them
    {"gradient": "auto", "memory_budget_gb": 1e-9},  # keeps one step, then none
])
def test_other_gradient_paths_match_unrolled(tiny, gradient):
    _, data, _, trajectories = tiny
    unrolled = Distiller(tiny_config(distill={"gradient": "unrolled"}), data, trajectories, CPU)
    constant = Distiller(tiny_config(distill=gradient), data, trajectories, CPU)
    _run(unrolled, 3)
    _run(constant, 3)
    torch.testing.assert_close(constant.images, unrolled.images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(constant.labels, unrolled.labels, rtol=1e-4, atol=1e-5)
    assert constant.syn_lr.item() == pytest.approx(unrolled.syn_lr.item(), rel=1e-5)


def test_checkpoint_for_another_expert_set_is_refused(tiny, tmp_path):
    cfg, data, _, trajectories = tiny
    d = Distiller(cfg, data, trajectories, CPU)
    d.save(tmp_path / "ckpt.pt")
    other = Distiller(cfg, data, trajectories[:1], CPU)
    with pytest.raises(ConfigError, match="2 experts"):
        other.restore(tmp_path / "ckpt.pt")


def test_depth_cut_into_the_classifier_warns(tiny):
    _, data, _, trajectories = tiny
    with pytest.warns(UserWarning, match="reaches the classifier"):
        Distiller(tiny_config(distill={"alpha": 0.95}), data, trajectories, CPU)
