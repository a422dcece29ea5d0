"""The `pad-ray` command: bad input stops cleanly; the whole PAD pipeline runs on the real MNIST."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pad_ray import cli, files, local_stages
from pad_ray.config import PRESETS, load_config, preset_header

REPO = Path(__file__).resolve().parents[1]


def pad_ray(*args, cwd):
    # The limit only stops a hang: a whole run takes minutes here and several times that on a loaded machine.
    return subprocess.run([sys.executable, "-m", "pad_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1800)


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


class RayStarted(Exception):
    pass


def test_stages_start_ray_only_for_what_the_store_lacks(tmp_path, mnist_root, monkeypatch):
    """With Ray workers configured, a stage starts Ray for the scores or experts its store lacks, and not at
    all once the store has them: a rerun of `pad-ray distill` pays no local Ray's start."""
    from pad_ray import ray_stages
    from pad_ray.config import with_absolute_paths

    from conftest import tiny_config

    def refuse():
        raise RayStarted

    monkeypatch.setattr(ray_stages, "init_ray", refuse)
    data = {"root": str(mnist_root), "train_per_class": 10, "test_size": 50}
    on_ray = with_absolute_paths(tiny_config(tmp_path, data=data, resources={"workers": 2}))
    local = on_ray.model_copy(update={"resources": on_ray.resources.model_copy(update={"workers": 0})})
    out = tmp_path / "run"
    for stage in ("scores", "distill"):
        with pytest.raises(RayStarted):
            cli.run_stage(stage, on_ray, out)
    assert cli.run_stage("scores", local, out)["samples"] > 0
    assert cli.run_stage("scores", on_ray, out)["samples"] > 0  # scores stored: no Ray
    with pytest.raises(RayStarted):  # experts still missing
        cli.run_stage("distill", on_ray, out)
    assert cli.run_stage("experts", local, out)["experts"] == on_ray.experts.num_experts
    result = cli.run_stage("distill", on_ray, out)
    assert result["iterations"] == on_ray.distill.iterations and (out / "synthetic_best.npz").is_file()


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


