"""`--dry-run`: the plan against what a real sweep then does, and the memory model against its measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pad_ray import plan
from pad_ray.config import ModelConfig, build_config
from pad_ray.data import DATASETS, load_raw, prepare
from pad_ray.models import ConvNet, FlatParams
from pad_ray.schedule import scheduled_indices
from pad_ray.sweep_config import check_sweep

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "sweeps" / "smoke.yaml"
MEASURED = REPO / "benchmarks" / "results" / "memory_model.json"
EARLIER = REPO / "benchmarks" / "results" / "distill_iteration-2026-11-21.json"


def cifar10(ipc: int, steps: int, batch: int, **distill):
    return build_config({"preset": f"cifar10-ipc{ipc}", "distill": {"syn_steps": steps, "batch_syn": batch, **distill}})


# -- the network and the data ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 32, 10, 128, 3), (1, 28, 10, 128, 3), (3, 64, 200, 128, 4), (3, 32, 100, 64, 3)])
def test_the_layer_walk_gives_the_convnets_own_sizes(shape):
    channels, size, classes, width, depth = shape
    net = ConvNet(channels, classes, size, width, depth)
    outputs = []
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, out: outputs.append(out[0].numel()))
    net(torch.zeros(1, channels, size, size))
    walked = plan.convnet_shape(channels, size, classes, ModelConfig(width=width, depth=depth))
    assert (walked.params, walked.activations) == (FlatParams(net).size, sum(outputs))


def test_published_sizes_cover_every_dataset_and_match_the_real_mnist_split(mnist_root):
    assert set(plan.DATASET_SHAPES) == set(DATASETS)
    _, train_labels, _, test_labels, _ = load_raw("mnist", mnist_root)
    assert tuple(torch.bincount(train_labels).tolist()) == plan.DATASET_SHAPES["mnist"].train_per_class
    assert len(test_labels) == plan.DATASET_SHAPES["mnist"].test

    cfg = build_config({"preset": "smoke", "data": {"root": str(mnist_root)}})
    data = prepare("mnist", mnist_root, val_fraction=cfg.data.val_fraction, zca=cfg.data.zca, seed=cfg.data.seed,
                   train_per_class=cfg.data.train_per_class, test_size=cfg.data.test_size)
    train, val, test = plan.split_sizes(cfg)
    assert train == torch.bincount(data.train.labels).tolist()
    assert (val, test) == (len(data.val.labels), len(data.test.labels))
    order = [torch.nonzero(data.train.labels == c).flatten() for c in range(10)]
    assert plan.images_per_expert(cfg) == sum(len(scheduled_indices(e, order, cfg.schedule))
                                              for e in range(cfg.experts.epochs))


def test_trial_count_is_grid_points_times_repeats():
    raw = yaml.safe_load(SMOKE.read_text())
    raw["space"] = {"alpha": [0.0, 0.1, 0.2], "ir": [0.5, 0.75], "distill.lr_img": {"choice": [10, 100]},
                    "distill.lr_y": {"uniform": [1, 3]}}
    raw["num_samples"] = 2
    sweep, problems = check_sweep(raw)
    assert not problems
    assert sweep.total_trials == 3 * 2 * 2  # choice and uniform are drawn per trial, not crossed


@pytest.mark.parametrize("controls, line", [
    ({}, "the top trial of each ipc (3) against its starting set and 3 random real subsets: 12 more final "
         "evaluations in all"),
    ({"random_subsets": 5, "starting_set": False}, "the top trial of each ipc (3) against 5 random real subsets: "
                                                   "15 more final evaluations in all"),
    ({"random_subsets": 0, "starting_set": False}, "none")])
def test_the_plan_counts_the_final_evaluations_the_controls_add(controls, line):
    raw = yaml.safe_load(SMOKE.read_text())
    raw["space"]["ipc"] = [1, 2, 3]
    raw["controls"] = controls
    sweep, problems = check_sweep(raw)
    assert not problems
    assert plan._controls_line(sweep) == f"controls: {line}"


@pytest.mark.parametrize("asha, line", [
    ({"grace_period": 1, "reduction_factor": 2},
     "ASHA on val_accuracy (max) within each ipc, from evaluation 1, keeping 1 in 2 at each rung; judged as results "
     "arrive, so timing can decide close calls"),
    ({"grace_period": 2, "reduction_factor": 3, "repeatable": True},
     "ASHA on val_accuracy (max) within each ipc, from evaluation 2, keeping 1 in 3 at each rung; judged in trial "
     "order (asha.repeatable), so every run stops the same trials")])
def test_the_plan_says_how_early_stopping_judges(asha, line):
    raw = yaml.safe_load(SMOKE.read_text())
    raw["space"]["ipc"] = [1, 2]
    raw["asha"] = asha
    sweep, problems = check_sweep(raw)
    assert not problems
    assert plan._stopping_line(sweep).startswith(f"early stopping: {line}")


# -- the memory model ------------------------------------------------------------------------------------

def test_memory_grows_with_steps_batch_and_ipc_on_both_paths():
    model = plan.memory_models()["cpu"]
    for path in plan.PATHS:
        by_steps = [plan.trial_memory(cifar10(10, n, 100), model, path) for n in (10, 20, 40, 80)]
        by_batch = [plan.trial_memory(cifar10(50, 20, b), model, path) for b in (10, 100, 500)]
        by_ipc = [plan.trial_memory(cifar10(ipc, 20, 10), model, path) for ipc in (1, 10, 50)]
        for series in (by_steps, by_batch, by_ipc):
            assert series == sorted(series) and series[0] < series[-1], (path, series)


def test_unrolled_memory_grows_with_every_step_and_constant_memory_stays_flat():
    model = plan.memory_models()["cpu"]
    unrolled = [plan.trial_memory(cifar10(10, n, 100), model, "unrolled") for n in (10, 80)]
    flat = [plan.trial_memory(cifar10(10, n, 100), model, "constant_memory") for n in (10, 80)]
    assert unrolled[1] > 4 * unrolled[0]
    assert flat[1] < 1.25 * flat[0]  # the issue's own bound for the two-pass path
    assert flat[1] < unrolled[1] / 5


def _measured() -> dict:
    return json.loads(MEASURED.read_text())


def test_shipped_constants_are_the_benchmarks_fit_and_match_its_rows_within_the_stated_tolerance():
    measured = _measured()
    model = plan.memory_models()["cpu"]
    assert {k: v for k, v in vars(model).items() if k != "device"} == measured["summary"]["fit"]
    assert 0 < model.tolerance <= 0.15, "a model this far off its own rows is no model"
    rows = measured["rows"]
    assert {r["path"] for r in rows} == set(plan.PATHS) and len({r["shape"] for r in rows}) >= 3
    for row in rows:
        net = plan.NetShape(row["params"], row["activations"], 0)
        estimate = model.peak_bytes(row["path"], net, row["steps"], row["batch"], row["images"], row["image_floats"],
                                    row["classes"])
        assert abs(estimate / row["peak_bytes"] - 1) <= model.tolerance, row


def test_model_predicts_the_larger_iterations_it_was_not_fitted_to():
    """distill_iteration.py measured the CIFAR-10 ConvNet up to N 40 and batch 100 on an idle machine; the
    model, fitted on small N and batches, extrapolates to them."""
    model = plan.memory_models()["cpu"]
    rows = [r for r in json.loads(EARLIER.read_text())["rows"] if "peak_bytes" in r]
    assert len(rows) >= 8
    for row in rows:
        estimate = plan.trial_memory(cifar10(row["ipc"], row["steps"], row["batch"]), model, row["path"])
        assert abs(estimate / row["peak_bytes"] - 1) <= 0.25, (row["path"], row["ipc"], row["steps"], estimate)


@pytest.mark.parametrize(("override", "expected"), [
    ("asha.grace=2", "asha.grace: unknown key; did you mean 'grace_period'?"),
    ("base.store_dir={file}/store", "base.store_dir: cannot write under"),
])
def test_dry_run_rejects_bad_input_with_one_line(sweep_home, tmp_path, override, expected):
    (tmp_path / "file").write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", "pad_ray.sweep", str(SMOKE), "--dry-run",
                             "--set", override.format(file=tmp_path / "file")],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert expected in line and not result.stdout


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tinyimagenet"])
def test_shipped_gpu_sweeps_take_the_path_that_fits_a_48_gb_l40s(name):
    from pad_ray.sweep_config import load_sweep

    model = plan.memory_models()["cpu"]
    configs = plan._trial_configs(load_sweep(REPO / "sweeps" / f"{name}.yaml"))
    l40s = 48e9
    assert all(plan.trial_memory(c, model, c.distill.gradient) * (1 + model.tolerance) < l40s for c in configs)
    assert any(plan.trial_memory(c, model, "unrolled") > l40s for c in configs)  # why not the unrolled path


@pytest.mark.parametrize("gradient", ["unrolled", "auto"])
def test_the_memory_lines_say_which_path_the_sweep_takes_and_what_auto_costs(gradient):
    from pad_ray.sweep_config import load_sweep

    lines = plan._memory_lines(load_sweep(SMOKE, {"base": {"distill": {"gradient": gradient}}}))
    trial = [line for line in lines if line.startswith("  IPC ")]
    assert trial and all(line.endswith(f"this sweep uses {gradient}" + (plan.AUTO_NOTE if gradient == "auto" else ""))
                         for line in trial)
