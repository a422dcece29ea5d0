"""Evaluation: accuracy, the training protocol on a (synthetic) set, and the per-architecture scores."""

import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from tqdm.auto import tqdm

from conftest import tiny_config, tiny_dataset
from pad_ray.data import Split
from pad_ray.evaluate import Scores, SyntheticSet, accuracy, evaluate, train_on
from pad_ray.models import seeded_model

CPU = torch.device("cpu")


class _FirstPixel(nn.Module):
    """Predicts the class written in each image's first pixel."""

    def forward(self, x):
        return F.one_hot(x[:, 0, 0, 0].long(), 3).float()


def test_accuracy_counts_correct_predictions_across_batches():
    images = torch.zeros(5, 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 2.0, 2.0, 1.0])
    split = Split(images, torch.tensor([0, 1, 0, 2, 0]), torch.arange(5))
    assert accuracy(_FirstPixel(), split, CPU, batch=2) == pytest.approx(3 / 5)
    assert accuracy(_FirstPixel(), split, CPU) == pytest.approx(3 / 5)
    empty = Split(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert math.isnan(accuracy(_FirstPixel(), empty, CPU))


def _fresh(cfg, seed=0, name="convnet"):
    return seeded_model(cfg.model, 1, 3, 8, seed, name=name)


def _no_dsa(**evaluate):
    return tiny_config(evaluate={"dsa": False, **evaluate})


def test_hard_labels_train_a_net_that_fits_the_set():
    data = tiny_dataset()
    cfg = _no_dsa(epochs=20)
    net = _fresh(cfg)
    before = accuracy(net, data.train, CPU)
    train_on(SyntheticSet(data.train.images, data.train.labels, 0.01), net, cfg.evaluate, seed=0, device=CPU)
    assert accuracy(net, data.train, CPU) >= 0.95
    assert accuracy(net, data.test, CPU) >= 0.9
    assert before < 0.9


def test_soft_labels_are_the_targets():
    # Logit labels that point at the NEXT class: the trained net must follow them, not the images' classes.
    data = tiny_dataset()
    cfg = _no_dsa(epochs=20)
    shifted = (data.train.labels + 1) % 3
    soft = 4.0 * F.one_hot(shifted, 3).float()
    net = _fresh(cfg)
    train_on(SyntheticSet(data.train.images, soft, 0.01), net, cfg.evaluate, seed=0, device=CPU)
    assert accuracy(net, Split(data.train.images, shifted, data.train.index), CPU) >= 0.95
    assert accuracy(net, data.train, CPU) <= 0.05


def test_uniform_soft_labels_undo_what_a_net_knew():
    # Soft cross-entropy against equal logits is minimised by a uniform prediction: a confident net
    # trained on them forgets its classes.
    data = tiny_dataset()
    cfg = _no_dsa(epochs=20)
    net = _fresh(cfg)
    train_on(SyntheticSet(data.train.images, data.train.labels, 0.01), net, cfg.evaluate, seed=0, device=CPU)
    with torch.no_grad():
        confident = F.softmax(net(data.train.images), dim=1)
    assert confident.max(dim=1).values.mean() > 0.8
    train_on(SyntheticSet(data.train.images, torch.zeros(60, 3), 0.05), net, cfg.evaluate, seed=0, device=CPU)
    with torch.no_grad():
        probs = F.softmax(net(data.train.images), dim=1)
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / 3), atol=0.05, rtol=0)


class _StepRecorder:
    """Records the hyperparameters of every optimizer step taken while it is open."""

    def __enter__(self):
        self.steps = []
        self._handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def _hook(self, optimizer, args, kwargs):
        self.steps.append(dict(optimizer.param_groups[0], params=None))

    def __exit__(self, *exc):
        self._handle.remove()


