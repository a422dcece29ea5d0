"""The `pad-ray` command: bad input stops cleanly; the whole PAD pipeline runs on the real MNIST."""

import json
import subprocess
import sys

import pytest
import torch

from pad_ray import stages
from pad_ray.config import load_config
from pad_ray.evaluate import Scores, SyntheticSet, evaluate
from pad_ray.runtime import derive_seed, generator


def pad_ray(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pad_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("preset: smoke\ndistill: {alpah: 0.2}\n", "distill.alpah: unknown key; did you mean 'alpha'?"),
        ("preset: smoke\nschedule: {add_end_epoch: 99}\n", "schedule.add_end_epoch: 99 is beyond experts.epochs"),
        ("preset: smoke\ndistill: {ipc: 0}\n", "distill.ipc"),
        ("preset: smoke\ndata: {root: /nonexistent}\n", "/nonexistent"),
        ("preset: smoke\ndistill: {ipc: 5000}\ndata: {root: ROOT}\n", "distill.ipc: 5000 is larger than the smallest class"),
        ("preset: [\n", "YAML syntax error"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, mnist_root, text, expected):
    config = _write(tmp_path, text.replace("ROOT", str(mnist_root)))
    result = pad_ray("run", str(config), "--set", f"output_dir={tmp_path}/runs", "--set",
                     f"store_dir={tmp_path}/store", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pad-ray: error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_override_is_rejected(tmp_path):
    config = _write(tmp_path, "preset: smoke\n")
    result = pad_ray("scores", str(config), "--set", "distill.ipc", cwd=tmp_path)
    assert result.returncode == 2 and "expected KEY=VALUE" in result.stderr


def test_pad_on_real_mnist_beats_a_random_real_subset(tmp_path, mnist_root):
    """EL2N scores, scheduled experts, PAD distillation at IPC 1 and evaluation, end to end on CPU."""
    config = _write(tmp_path, f"preset: mnist-ipc1\ndata: {{root: {mnist_root}}}\n"
                              f"output_dir: {tmp_path}/runs\nstore_dir: {tmp_path}/store\n")
    result = pad_ray("run", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    distilled = summary["evaluation"]["convnet"]
    assert summary["iterations"] == 60 and summary["best_val_accuracy"] > 0

    cfg = load_config(config)
    data = stages.load_data(cfg)
    gen = generator(derive_seed(cfg.seed, "random-baseline"))
    picks = [torch.nonzero(data.train.labels == c).flatten() for c in range(data.num_classes)]
    picks = torch.cat([p[torch.randperm(len(p), generator=gen)[: cfg.distill.ipc]] for p in picks])
    random_real = SyntheticSet(data.train.images[picks], data.train.labels[picks], cfg.distill.lr_teacher)
    baseline = evaluate(random_real, data.val, data.test, data.num_classes, cfg.model, cfg.evaluate,
                        derive_seed(cfg.seed, "final-eval"), torch.device("cpu"))
    baseline_mean, _ = Scores.summary(baseline.test["convnet"])
    assert distilled["test_mean"] > baseline_mean + 0.05, (distilled, baseline_mean)

    # Artefacts: the grid, the best set verified by checksum, and a rerun that trains nothing new.
    run_dir = tmp_path / summary["run_dir"]
    assert (run_dir / "synthetic.png").stat().st_size > 0
    best = stages.load_synthetic(run_dir / "synthetic_best.npz")
    assert best.images.shape == (10, 1, 28, 28) and best.labels.shape == (10, 10)
    again = pad_ray("experts", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "experts:" not in again.stderr