def test_presets_lists_every_preset_with_its_header(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name in PRESETS:
        line = next(line for line in out if line.split()[:1] == [name])
        assert preset_header(name) in line and preset_header(name)
    assert any("preset: NAME" in line for line in out)


def test_validate_reports_every_error_of_a_run_config(tmp_path, capsys):
    config = _write(tmp_path, "preset: smoke\ndistill: {alpah: 0.2, ipc: 0}\nexperts: {optimizer: adam}\n"
                              "schedule: {init_ratio: 1.5}\n")
    assert cli.main(["validate", str(config)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    expected = ["distill.alpah: unknown key; did you mean 'alpha'?", "distill.ipc: Input should be greater",
                "experts.optimizer: Input should be 'sgd' or 'gsam'", "schedule.init_ratio: Input should be less"]
    assert len(lines) == len(expected)
    for want in expected:
        assert sum(line.startswith(f"{config}: {want}") for line in lines) == 1, (want, lines)


def test_validate_reports_every_error_of_a_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nbase: {preset: smoke, distill: {iterations: 4, eval_every: 2}}\n"
                     "space: {alpha: [0.1, 1.5], ir: {uniform: [0.5, 0.9]}, aee: 3}\nasha: {grace_period: 1}\n")
    assert cli.main(["validate", str(sweep)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{sweep}: ") for line in lines)
    assert lines[0].startswith(f"{sweep}: space.aee: expected a list")
    assert lines[1].startswith(f"{sweep}: space.ir: uniform is a distribution")
    assert lines[2].startswith(f"{sweep}: trial {{'alpha': 1.5, 'ir': 0.5}}: distill.alpha: Input should be less")


def test_validate_says_ok_in_one_line(capsys):
    for path in (REPO / "configs" / "smoke.yaml", REPO / "sweeps" / "smoke.yaml"):
        assert cli.main(["validate", str(path)]) == 0
        out = capsys.readouterr().out.strip()
        assert out.startswith(f"{path}: OK") and "\n" not in out


def test_a_run_with_several_errors_shows_the_first_and_points_to_validate(tmp_path):
    config = _write(tmp_path, "preset: smoke\ndistill: {alpah: 0.2, ipc: 0}\n")
    result = pad_ray("run", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"pad-ray: error: {config}: distill.alpah: unknown key; did you mean 'alpha'? "
                                     f"(and 1 more: pad-ray validate {config} lists them all)")


def test_sweep_command_rejects_a_bad_sweep_like_the_sweep_module(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    text = (REPO / "sweeps" / "smoke.yaml").read_text()
    sweep.write_text(text.replace("alpha: [0.0, 0.1, 0.2, 0.3]", "alpha: [7]"))
    assert cli.main(["sweep", str(sweep), "--set", f"storage_path={tmp_path}/sweeps"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"pad-ray: error: {sweep}: trial {{'alpha': 7, 'ir': 0.5}}: "
                   "distill.alpha: Input should be less than 1 (got 7)")
    assert not (tmp_path / "sweeps").exists()


def test_commands_that_only_read_configs_import_no_torch_or_ray(tmp_path):
    probe = ("import sys; from pad_ray import cli; cli.main(sys.argv[1:]); "
             "print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))")
    for args in (["presets"], ["validate", str(REPO / "sweeps" / "smoke.yaml")]):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


# A small end-to-end run (about as long as the CPU preset of the first release): IPC 1, where a few
# dozen iterations already move the set well beyond both of its controls.
SMALL_RUN = """preset: smoke
data: {{root: {root}, train_per_class: 300, test_size: 2000}}
output_dir: {out}/runs
store_dir: {out}/store
experts: {{num_experts: 4, epochs: 8}}
schedule: {{add_end_epoch: 2, remove: [{{after_epoch: 6, easiest_fraction: 0.1}}]}}
distill: {{iterations: 60, eval_every: 30, max_start_epoch: 6, syn_steps: 10}}
evaluate: {{num_nets: 3, epochs: 200}}
resources: {{workers: 0}}
"""


def _store_files(store) -> dict[str, tuple[int, str]]:
    """Every file in a store: (mtime in ns, sha256), by path within it."""
    return {str(p.relative_to(store)): (p.stat().st_mtime_ns, files.sha256(p))
            for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_pad_on_real_mnist_beats_random_subsets_and_its_own_starting_set(tmp_path, mnist_root):
    """EL2N scores, scheduled experts, PAD distillation at IPC 1 and evaluation, end to end on CPU,
    against two controls under the same evaluation: random real subsets and the starting set. In one
    process (`resources.workers: 0`), which costs a third less CPU than Ray Train's controller and workers:
    the same stages on Ray are the smoke job's (test_smoke_sweep) and test_ray_stages' to check."""
    config = _write(tmp_path, SMALL_RUN.format(root=mnist_root, out=tmp_path))
    result = pad_ray("run", str(config), "--controls", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    distilled = summary["evaluation"]["convnet"]
    assert summary["iterations"] == 60 and summary["skipped"] < summary["iterations"]
    assert "test accuracy" in result.stderr  # the experts' quality line

    # The run's controls (scored as a sweep scores its top trials', which test_smoke_sweep recomputes): 3 random
    # real subsets and the starting set, under the same evaluation. The margin must exceed the spread of the
    # evaluation nets, or the comparison says nothing.
    cfg = load_config(config)
    start, random = summary["controls"]["start"], summary["controls"]["random"]
    assert (start["sets"], random["sets"]) == (1, 3)
    spread = max(distilled["test_std"], start["test_std"])
    assert distilled["test_mean"] > start["test_mean"] + spread, (distilled, start)
    assert distilled["test_mean"] > random["test_mean"] + spread, (distilled, random)
    assert random["lead"] == pytest.approx(distilled["test_mean"] - random["test_mean"])

    # Artefacts: the results, the grid, the best set verified by checksum, and a rerun that trains nothing new.
    run_dir = tmp_path / summary["run_dir"]
    assert json.loads((run_dir / "results.json").read_text()) == summary
    assert (run_dir / "synthetic.png").stat().st_size > 0
    best = local_stages.load_synthetic(run_dir / "synthetic_best.npz")
    assert best.images.shape == (10, 1, 28, 28) and best.labels.shape == (10, 10)
    store = tmp_path / "store"
    stored = _store_files(store)
    assert len([p for p in stored if p.startswith("experts/") and p.endswith(".npy")]) == cfg.experts.num_experts
    assert [p for p in stored if p.startswith("difficulty/") and p.endswith(".npz")]
    again = pad_ray("experts", str(config), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["accuracy"]["test_accuracy"] > 0.5
    assert _store_files(store) == stored  # nothing trained, rewritten or added: same mtimes and checksums


def test_data_command_names_the_datasets_it_can_fetch(tmp_path):
    result = pad_ray("data", "imagenet", "--root", str(tmp_path / "data"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "unknown dataset 'imagenet'" in line and "fashionmnist" in line and "svhn" in line
    assert not (tmp_path / "data").exists()
