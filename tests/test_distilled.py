"""The distilled set as a product: the safetensors file, `load_distilled`, and `pad-ray export`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config, write_malicious_pickle
from pad_ray import data as datasets, files, local_stages
from pad_ray.distilled import FILE_NAME, class_folders, export, load_distilled, save_distilled
from pad_ray.evaluate import SyntheticSet
from pad_ray.progress import addresses
from pad_ray.tracking import ui_link


def _mnist_small(mnist_root, zca: bool):
    return datasets.prepare("mnist", mnist_root, val_fraction=0.1, zca=zca, seed=0, train_per_class=20, test_size=50)


@pytest.fixture(scope="module", params=[False, True], ids=["normalize", "zca"])
def mnist_small(request, mnist_root):
    """A small real MNIST split, normalised or ZCA-whitened as pad_ray prepares it."""
    return _mnist_small(mnist_root, request.param)


@pytest.fixture(scope="module")
def mnist_normalized(mnist_root):
    """The same split, normalised only: for tests whose outcome cannot depend on the preprocessing."""
    return _mnist_small(mnist_root, False)


def _distilled_from(data, tmp_path, soft=True, ipc=2, provenance=None):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(data.num_classes * ipc, data.channels, data.image_size, data.image_size, generator=gen)
    labels = torch.randn(len(images), data.num_classes, generator=gen) if soft else \
        torch.arange(data.num_classes).repeat_interleave(ipc)
    synthetic = SyntheticSet(images, labels, 0.0123)
    path = tmp_path / FILE_NAME
    cfg = tiny_config(tmp_path)
    save_distilled(path, synthetic, data, cfg, provenance or {"sweep": "s", "trial_id": "t1"})
    return path, synthetic, cfg


def test_the_file_holds_both_spaces_labels_lr_and_where_it_came_from(mnist_small, tmp_path):
    data = mnist_small
    path, synthetic, cfg = _distilled_from(data, tmp_path)
    loaded = load_distilled(path)
    assert torch.equal(loaded.images, synthetic.images)
    assert torch.equal(loaded.soft_labels, synthetic.labels)
    assert loaded.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert loaded.lr == pytest.approx(0.0123)
    assert loaded.class_names == data.class_names and loaded.config == json.loads(json.dumps(
        cfg.model_dump(mode="json")))
    assert loaded.provenance["sweep"] == "s" and loaded.provenance["trial_id"] == "t1"
    assert loaded.provenance["dataset"] == "mnist" and loaded.provenance["pad_ray_version"]
    repo_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(local_stages.__file__).parent,
                                 capture_output=True, text=True).stdout.strip()
    assert loaded.provenance["git_commit"] == repo_commit
    # Pixels are the preprocessing undone (unclamped), and preprocessing them gives the images back.
    torch.testing.assert_close(loaded.preprocessing(loaded.pixels), loaded.images, atol=2e-4, rtol=0)
    assert loaded.preprocessing.kind == ("zca" if data.zca is not None else "normalize")


def test_its_transform_preprocesses_real_images_exactly_as_pad_ray_did(mnist_small, tmp_path, mnist_root):
    data = mnist_small
    path, _, _ = _distilled_from(data, tmp_path)
    _, _, test_x, _, _ = datasets.load_raw("mnist", mnist_root)
    raw_test = test_x[data.test.index]  # the same real images, in [0, 1]
    distilled = load_distilled(path)
    assert torch.equal(distilled.transform(raw_test), data.test.images)
    # One image, as a torchvision transform gets it (a matrix-vector product: rounding may differ).
    torch.testing.assert_close(distilled.transform(raw_test[3]), data.test.images[3], atol=1e-5, rtol=0)
    pixels = load_distilled(path, space="pixels")
    assert torch.equal(pixels.transform(raw_test), raw_test)
    image, target = pixels[5]
    assert torch.equal(image, distilled.pixels[5]) and torch.equal(target, distilled.soft_labels[5])
    image, target = load_distilled(path, soft=False)[5]
    assert torch.equal(image, distilled.images[5]) and int(target) == 2 and len(distilled) == 20


def test_hard_label_sets_keep_their_labels(mnist_small, tmp_path):
    path, synthetic, _ = _distilled_from(mnist_small, tmp_path, soft=False)
    loaded = load_distilled(path)
    assert loaded.soft_labels is None and torch.equal(loaded.labels, synthetic.labels)
    assert torch.equal(loaded.synthetic().labels, synthetic.labels) and int(loaded[7][1]) == 3


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_altered_truncated_or_foreign_files_are_refused_in_one_line(mnist_small, tmp_path):
    path, _, _ = _distilled_from(mnist_small, tmp_path)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    cases = {}
    for name, damage in {
        "pixel": lambda p: _flip(p, header + 100),
        "provenance": lambda p: p.write_bytes(p.read_bytes().replace(b'\\"sweep\\": \\"s\\"', b'\\"sweep\\": \\"x\\"')),
        "truncated": lambda p: p.write_bytes(p.read_bytes()[:-10]),
    }.items():
        copy = tmp_path / f"{name}.safetensors"
        copy.write_bytes(path.read_bytes())
        damage(copy)
        assert copy.read_bytes() != path.read_bytes()
        cases[copy] = "checksum mismatch"
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    cases[tmp_path / "short.safetensors"] = "not a safetensors file"
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file
    save_file({"images": torch.zeros(2, 1, 28, 28)}, str(foreign))
    cases[foreign] = "not a pad_ray distilled set"
    old = tmp_path / "synthetic_best.npz"
    local_stages.save_synthetic(old, SyntheticSet(torch.zeros(10, 1, 28, 28), torch.zeros(10, 10), 0.01))
    cases[old] = "an older pad_ray"
    for target, expected in cases.items():
        with pytest.raises(files.IntegrityError) as caught:
            load_distilled(target)
        message = str(caught.value)
        assert expected in message and str(target) in message and "\n" not in message, message


def test_a_pickle_posing_as_a_distilled_set_never_runs(tmp_path):
    path = tmp_path / FILE_NAME
    write_malicious_pickle(path, tmp_path / "pwned", fmt="torch.save")
    with pytest.raises(files.IntegrityError, match="not a"):
        load_distilled(path)
    assert not (tmp_path / "pwned").exists()


def test_a_source_can_be_a_run_folder_a_trial_folder_or_an_mlflow_artifact(mnist_small, tmp_path):
    from mlflow.tracking import MlflowClient

    path, _, _ = _distilled_from(mnist_small, tmp_path)
    trial = tmp_path / "trial"
    for k, lr in ((1, 0.5), (2, 0.25)):  # Tune's checkpoints, numbered in order: the latest is the best
        (trial / f"checkpoint_00000{k}").mkdir(parents=True)
        save_distilled(trial / f"checkpoint_00000{k}" / FILE_NAME,
                       SyntheticSet(torch.zeros(10, 1, 28, 28), torch.zeros(10, 10), lr), mnist_small,
                       tiny_config(), {})
    assert load_distilled(tmp_path).lr == pytest.approx(0.0123)
    assert load_distilled(trial).lr == 0.25

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(path))
    loaded = load_distilled(f"runs:/{run_id}/{FILE_NAME}", tracking_uri=uri)
    assert loaded.lr == pytest.approx(0.0123) and loaded.provenance["mlflow_run_id"] == run_id
    with pytest.raises(files.IntegrityError, match="cannot download"):
        load_distilled(f"runs:/{run_id}/absent.safetensors", tracking_uri=uri)


def test_a_sweep_folder_gives_its_best_trial_and_asks_which_ipc_when_it_has_several(mnist_small, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    sets = {}
    for name, lr in (("best", 0.5), ("second", 0.25)):
        sets[name] = tmp_path / name / FILE_NAME
        sets[name].parent.mkdir()
        save_distilled(sets[name], SyntheticSet(torch.zeros(10, 1, 28, 28), torch.zeros(10, 10), lr), mnist_small,
                       tiny_config(), {})
    header = "trial_id,ipc,best_val_accuracy,distilled_set_uri\n"
    # results.csv ranks by validation within IPC; a trial that errored has no set.
    (sweep / "results.csv").write_text(header + f"t0,1,0.9,\nt1,1,0.8,{sets['best']}\nt2,1,0.7,{sets['second']}\n")
    assert load_distilled(sweep).lr == 0.5
    (sweep / "results.csv").write_text(header + f"t1,1,0.8,{sets['best']}\nt2,10,0.9,{sets['second']}\n")
    with pytest.raises(files.IntegrityError, match=r"a best set per IPC \(1, 10\); pass the distilled_set_uri"):
        load_distilled(sweep)


def test_imagefolder_export_is_what_torchvision_reads(mnist_small, tmp_path):
    from torchvision.datasets import ImageFolder

    path, synthetic, _ = _distilled_from(mnist_small, tmp_path)
    out = export(str(path), "imagefolder", tmp_path / "export")
    folder = ImageFolder(str(out))
    assert folder.classes == class_folders(mnist_small.class_names)
    assert [label for _, label in folder.samples] == [c for c in range(10) for _ in range(2)]
    sidecar = json.loads((out / "distilled.json").read_text())
    assert sidecar["lr"] == pytest.approx(0.0123) and len(sidecar["images"]) == 20
    pixels = load_distilled(path).pixels
    for k, entry in enumerate(sidecar["images"]):
        png = np.asarray(Image.open(out / entry["file"]))
        assert np.array_equal(png, (pixels[k, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        assert entry["soft_label"] == pytest.approx(synthetic.labels[k].tolist())
        assert folder.class_to_idx[entry["file"].split("/")[0]] == entry["label"]


def test_safetensors_export_keeps_everything(mnist_small, tmp_path):
    path, _, _ = _distilled_from(mnist_small, tmp_path)
    out = export(str(path), "safetensors", tmp_path / "export")
    again, first = load_distilled(out / "distilled.safetensors"), load_distilled(path)
    for name, tensor in first.tensors().items():
        assert torch.equal(again.tensors()[name], tensor), name
    assert again.provenance == first.provenance and again.class_names == first.class_names


def _cli(*args):
    # Generous: a whole `pad-ray run` takes minutes on a loaded 2-core machine; the limit only stops a hang.
    return subprocess.run([sys.executable, "-m", "pad_ray.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=1500)


def test_bad_export_input_is_one_line_exit_2_and_writes_nothing(mnist_normalized, tmp_path):
    # Each case is refused before the set's pixels are read, so one preprocessing is enough.
    path, _, _ = _distilled_from(mnist_normalized, tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    full = tmp_path / "full"
    (full / "keep").mkdir(parents=True)
    out = tmp_path / "out" / "export"
    cases = [
        ((tmp_path / "absent.safetensors", "--out", out), "absent.safetensors: no such file or folder"),
        ((blocker, "--out", out), f"{blocker}: not a safetensors file"),
        ((path, "--format", "zip", "--out", out), "--format: 'zip' is not a format; allowed: safetensors, imagefolder"),
        ((path, "--out", blocker / "export"), f"--out: cannot write under {blocker}/export"),
        ((path, "--out", full), f"--out: {full} exists and is not an empty folder"),
    ]
    for args, expected in cases:
        result = _cli("export", *args)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("pad-ray: error: ") and expected in line, line
    assert not (tmp_path / "out").exists() and os.listdir(full) == ["keep"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_bad_format_or_folder_is_refused_before_torch_is_imported(tmp_path):
    # The checks that need no set run first, so a mistyped command answers without torch's seconds of import.
    full = tmp_path / "full"
    (full / "keep").mkdir(parents=True)
    code = ("import sys\nfrom pad_ray.cli import main\n"
            f"codes = [main(['export', 'x.safetensors', '--format', 'zip', '--out', {str(tmp_path / 'out')!r}]),\n"
            f"         main(['export', 'x.safetensors', '--out', {str(full)!r}])]\n"
            "print(codes, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[2, 2] False", result.stderr
    assert len(result.stderr.strip().splitlines()) == 2 and not (tmp_path / "out").exists()


def test_a_failed_export_leaves_no_half_written_folder(mnist_small, tmp_path, monkeypatch):
    from pad_ray import distilled

    path, _, _ = _distilled_from(mnist_small, tmp_path)

    def fail_midway(distilled_set, folder):
        (folder / "0_zero").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(distilled, "_write_image_folder", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        export(str(path), "imagefolder", tmp_path / "export")
    assert os.listdir(tmp_path) == [FILE_NAME]  # neither the export nor its staging folder


# -- the product, end to end on the real MNIST -------------------------------------------------------

# The smoke preset cut down further (one expert, four iterations): what is tested here is the product,
# not the quality of the distillation, and these two tests must stay short on a shared 2-core machine.
TINY_RUN = """preset: smoke
data: {{root: {root}, train_per_class: 50, test_size: 500}}
output_dir: {out}/runs
store_dir: {out}/store
resources: {{workers: 0}}
difficulty: {{seeds: 1, epochs: 1}}
experts: {{num_experts: 1, epochs: 4}}
schedule: {{remove: []}}
distill: {{iterations: 4, eval_every: 2, max_start_epoch: 2, syn_steps: 5}}
evaluate: {{num_nets: 1, epochs: 100}}
"""


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, mnist_root):
    """`pad-ray run` of the smoke preset, in this process's own folder: (config, run folder, its results)."""
    where = tmp_path_factory.mktemp("smoke_run")
    config = where / "run.yaml"
    config.write_text(TINY_RUN.format(root=mnist_root, out=where))
    result = _cli("run", config)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    return config, Path(summary["run_dir"]), summary


