"""A corpus of malformed run configs and sweep files, and of user-named files that are not what their
key says (binary bytes, a truncated file, a folder): each stops with exit code 2 and one line that
names the file and the key, without a traceback and without writing anything."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import SHARED_DATA
from pad_ray import cli, local_stages, sweep
from pad_ray.evaluate import SyntheticSet

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


def _nothing_written(workdir: Path, path: Path, *inputs: str) -> None:
    assert sorted(p.name for p in workdir.iterdir()) == sorted([path.name, *inputs])


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


# -- files that are not text, or not whole ------------------------------------------------------------

SMOKE_TEXT = (REPO / "configs" / "smoke.yaml").read_bytes()
ALL_BYTES = bytes(range(256)) * 4  # ASCII (NUL included) up to 0x7f, then 0x80: never UTF-8

# What a config path may hold by mistake -> the start of what the one line says.
NOT_CONFIG_TEXT = [
    (ALL_BYTES, "not a YAML text file (byte 0x80 at offset 128 is not UTF-8)"),
    (gzip.compress(SMOKE_TEXT, mtime=0), "not a YAML text file (byte 0x8b at offset 1 is not UTF-8)"),
    (SMOKE_TEXT.decode().encode("utf-16"), "not a YAML text file (byte 0xff at offset 0 is not UTF-8)"),
    ("preset: smoke\n# café".encode()[:-1], "not a YAML text file (byte 0xc3 at offset 19 is not UTF-8)"),  # cut mid-character
    (b"preset: smoke\n\x00\x01\x02\x03", "not a YAML text file (character #x0000 at offset 14)"),
    (None, "cannot read config (Is a directory)"),  # a folder where the file should be
]


def _plant(path: Path, content: bytes | None) -> Path:
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(("content", "expected"), NOT_CONFIG_TEXT, ids=range(len(NOT_CONFIG_TEXT)))
def test_run_config_that_is_not_text(workdir, capsys, content, expected):
    path = _plant(workdir / "run.yaml", content)
    assert cli.main(["run", str(path), "--set", f"output_dir={workdir}/runs", "--set",
                     f"store_dir={workdir}/store"]) == 2
    assert _one_line_error(capsys, path).startswith(f"pad-ray: error: {path}: {expected}")
    _nothing_written(workdir, path)


@pytest.mark.parametrize(("content", "expected"), NOT_CONFIG_TEXT, ids=range(len(NOT_CONFIG_TEXT)))
def test_sweep_file_that_is_not_text(workdir, capsys, content, expected):
    path = _plant(workdir / "sweep.yaml", content)
    assert sweep.main([str(path)]) == 2
    assert _one_line_error(capsys, path).startswith(f"pad_ray.sweep: error: {path}: {expected}")
    _nothing_written(workdir, path)


def _truncated(write) -> bytes:
    """A file as `write(path)` makes it, cut short (an interrupted copy)."""
    tmp = Path(os.environ["PYTEST_BAD_INPUT_TMP"]) / "whole.npy"  # np.save would add the suffix
    write(tmp)
    return tmp.read_bytes()[:-40]


INDEX_TABLE = np.arange(60000, dtype=np.int64)[np.argsort(np.arange(60000) % 10, kind="stable")].reshape(10, 6000)
NOT_INDEX_FILES = [  # name, content -> what the line says after "difficulty.index_file: "
    ("order.npy", ALL_BYTES, "cannot read {path} as an integer tensor"),
    ("order.pt", ALL_BYTES, "cannot read {path} as an integer tensor"),
    ("order.npy", lambda: _truncated(lambda p: np.save(p, INDEX_TABLE)), "cannot read {path} as an integer tensor"),
    ("order.pt", lambda: _truncated(lambda p: torch.save(torch.from_numpy(INDEX_TABLE), p)),
     "cannot read {path} as an integer tensor"),
    ("order.npy", None, "file not found: {path}"),
    ("order.npy", lambda: _npy(INDEX_TABLE[:3]), "{path} must be an integer [10, n] tensor, got (3, 6000)"),
    ("order.npy", lambda: _npy(INDEX_TABLE.astype(np.float32)), "{path} must be an integer [10, n] tensor"),
]


def _npy(array: np.ndarray) -> bytes:
    tmp = Path(os.environ["PYTEST_BAD_INPUT_TMP"]) / "array.npy"
    np.save(tmp, array)
    return tmp.read_bytes()


@pytest.fixture
def inputs(workdir, tmp_path_factory, monkeypatch):
    """A folder beside the config for the user-named files; scratch space outside the workdir."""
    monkeypatch.setenv("PYTEST_BAD_INPUT_TMP", str(tmp_path_factory.mktemp("scratch")))
    folder = workdir / "inputs"
    folder.mkdir()
    return folder


def _run_config(workdir: Path, mnist_root: Path, extra: str = "") -> Path:
    path = workdir / "run.yaml"
    path.write_text(f"preset: smoke\ndata: {{root: {mnist_root}}}\noutput_dir: {workdir}/runs\n"
                    f"store_dir: {workdir}/store\n{extra}")
    return path


@pytest.mark.parametrize(("name", "content", "expected"), NOT_INDEX_FILES, ids=range(len(NOT_INDEX_FILES)))
def test_index_file_that_is_not_an_index(workdir, inputs, capsys, mnist_root, name, content, expected):
    index = _plant(inputs / name, content() if callable(content) else content)
    path = _run_config(workdir, mnist_root, f"difficulty: {{index_file: {index}}}\n")
    assert cli.main(["run", str(path)]) == 2
    line = _one_line_error(capsys, path)
    assert line.startswith(f"pad-ray: error: {path}: difficulty.index_file: {expected.format(path=index)}"), line
    _nothing_written(workdir, path, "inputs")


def test_sweep_with_an_index_file_that_is_not_an_index_stops_before_any_work(workdir, inputs, capsys):
    index = _plant(inputs / "order.npy", ALL_BYTES)
    path = workdir / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SMOKE_SWEEP, "base": {**SMOKE_SWEEP["base"], "difficulty": {"index_file": str(index)}}}))
    assert sweep.main([str(path)]) == 2
    assert f"difficulty.index_file: cannot read {index} as an integer tensor" in _one_line_error(capsys, path)
    _nothing_written(workdir, path, "inputs")


def _synthetic(images: torch.Tensor, classes: int) -> bytes:
    """A distilled set as pad_ray writes it, returned as the bytes of the .npz (its sidecar is planted too)."""
    tmp = Path(os.environ["PYTEST_BAD_INPUT_TMP"]) / "set.npz"
    local_stages.save_synthetic(tmp, SyntheticSet(images, torch.randn(len(images), classes), 0.01))
    return tmp.read_bytes()


NOT_DISTILLED_SETS = [  # npz bytes, sidecar bytes ("same": the one written with it) -> the line after "error: "
    (ALL_BYTES, None, "{sidecar}: missing (needed to verify set.npz)"),
    (lambda: _synthetic(torch.randn(10, 1, 28, 28), 10), ALL_BYTES, "{sidecar}: not a checksum file"),
    (lambda: _synthetic(torch.randn(10, 1, 28, 28), 10), b'{"sha256": ', "{sidecar}: not a checksum file"),
    (lambda: _synthetic(torch.randn(10, 1, 28, 28), 10)[:-64], "same", "{path}: checksum mismatch"),
    (None, None, "{path}: is a directory"),
    (lambda: _synthetic(torch.randn(4, 3, 32, 32), 10), "same",
     "{path}: a distilled set of [3, 32, 32] images with labels [4, 10], but mnist has [1, 28, 28] images"),
    (lambda: _synthetic(torch.randn(4, 1, 28, 28), 100), "same", "{path}: a distilled set of [1, 28, 28] images "
     "with labels [4, 100], but mnist has [1, 28, 28] images and 10 classes"),
]


@pytest.mark.parametrize(("content", "sidecar", "expected"), NOT_DISTILLED_SETS, ids=range(len(NOT_DISTILLED_SETS)))
def test_evaluate_synthetic_that_is_not_a_distilled_set(workdir, inputs, capsys, mnist_root, content, sidecar,
                                                         expected):
    content = content() if callable(content) else content
    if sidecar == "same":
        sidecar = (Path(os.environ["PYTEST_BAD_INPUT_TMP"]) / "set.json").read_bytes()
    target = _plant(inputs / "set.npz", content)
    if sidecar is not None:
        _plant(inputs / "set.json", sidecar)
    path = _run_config(workdir, mnist_root)
    assert cli.main(["evaluate", str(path), "--synthetic", str(target)]) == 2
    line = _one_line_error(capsys, target.with_suffix(".json") if "{sidecar}" in expected else target)
    assert line.startswith(f"pad-ray: error: {expected.format(path=target, sidecar=inputs / 'set.json')}"), line
    _nothing_written(workdir, path, "inputs")


def _mnist_copy(root: Path, change: dict[str, bytes | None]) -> Path:
    """The real MNIST idx files (linked) with some replaced: bytes, or None for a folder in their place."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in sorted((SHARED_DATA / "MNIST" / "raw").glob("*-ubyte")):
        if source.name in change:
            _plant(raw / source.name, change[source.name])
        else:
            (raw / source.name).symlink_to(source)
    return root


