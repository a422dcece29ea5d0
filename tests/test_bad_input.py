"""A corpus of malformed run configs and sweep files: each stops with exit code 2 and one line that
names the file and the key, without a traceback and without writing anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pad_ray import cli, sweep

REPO = Path(__file__).resolve().parents[1]
SMOKE_SWEEP = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())

RUN_CONFIGS = [
    ("preset: smoke\ndistill: {alpah: 0.2}\n", "distill.alpah: unknown key; did you mean 'alpha'?"),
    ("preset: smoke\ndistil: {alpha: 0.2}\n", "distil: unknown key; did you mean 'distill'?"),
    ("preset: smoke\nexperts: {num_expert: 3}\n", "experts.num_expert: unknown key; did you mean 'num_experts'?"),
    ("preset: smoke\nschedule: {init_ration: 0.5}\n", "schedule.init_ration: unknown key; did you mean 'init_ratio'?"),
    ("preset: smoke\ndistill: {ipc: ten}\n", "distill.ipc: Input should be a valid integer"),
    ("preset: smoke\ndistill: {ipc: 0}\n", "distill.ipc: Input should be greater than or equal to 1"),
    ("preset: smoke\ndistill: {ipc: 1.5}\n", "distill.ipc: Input should be a valid integer"),
    ("preset: smoke\ndistill: {alpha: 1.0}\n", "distill.alpha: Input should be less than 1"),
    ("preset: smoke\ndistill: {alpha: -0.5}\n", "distill.alpha: Input should be greater than or equal to 0"),
    ("preset: smoke\ndistill: {selection: random}\n", "distill.selection: Input should be 'depth', 'loss' or 'none'"),
    ("preset: smoke\ndistill: {gradient: tesla}\n", "distill.gradient"),
    ("preset: smoke\ndistill: {lr_img: 0}\n", "distill.lr_img: Input should be greater than 0"),
    ("preset: smoke\ndistill: {syn_steps: []}\n", "distill.syn_steps: Input should be a valid integer"),
    ("preset: smoke\ndistill: {min_start_epoch: 3, current_max_start_epoch: 2}\n", "min_start_epoch < current_max_start_epoch"),
    ("preset: smoke\nschedule: {init_ratio: 0}\n", "schedule.init_ratio: Input should be greater than 0"),
    ("preset: smoke\nschedule: {init_ratio: 1.2}\n", "schedule.init_ratio: Input should be less than or equal to 1"),
    ("preset: smoke\nschedule: {add_end_epoch: 99}\n", "schedule.add_end_epoch: 99 is beyond experts.epochs (6)"),
    ("preset: smoke\nschedule: {remove: [{after_epoch: 9, easiest_fraction: 0.1}]}\n", "never happens"),
    ("preset: smoke\nschedule: {remove: [{after_epoch: 1, easiest_fraction: 1.0}]}\n", "easiest_fraction: Input should be less than 1"),
    ("preset: smoke\nschedule: {remove: [{after_epoch: 3, easiest_fraction: 0.2}, {after_epoch: 2, easiest_fraction: 0.3}]}\n",
     "after_epoch values must be strictly increasing"),
    ("preset: smoke\nexperts: {optimizer: adam}\n", "experts.optimizer: Input should be 'sgd' or 'gsam'"),
    ("preset: smoke\nexperts: {epochs: 0}\n", "experts.epochs: Input should be greater than or equal to 1"),
    ("preset: smoke\ndata: {dataset: imagenet}\n", "data.dataset: Input should be"),
    ("preset: smoke\ndata: {val_fraction: 1}\n", "data.val_fraction: Input should be less than 1"),
    ("preset: smoke\ndata: {root: /nonexistent/data}\n", "data.root: dataset directory not found: /nonexistent/data"),
    ("preset: smoke\ndistill: {ipc: 5000}\n", "distill.ipc: 5000 is larger than the smallest class"),
    ("preset: smoke\nevaluate: {models: [resnet50]}\n", "evaluate.models.0: Input should be"),
    ("preset: smoke\ndevice: tpu\n", "device: Input should be 'auto', 'cpu' or 'cuda'"),
    ("preset: smok\n", "preset: unknown preset 'smok'; did you mean 'smoke'?"),
    ("data: {dataset: mnist}\n", "distill: required key is missing"),
    ("preset: smoke\ndistill: [unclosed\n", "YAML syntax error at line 3"),
    ("- just\n- a list\n", "expected a mapping of sections"),
    ("preset: smoke\ndifficulty: {index_file: /nonexistent/order.pt}\n", "difficulty.index_file: file not found"),
]

SWEEPS = [
    ({"space": {"ir": {"uniform": [0.5, 0.9]}}}, "space.ir: uniform is a distribution, but schedule.init_ratio selects"),
    ({"space": {"aee": {"loguniform": [1, 4]}}}, "space.aee: loguniform is a distribution"),
    ({"space": {"alpha": {"normal": [0, 1]}}}, "space.alpha.kind: Input should be"),
    ({"space": {"alpha": {"uniform": [0.1]}}}, "space.alpha: uniform takes [low, high]"),
    ({"space": {"alpha": [0.5, 1.2]}}, "distill.alpha: Input should be less than 1"),
    ({"space": {"ipc": 3}}, "space.ipc: expected a list of values"),
    ({"space": {"data.root": ["/a", "/b"]}}, "space.data.root: a sweep runs on one dataset"),
    ({"space": {}}, "space: give at least one key"),
    ({"asha": {"grace": 2}}, "asha.grace: unknown key; did you mean 'grace_period'?"),
    ({"asha": {"grace_period": 9}}, "asha.grace_period: 9 is more than the 5 evaluations"),
    ({"asha": {"reduction_factor": 1}}, "asha.reduction_factor: Input should be greater than 1"),
    ({"trial_resources": {"gpus": 1}}, "trial_resources.gpus: unknown key; did you mean 'gpu'?"),
    ({"name": "my sweep!"}, "name: String should match pattern"),
    ({"num_samples": 0}, "num_samples: Input should be greater than or equal to 1"),
    ({"base": {**SMOKE_SWEEP["base"], "distill": {"ipc": 5000}}}, "distill.ipc: 5000 is larger than the smallest class"),
    ({"base": {"preset": "smoke", "data": {"root": "/nonexistent"}}}, "data.root: dataset directory not found: /nonexistent"),
    ({"storage_path": "/etc/hostname/sweeps"}, "storage_path: cannot write under /etc/hostname/sweeps"),
    ({"mlflow": {"tracking_uri": "http://127.0.0.1:9/"}}, "mlflow.tracking_uri: cannot reach http://127.0.0.1:9/"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch, mnist_root):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAD_RAY_DATA", str(mnist_root))
    monkeypatch.setenv("PAD_RAY_HOME", str(tmp_path / "home"))
    return tmp_path


def _one_line_error(capsys, path: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0]  # the file is named
    return lines[0]


def _nothing_written(workdir: Path, path: Path) -> None:
    assert sorted(p.name for p in workdir.iterdir()) == [path.name]


@pytest.mark.parametrize(("text", "expected"), RUN_CONFIGS, ids=range(len(RUN_CONFIGS)))
def test_bad_run_config(workdir, capsys, mnist_root, text, expected):
    path = workdir / "run.yaml"
    path.write_text(text)
    overrides = ["--set", f"output_dir={workdir}/runs", "--set", f"store_dir={workdir}/store"]
    if "data:" not in text:
        overrides += ["--set", f"data.root={mnist_root}"]
    assert cli.main(["run", str(path), *overrides]) == 2
    assert expected in _one_line_error(capsys, path)
    _nothing_written(workdir, path)


@pytest.mark.parametrize(("change", "expected"), SWEEPS, ids=range(len(SWEEPS)))
def test_bad_sweep(workdir, capsys, change, expected):
    raw = {**SMOKE_SWEEP, **change}
    path = workdir / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert sweep.main([str(path)]) == 2
    assert expected in _one_line_error(capsys, path)
    assert not (workdir / "home").exists()


def test_corpus_size():
    assert len(RUN_CONFIGS) + len(SWEEPS) >= 30
