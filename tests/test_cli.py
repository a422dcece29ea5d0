"""The `pad-ray` command: bad input stops cleanly; the whole PAD pipeline runs on the real MNIST."""

import json
import subprocess
import sys

import pytest
import torch

from pad_ray import stages
from pad_ray.config import load_config
from pad_ray.distill import Distiller
from pad_ray.evaluate import random_real_subset
from pad_ray.runtime import derive_seed, generator
from pad_ray.trajectories import TrajectoryStore

CPU = torch.device("cpu")


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


# A small end-to-end run (about as long as the CPU preset of the first release): IPC 1, where a few
# dozen iterations already move the set well beyond both of its controls.
SMALL_RUN = """preset: mnist-ipc1
data: {{root: {root}, train_per_class: 300, test_size: 2000}}
output_dir: {out}/runs
store_dir: {out}/store
experts: {{num_experts: 4, epochs: 8}}
schedule: {{add_end_epoch: 2, remove: [{{after_epoch: 6, easiest_fraction: 0.1}}]}}
distill: {{iterations: 60, eval_every: 30, max_start_epoch: 6, syn_steps: 10}}
evaluate: {{num_nets: 3, epochs: 200}}
"""


def test_pad_on_real_mnist_beats_random_subsets_and_its_own_starting_set(tmp_path, mnist_root):
    """EL2N scores, scheduled experts, PAD distillation at IPC 1 and evaluation, end to end on CPU,
    against two controls under the same evaluation: random real subsets and the starting set."""
    config = _write(tmp_path, SMALL_RUN.format(root=mnist_root, out=tmp_path))
    result = pad_ray("run", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    distilled = summary["evaluation"]["convnet"]
    assert summary["iterations"] == 60 and summary["skipped"] < summary["iterations"]
    assert "test accuracy" in result.stderr  # the experts' quality line

    cfg = load_config(config)
    data = stages.load_data(cfg)
    trajectories = [TrajectoryStore(cfg.store_dir, cfg).load(i) for i in range(cfg.experts.num_experts)]
    starting = stages.final_evaluation(cfg, data, Distiller(cfg, data, trajectories, CPU).synthetic(), CPU)
    random_means = []
    for draw in range(3):
        subset = random_real_subset(data.train, data.num_classes, cfg.distill.ipc, cfg.distill.lr_teacher,
                                    generator(derive_seed(cfg.seed, "random-subset", draw)))
        random_means.append(stages.final_evaluation(cfg, data, subset, CPU)["convnet"]["test_mean"])
    start = starting["convnet"]
    # The margin must exceed the spread of the evaluation nets, or the comparison says nothing.
    spread = max(distilled["test_std"], start["test_std"])
    assert distilled["test_mean"] > start["test_mean"] + spread, (distilled, start)
    assert distilled["test_mean"] > sum(random_means) / 3 + spread, (distilled, random_means)

    # Artefacts: the grid, the best set verified by checksum, and a rerun that trains nothing new.
    run_dir = tmp_path / summary["run_dir"]
    assert (run_dir / "synthetic.png").stat().st_size > 0
    best = stages.load_synthetic(run_dir / "synthetic_best.npz")
    assert best.images.shape == (10, 1, 28, 28) and best.labels.shape == (10, 10)
    stored = {path: path.stat().st_mtime_ns for path in (tmp_path / "store").rglob("*") if path.is_file()}
    again = pad_ray("experts", str(config), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["accuracy"]["test_accuracy"] > 0.5
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "store").rglob("*") if path.is_file()} == stored