def _real(name: str) -> bytes:
    return (SHARED_DATA / "MNIST" / "raw" / name).read_bytes()


NOT_DATA_ROOTS = [  # root builder -> what the line says after "data.root: "
    (lambda root: _plant(root, ALL_BYTES), "dataset directory not found: {root}"),
    (lambda root: _mnist_copy(root, {"train-images-idx3-ubyte": ALL_BYTES}), "malformed MNIST idx files"),
    (lambda root: _mnist_copy(root, {"train-labels-idx1-ubyte": _real("train-labels-idx1-ubyte")[:-100]}),
     "malformed MNIST idx files"),
    (lambda root: _mnist_copy(root, {"t10k-images-idx3-ubyte": _real("t10k-images-idx3-ubyte")[:-1]}),
     "malformed MNIST idx files"),
    (lambda root: _mnist_copy(root, {"t10k-labels-idx1-ubyte": None}), "dataset file not found: {root}/MNIST/raw/t10k"),
]


@pytest.mark.parametrize(("build", "expected"), NOT_DATA_ROOTS, ids=range(len(NOT_DATA_ROOTS)))
def test_data_root_that_is_not_a_dataset(workdir, inputs, capsys, build, expected):
    root = inputs / "data"
    build(root)
    path = _run_config(workdir, root)
    assert cli.main(["run", str(path)]) == 2
    line = _one_line_error(capsys, path)
    assert line.startswith(f"pad-ray: error: {path}: data.root: {expected.format(root=root)}"), line
    _nothing_written(workdir, path, "inputs")


def test_corpus_size():
    assert len(RUN_CONFIGS) + len(SWEEPS) >= 30