def test_export_load_and_evaluate_give_the_accuracy_the_run_reported(smoke_run, tmp_path):
    config, run_dir, summary = smoke_run
    assert (run_dir / FILE_NAME).is_file()
    exported = tmp_path / "export"
    result = _cli("export", run_dir, "--format", "safetensors", "--out", exported)
    assert result.returncode == 0, result.stderr
    distilled = load_distilled(exported / "distilled.safetensors")
    assert distilled.provenance["best_iteration"] == summary["best_iteration"]
    assert distilled.provenance["best_val_accuracy"] == summary["best_val_accuracy"]
    again = _cli("evaluate", config, "--synthetic", exported / "distilled.safetensors")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout) == summary["evaluation"]  # same seeds: the same nets, the same accuracy
    # Any SOURCE that export takes: here the run folder, whose distilled_best.safetensors it finds.
    by_folder = _cli("evaluate", config, "--synthetic", run_dir)
    assert by_folder.returncode == 0, by_folder.stderr[-2000:]
    assert json.loads(by_folder.stdout) == summary["evaluation"]
    # Under another preprocessing (ZCA instead of the normalisation) it is refused rather than measured wrongly.
    other = _cli("evaluate", config, "--synthetic", exported / "distilled.safetensors", "--set", "data.zca=true")
    assert other.returncode == 2 and "made under another preprocessing" in other.stderr


def test_a_sweep_starts_by_saying_where_to_watch_it():
    local = addresses(ui_link("sqlite:////runs/mlflow.db", "1"), "127.0.0.1:8265").splitlines()
    assert local == ["MLflow: mlflow ui --backend-store-uri sqlite:////runs/mlflow.db, then "
                     "http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning",
                     "Ray dashboard: http://127.0.0.1:8265"]
    served = addresses(ui_link("http://mlflow:5000", "7"), None).splitlines()
    assert served[0] == "MLflow: http://mlflow:5000/#/experiments/7?workflowType=machine_learning"
    assert "not running" in served[1]