@pytest.mark.parametrize("epochs", [4, 5])
def test_lr_drops_tenfold_at_half_the_epochs(epochs):
    data = tiny_dataset()
    cfg = tiny_config(evaluate={"epochs": epochs, "batch_size": 8, "momentum": 0.9, "weight_decay": 5e-4})
    synthetic = SyntheticSet(data.train.images[:30], data.train.labels[:30], 0.02)  # 4 steps per epoch
    with _StepRecorder() as recorder:
        train_on(synthetic, _fresh(cfg), cfg.evaluate, seed=0, device=CPU)
    lrs = [step["lr"] for step in recorder.steps]
    high = 4 * (epochs // 2)
    assert len(lrs) == 4 * epochs
    assert lrs[:high] == [0.02] * high
    assert lrs[high:] == pytest.approx([0.002] * (len(lrs) - high))
    assert {step["momentum"] for step in recorder.steps} == {0.9}
    assert {step["weight_decay"] for step in recorder.steps} == {5e-4}


def test_train_on_is_reproducible_for_a_seed_with_dsa():
    data = tiny_dataset()
    cfg = tiny_config(evaluate={"epochs": 2, "dsa": True})
    synthetic = SyntheticSet(data.train.images[::5], 3.0 * F.one_hot(data.train.labels[::5], 3).float(), 0.01)
    a = train_on(synthetic, _fresh(cfg), cfg.evaluate, seed=1, device=CPU)
    b = train_on(synthetic, _fresh(cfg), cfg.evaluate, seed=1, device=CPU)
    c = train_on(synthetic, _fresh(cfg), cfg.evaluate, seed=2, device=CPU)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_train_on_does_not_modify_the_synthetic_set():
    data = tiny_dataset()
    cfg = tiny_config(evaluate={"epochs": 1})
    images = data.train.images[:12].clone().requires_grad_(True)
    labels = torch.randn(12, 3, requires_grad=True)
    train_on(SyntheticSet(images, labels, 0.01), _fresh(cfg), cfg.evaluate, seed=0, device=CPU)
    assert torch.equal(images.detach(), data.train.images[:12])
    assert images.grad is None and labels.grad is None


def _small_synthetic(data):
    index = torch.cat([torch.nonzero(data.train.labels == c).flatten()[:2] for c in range(3)])
    return SyntheticSet(data.train.images[index], 3.0 * F.one_hot(data.train.labels[index], 3).float(), 0.01)


def test_evaluate_reports_num_nets_scores_per_architecture():
    data = tiny_dataset()
    cfg = tiny_config()
    synthetic = _small_synthetic(data)
    scores = evaluate(synthetic, data.val, data.test, 3, cfg.model, cfg.evaluate, seed=5, device=CPU,
                      num_nets=3, models=("convnet", "mlp"))
    assert isinstance(scores, Scores)
    assert list(scores.val) == list(scores.test) == ["convnet", "mlp"]
    for name in ("convnet", "mlp"):
        assert len(scores.val[name]) == len(scores.test[name]) == 3
        assert all(0.0 <= a <= 1.0 for a in scores.val[name] + scores.test[name])
    again = evaluate(synthetic, data.val, data.test, 3, cfg.model, cfg.evaluate, seed=5, device=CPU,
                     num_nets=3, models=("convnet", "mlp"))
    assert again == scores


def test_evaluate_progress_counts_every_epoch_of_every_net_and_changes_no_score(capsys):
    data = tiny_dataset()
    cfg = tiny_config(evaluate={"num_nets": 2, "epochs": 3, "models": ["convnet", "mlp"]})
    synthetic = _small_synthetic(data)
    quiet = evaluate(synthetic, data.val, data.test, 3, cfg.model, cfg.evaluate, seed=5, device=CPU)
    assert capsys.readouterr().err == ""
    # Another bar still open in the process (as one an earlier test left, or a caller's) moves this one down a
    # line; it must still end on its full count.
    with tqdm(total=1, file=io.StringIO()):
        shown = evaluate(synthetic, data.val, data.test, 3, cfg.model, cfg.evaluate, seed=5, device=CPU,
                         progress=True)
    err = capsys.readouterr().err
    assert shown == quiet
    # 2 architectures x 2 nets x 3 epochs, and the net it is on.
    assert "evaluation" in err and "12/12" in err and "mlp net 2/2" in err, err
    # Under the distill bar an evaluation's bar goes when it is done: its last line is blank.
    evaluate(synthetic, data.val, data.test, 3, cfg.model, cfg.evaluate, seed=5, device=CPU, progress=True,
             leave=False)
    assert re.sub(r"\x1b\[\d*A", "", capsys.readouterr().err.split("\r")[-1]).strip() == ""  # bar cleared; cursor back up


def test_train_on_calls_on_epoch_once_per_epoch():
    data = tiny_dataset()
    cfg = _no_dsa(epochs=4)
    epochs = []
    train_on(_small_synthetic(data), _fresh(cfg), cfg.evaluate, seed=0, device=CPU,
             on_epoch=lambda: epochs.append(len(epochs)))
    assert epochs == [0, 1, 2, 3]


def test_evaluate_defaults_come_from_the_config():
    data = tiny_dataset()
    cfg = tiny_config(evaluate={"num_nets": 2, "models": ["mlp"]})
    scores = evaluate(_small_synthetic(data), data.val, data.test, 3, cfg.model, cfg.evaluate, seed=5, device=CPU)
    assert list(scores.test) == ["mlp"]
    assert len(scores.val["mlp"]) == len(scores.test["mlp"]) == 2


def test_evaluate_on_the_full_real_set_scores_high_on_val_and_test():
    data = tiny_dataset()
    cfg = _no_dsa(epochs=20, num_nets=2)
    real = SyntheticSet(data.train.images, data.train.labels, 0.01)
    scores = evaluate(real, data.val, data.test, 3, cfg.model, cfg.evaluate, seed=0, device=CPU,
                      models=("convnet", "mlp"))
    for name in ("convnet", "mlp"):
        assert min(scores.val[name]) >= 0.9 and min(scores.test[name]) >= 0.9, (name, scores)
    mean, std = Scores.summary(scores.test["convnet"])
    assert mean == pytest.approx(sum(scores.test["convnet"]) / 2)
    assert std >= 0.0
    assert Scores.summary([0.5]) == (0.5, 0.0)
