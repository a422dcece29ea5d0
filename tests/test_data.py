"""Tests for pad_ray.data: loaders on files in the real on-disk formats, splits, ZCA, prepare."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.mnist
from PIL import Image
from scipy.io import savemat
from torchvision.datasets import KMNIST, MNIST, SVHN, FashionMNIST

from pad_ray.data import (
    DATASETS,
    ZCA,
    DataError,
    class_balanced_split,
    download,
    load_raw,
    per_class_subset,
    prepare,
)

MNIST_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- CIFAR binary files -----------------------------------------------------------------------


def _cifar_records(labels: list[list[int]], rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """Records of label bytes followed by random pixels; returns the file bytes and the pixels."""
    pixels = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    header = np.array(labels, dtype=np.uint8)
    return np.concatenate([header, pixels], axis=1).tobytes(), pixels


def _write_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int]]:
    """Writes cifar-10-batches-bin with 5 data batches and a test batch; returns train pixels and labels."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    all_pixels, all_labels = [], []
    for batch in range(1, 6):
        labels = [(batch * per_batch + i) % 10 for i in range(per_batch)]
        data, pixels = _cifar_records([[label] for label in labels], rng)
        (folder / f"data_batch_{batch}.bin").write_bytes(data)
        all_pixels.append(pixels)
        all_labels += labels
    data, _ = _cifar_records([[7], [2]], rng)
    (folder / "test_batch.bin").write_bytes(data)
    names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n"
    (folder / "batches.meta.txt").write_text(names)
    return np.concatenate(all_pixels), all_labels


def test_cifar10_binary_layout(tmp_path: Path) -> None:
    train_pixels, train_labels = _write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-bin"
    # One record whose only non-zero byte is blue at row 5, column 7: a plane-major layout must
    # put it at [1, 2, 5, 7] and nowhere else.
    single = np.zeros((2, 3073), dtype=np.uint8)
    single[:, 0] = [4, 9]
    single[1, 1 + 2 * 1024 + 5 * 32 + 7] = 200
    (folder / "test_batch.bin").write_bytes(single.tobytes())

    train_x, train_y, test_x, test_y, names = load_raw("cifar10", tmp_path)

    assert train_x.shape == (15, 3, 32, 32) and train_x.dtype == torch.float32
    assert train_y.dtype == torch.int64 and train_y.tolist() == train_labels
    expected = torch.from_numpy(train_pixels.astype(np.float32) / 255).view(15, 3, 32, 32)
    assert torch.equal(train_x, expected)
    assert train_x[4, 1, 31, 0] == train_pixels[4, 1024 + 31 * 32] / 255
    assert test_y.tolist() == [4, 9]
    assert test_x[1, 2, 5, 7] == pytest.approx(200 / 255)
    assert test_x.sum() == pytest.approx(200 / 255)
    assert names[0] == "airplane" and names[-1] == "truck" and len(names) == 10


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train, pixels = _cifar_records([[3, 42], [19, 99], [0, 0]], rng)
    test, _ = _cifar_records([[5, 17]], rng)
    (folder / "train.bin").write_bytes(train)
    (folder / "test.bin").write_bytes(test)
    (folder / "fine_label_names.txt").write_text("".join(f"class_{i}\n" for i in range(100)))

    train_x, train_y, test_x, test_y, names = load_raw("cifar100", tmp_path)

    assert train_y.tolist() == [42, 99, 0] and test_y.tolist() == [17]
    assert train_x[1, 0, 0, 3] == pixels[1, 3] / 255
    assert train_x[2, 1, 2, 0] == pixels[2, 1024 + 64] / 255
    assert test_x.shape == (1, 3, 32, 32)
    assert names[42] == "class_42" and len(names) == 100


def test_cifar_truncated_file_is_reported(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin"
    batch.write_bytes(batch.read_bytes()[:-5])
    with pytest.raises(DataError, match="data_batch_2.bin") as caught:
        load_raw("cifar10", tmp_path)
    assert "3073" in str(caught.value) and "\n" not in str(caught.value)


def test_cifar_missing_batch_is_reported(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="dataset file not found: .*data_batch_3.bin"):
        load_raw("cifar10", tmp_path)


def test_cifar_label_out_of_range_is_reported(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    data, _ = _cifar_records([[10]], np.random.default_rng(2))
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(data)
    with pytest.raises(DataError, match="test_batch.bin has label 10"):
        load_raw("cifar10", tmp_path)


@pytest.mark.parametrize(
    ("name", "python_dir", "archive"),
    [
        ("cifar10", "cifar-10-batches-py", "cifar-10-binary.tar.gz"),
        ("cifar100", "cifar-100-python", "cifar-100-binary.tar.gz"),
    ],
)
def test_python_only_cifar_asks_for_binary(tmp_path: Path, name: str, python_dir: str, archive: str) -> None:
    (tmp_path / python_dir).mkdir()
    with pytest.raises(DataError) as caught:
        prepare(name, tmp_path, val_fraction=0.1, zca=False, seed=0)
    message = str(caught.value)
    assert "binary version" in message and archive in message and python_dir in message
    assert "\n" not in message


def test_missing_root_names_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"dataset directory not found: {missing}") as caught:
        prepare("cifar10", missing, val_fraction=0.1, zca=False, seed=0)
    assert str(caught.value).endswith(f"(get it with: pad-ray data cifar10 --root {missing})")


@pytest.mark.parametrize("name", DATASETS)
def test_every_missing_dataset_names_its_download_command(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="not found") as caught:
        load_raw(name, tmp_path)
    message = str(caught.value)
    assert message.endswith(f"(get it with: pad-ray data {name} --root {tmp_path})") and "\n" not in message


def test_download_command_quotes_a_root_with_spaces(tmp_path: Path) -> None:
    root = tmp_path / "my data"
    root.mkdir()
    with pytest.raises(DataError, match=re.escape(f"--root '{root}')")):
        load_raw("svhn", root)


def test_missing_cifar_dir_names_the_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-100-binary .*cifar-100-binary.tar.gz"):
        load_raw("cifar100", tmp_path)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_raw("imagenet", tmp_path)


# --- Tiny ImageNet --------------------------------------------------------------------------------

# Listed out of sorted order so that a loader relying on file order instead of wnids would fail.
TINY_COLORS = {"n02": (250, 10, 10), "n01": (10, 250, 10), "n03": (10, 10, 250)}


def _save_jpeg(path: Path, color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 64), color)
    image.convert(mode).save(path, "JPEG", quality=95)


def _write_tiny_train(root: Path) -> Path:
    base = root / "tiny-imagenet-200"
    for wnid, color in TINY_COLORS.items():
        for k in range(2):
            _save_jpeg(base / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", color)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    return base


def _assert_solid(images: torch.Tensor, colors: list[tuple[int, int, int]]) -> None:
    expected = torch.tensor(colors, dtype=torch.float32).view(-1, 3, 1, 1) / 255
    assert (images - expected).abs().max() < 0.05


def test_tiny_official_val_layout(tmp_path: Path) -> None:
    base = _write_tiny_train(tmp_path)
    val = base / "val"
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        _save_jpeg(val / "images" / f"val_{i}.JPEG", TINY_COLORS[wnid])
        lines.append(f"val_{i}.JPEG\t{wnid}\t1\t2\t30\t40")
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    train_x, train_y, test_x, test_y, names = load_raw("tinyimagenet", tmp_path)

    assert names == ["n01", "n02", "n03"]
    assert train_x.shape == (6, 3, 64, 64) and train_x.dtype == torch.float32
    assert train_y.tolist() == [0, 0, 1, 1, 2, 2]
    _assert_solid(train_x, [TINY_COLORS[names[label]] for label in train_y.tolist()])
    assert test_y.tolist() == [2, 0, 1, 0]
    _assert_solid(test_x, [TINY_COLORS[wnid] for wnid in ["n03", "n01", "n02", "n01"]])


def test_tiny_reorganised_val_layout_and_grayscale(tmp_path: Path) -> None:
    base = _write_tiny_train(tmp_path)
    _save_jpeg(base / "val" / "n02" / "a.JPEG", TINY_COLORS["n02"])
    _save_jpeg(base / "val" / "n01" / "b.JPEG", TINY_COLORS["n01"])
    _save_jpeg(base / "val" / "n03" / "c.JPEG", (128, 128, 128), mode="L")

    _, _, test_x, test_y, _ = load_raw("tinyimagenet", tmp_path)

    assert test_y.tolist() == [0, 1, 2]
    assert test_x.shape == (3, 3, 64, 64)
    _assert_solid(test_x, [TINY_COLORS["n01"], TINY_COLORS["n02"], (128, 128, 128)])


def test_tiny_val_classes_must_match_train(tmp_path: Path) -> None:
    base = _write_tiny_train(tmp_path)
    _save_jpeg(base / "val" / "n01" / "a.JPEG", TINY_COLORS["n01"])
    with pytest.raises(DataError, match=r"differ from train \(missing \['n02', 'n03'\]"):
        load_raw("tinyimagenet", tmp_path)


def test_tiny_annotation_naming_unknown_wnid(tmp_path: Path) -> None:
    base = _write_tiny_train(tmp_path)
    _save_jpeg(base / "val" / "images" / "val_0.JPEG", TINY_COLORS["n01"])
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 1 of .*val_annotations.txt"):
        load_raw("tinyimagenet", tmp_path)


def test_tiny_wrong_image_size_is_reported(tmp_path: Path) -> None:
    base = _write_tiny_train(tmp_path)
    Image.new("RGB", (32, 32)).save(base / "train" / "n02" / "images" / "small.JPEG")
    _save_jpeg(base / "val" / "images" / "val_0.JPEG", TINY_COLORS["n01"])
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="small.JPEG"):
        load_raw("tinyimagenet", tmp_path)


def test_tiny_missing_val_dir(tmp_path: Path) -> None:
    _write_tiny_train(tmp_path)
    with pytest.raises(DataError, match="dataset directory not found: .*tiny-imagenet-200/val"):
        load_raw("tinyimagenet", tmp_path)


# --- MNIST (the real files) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    return load_raw("mnist", MNIST_ROOT)


def test_mnist_real_files(mnist: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]) -> None:
    train_x, train_y, test_x, test_y, names = mnist
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert torch.bincount(train_y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test_y).tolist() == MNIST_TEST_COUNTS
    assert train_x.min() == 0.0 and train_x.max() == 1.0
    # Exactly byte / 255, i.e. no resampling or interpolation on the way in.
    assert torch.equal(torch.round(train_x[:1000] * 255) / 255, train_x[:1000])
    assert len(names) == 10


# --- MNIST family (idx-ubyte files written here) --------------------------------------------------

MNIST_FAMILY = [("mnist", MNIST), ("fashionmnist", FashionMNIST), ("kmnist", KMNIST)]


def _write_idx(path: Path, array: np.ndarray) -> None:
    """idx-ubyte: two zero bytes, type 0x08 (unsigned byte), the rank, each dim as a big-endian uint32, the data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = b"".join(size.to_bytes(4, "big") for size in array.shape)
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + dims + array.astype(np.uint8).tobytes())


def _write_mnist_family(raw_dir: Path, train_labels: list[int], test_labels: list[int]) -> np.ndarray:
    """Writes the four idx files torchvision's MNIST classes read from raw_dir; returns the train pixels."""
    rng = np.random.default_rng(4)
    pixels = {}
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        pixels[prefix] = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", pixels[prefix])
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", np.array(labels))
    return pixels["train"]


@pytest.mark.parametrize(("name", "source"), MNIST_FAMILY)
def test_mnist_family_idx_files(tmp_path: Path, name: str, source: type[MNIST]) -> None:
    train_labels = [3, 0, 9, 3, 1, 0, 9, 1]
    pixels = _write_mnist_family(tmp_path / source.__name__ / "raw", train_labels, [7, 2, 2])

    train_x, train_y, test_x, test_y, names = load_raw(name, tmp_path)

    assert train_x.shape == (8, 1, 28, 28) and train_x.dtype == torch.float32 and test_x.shape == (3, 1, 28, 28)
    assert train_y.dtype == torch.int64 and train_y.tolist() == train_labels and test_y.tolist() == [7, 2, 2]
    assert torch.equal(train_x[:, 0], torch.from_numpy(pixels.astype(np.float32) / 255))
    assert train_x[5, 0, 3, 21] == pixels[5, 3, 21] / 255  # row 3, column 21: no transpose on the way in
    assert names == source.classes and len(names) == 10

    dataset = prepare(name, tmp_path, val_fraction=0.0, zca=False, seed=0)
    assert (dataset.num_classes, dataset.channels, dataset.image_size) == (10, 1, 28)
    assert len(dataset.mean) == len(dataset.std) == 1
    assert torch.allclose(dataset.to_pixels(dataset.train.images), train_x, atol=1e-6)


def test_mnist_family_class_names_are_torchvision_s(tmp_path: Path) -> None:
    _write_mnist_family(tmp_path / "FashionMNIST" / "raw", [0, 9], [1])
    _write_mnist_family(tmp_path / "KMNIST" / "raw", [0, 9], [1])
    assert load_raw("fashionmnist", tmp_path)[4][::9] == ["T-shirt/top", "Ankle boot"]
    assert load_raw("kmnist", tmp_path)[4][::9] == ["o", "wo"]


@pytest.mark.parametrize(("name", "source"), MNIST_FAMILY)
def test_mnist_family_missing_file(tmp_path: Path, name: str, source: type[MNIST]) -> None:
    raw_dir = tmp_path / source.__name__ / "raw"
    _write_mnist_family(raw_dir, [0, 1], [2])
    (raw_dir / "t10k-labels-idx1-ubyte").unlink()
    missing = raw_dir / "t10k-labels-idx1-ubyte"
    with pytest.raises(DataError, match=re.escape(f"dataset file not found: {missing}")) as caught:
        load_raw(name, tmp_path)
    assert f"pad-ray data {name} --root" in str(caught.value)


@pytest.mark.parametrize("cut", [2, 10, -5])
def test_mnist_family_truncated_file(tmp_path: Path, cut: int) -> None:
    raw_dir = tmp_path / "KMNIST" / "raw"
    _write_mnist_family(raw_dir, [0, 1, 2], [3])
    images = raw_dir / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:cut])
    with pytest.raises(DataError, match="malformed KMNIST idx files .*train-images-idx3-ubyte") as caught:
        load_raw("kmnist", tmp_path)
    assert "\n" not in str(caught.value) and "get it with" not in str(caught.value)


def test_mnist_family_labels_must_match_images(tmp_path: Path) -> None:
    raw_dir = tmp_path / "FashionMNIST" / "raw"
    _write_mnist_family(raw_dir, [0, 1, 2], [3])
    _write_idx(raw_dir / "train-labels-idx1-ubyte", np.array([0, 1]))
    with pytest.raises(DataError, match=r"3 images of \(28, 28\) and 2 labels"):
        load_raw("fashionmnist", tmp_path)
    _write_idx(raw_dir / "train-labels-idx1-ubyte", np.array([0, 1, 10]))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: label 10 \(expected labels below 10\)"):
        load_raw("fashionmnist", tmp_path)


# --- SVHN (MATLAB v5 files written here) ----------------------------------------------------------


def _write_svhn(folder: Path, split: str, labels: list[int], seed: int = 5) -> np.ndarray:
    """torchvision's {split}_32x32.mat: X uint8 [32, 32, 3, N] and y uint8 [N, 1] with 10 for the digit 0."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3, len(labels)), dtype=np.uint8)
    savemat(folder / f"{split}_32x32.mat", {"X": pixels, "y": np.array(labels, dtype=np.uint8).reshape(-1, 1)})
    return pixels


def test_svhn_mat_files(tmp_path: Path) -> None:
    pixels = _write_svhn(tmp_path / "SVHN", "train", [10, 1, 5, 10, 9, 2])
    _write_svhn(tmp_path / "SVHN", "test", [3, 10], seed=6)

    train_x, train_y, test_x, test_y, names = load_raw("svhn", tmp_path)

    assert train_x.shape == (6, 3, 32, 32) and train_x.dtype == torch.float32 and test_x.shape == (2, 3, 32, 32)
    assert train_y.dtype == torch.int64 and train_y.tolist() == [0, 1, 5, 0, 9, 2] and test_y.tolist() == [3, 0]
    # X[row, column, channel, sample] lands at [sample, channel, row, column].
    assert train_x[4, 2, 5, 17] == pixels[5, 17, 2, 4] / 255
    assert torch.equal(train_x, torch.from_numpy(pixels.transpose(3, 2, 0, 1).astype(np.float32) / 255))
    assert names == [str(digit) for digit in range(10)]

    dataset = prepare("svhn", tmp_path, val_fraction=0.0, zca=False, seed=0)
    assert (dataset.num_classes, dataset.channels, dataset.image_size) == (10, 3, 32)
    assert len(dataset.mean) == len(dataset.std) == 3
    assert torch.allclose(dataset.to_pixels(dataset.train.images), train_x, atol=1e-6)


def test_svhn_matches_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "SVHN"
    _write_svhn(folder, "train", [10, 4, 7, 10, 1])
    _write_svhn(folder, "test", [2])
    # torchvision checks the official md5 first, which small written files cannot have.
    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)
    reference = SVHN(str(folder), split="train")

    train_x, train_y, *_ = load_raw("svhn", tmp_path)

    assert torch.equal(train_x, torch.from_numpy(reference.data).float() / 255)
    assert train_y.tolist() == reference.labels.tolist()


def test_svhn_missing_file(tmp_path: Path) -> None:
    _write_svhn(tmp_path / "SVHN", "train", [1, 2])
    with pytest.raises(DataError, match="dataset file not found: .*SVHN/test_32x32.mat") as caught:
        load_raw("svhn", tmp_path)
    assert "pad-ray data svhn --root" in str(caught.value)


@pytest.mark.parametrize("cut", [10, 100, -5])
def test_svhn_truncated_file(tmp_path: Path, cut: int) -> None:
    _write_svhn(tmp_path / "SVHN", "train", [1, 2, 3])
    _write_svhn(tmp_path / "SVHN", "test", [4])
    path = tmp_path / "SVHN" / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(DataError, match="malformed SVHN file: .*train_32x32.mat") as caught:
        load_raw("svhn", tmp_path)
    assert "\n" not in str(caught.value) and "MATLAB v5" in str(caught.value)


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [0]], np.uint8)}, r"labels in \[0, 1\]"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]], np.uint8)}, r"labels in \[1, 11\]"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1]], np.uint8)}, "1 labels for 2 images"),
        ({"X": np.zeros((32, 32, 1, 2), np.uint8), "y": np.array([[1], [2]], np.uint8)}, r"X uint8 \[32, 32, 1, 2\]"),
        ({"X": np.zeros((32, 32, 3, 2)), "y": np.array([[1], [2]], np.uint8)}, "X float64"),
        ({"images": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [2]], np.uint8)}, "lacks X"),
    ],
)
def test_svhn_unexpected_contents(tmp_path: Path, contents: dict[str, np.ndarray], expected: str) -> None:
    (tmp_path / "SVHN").mkdir()
    savemat(tmp_path / "SVHN" / "train_32x32.mat", contents)
    _write_svhn(tmp_path / "SVHN", "test", [4])
    with pytest.raises(DataError, match=f"train_32x32.mat .*{expected}"):
        load_raw("svhn", tmp_path)


# --- download (never over the network here: torchvision's fetch is replaced) ------------------------


def test_download_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet' \(expected one of mnist, fashionmnist"):
        download("imagenet", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_download_cifar_fetches_the_official_binary_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fetch(url: str, download_root: str, md5: str) -> None:
        calls.append((url, md5))
        _write_cifar10(Path(download_root))

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fetch)
    root = tmp_path / "data"

    assert download("cifar10", root) == root / "cifar-10-batches-bin"
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")]
    assert load_raw("cifar10", root)[0].shape == (15, 3, 32, 32)


def test_download_svhn_lands_where_the_loader_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = []

    def fetch(url: str, root: str, filename: str, md5: str) -> None:
        urls.append(url)
        _write_svhn(Path(root), filename.split("_")[0], [1, 10])

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fetch)

    assert download("svhn", tmp_path) == tmp_path / "SVHN"
    assert urls == [SVHN.split_list["train"][0], SVHN.split_list["test"][0]]
    assert load_raw("svhn", tmp_path)[1].tolist() == [1, 0]


def test_download_mnist_family_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fetch(url: str, download_root: str, filename: str, md5: str) -> None:
        # Stands in for fetching and gunzipping one of the four files into torchvision's raw folder.
        name = filename.removesuffix(".gz")
        array = np.zeros((2, 28, 28)) if "images" in name else np.array([4, 8])
        _write_idx(Path(download_root) / name, array)

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fetch)

    assert download("fashionmnist", tmp_path) == tmp_path / "FashionMNIST"
    assert load_raw("fashionmnist", tmp_path)[1].tolist() == [4, 8]


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    for name in ("kmnist", "tinyimagenet"):
        with pytest.raises(DataError, match=re.escape(f"could not download {name} into {tmp_path}: ")) as caught:
            download(name, tmp_path)
        assert "no route to host" in str(caught.value) and "\n" not in str(caught.value)


# --- splits ----------------------------------------------------------------------------------------


def test_class_balanced_split_counts_and_partition() -> None:
    sizes = {0: 40, 1: 10, 2: 3, 3: 1, 4: 2}
    labels = torch.cat([torch.full((n,), c) for c, n in sizes.items()])[torch.randperm(56, generator=_generator(9))]

    keep, val = class_balanced_split(labels, 0.2, _generator(0))

    assert torch.bincount(labels[val], minlength=5).tolist() == [8, 2, 1, 0, 1]
    assert torch.bincount(labels[keep], minlength=5).tolist() == [32, 8, 2, 1, 1]
    assert set(keep.tolist()).isdisjoint(val.tolist())
    assert sorted(keep.tolist() + val.tolist()) == list(range(56))
    assert torch.equal(keep, keep.sort().values) and torch.equal(val, val.sort().values)
    assert keep.dtype == torch.int64 and val.dtype == torch.int64


def test_class_balanced_split_depends_on_seed_only() -> None:
    labels = torch.arange(200) % 4
    first = class_balanced_split(labels, 0.25, _generator(3))
    again = class_balanced_split(labels, 0.25, _generator(3))
    other = class_balanced_split(labels, 0.25, _generator(4))
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])
    assert not torch.equal(first[1], other[1])


def test_class_balanced_split_zero_fraction() -> None:
    keep, val = class_balanced_split(torch.tensor([0, 1, 1, 2]), 0.0, _generator(0))
    assert keep.tolist() == [0, 1, 2, 3] and val.numel() == 0 and val.dtype == torch.int64


def test_class_balanced_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="fraction"):
        class_balanced_split(torch.tensor([0, 1]), 1.0, _generator(0))


def test_per_class_subset() -> None:
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 7)
    chosen = per_class_subset(labels, 3, _generator(0))
    assert torch.bincount(labels[chosen]).tolist() == [3, 2, 3]
    assert torch.equal(chosen, chosen.sort().values) and chosen.unique().numel() == chosen.numel()
    assert torch.equal(chosen, per_class_subset(labels, 3, _generator(0)))
    draws = {tuple(per_class_subset(labels, 3, _generator(seed)).tolist()) for seed in range(5)}
    assert len(draws) > 1


# --- ZCA -------------------------------------------------------------------------------------------


def _correlated(n: int, variances: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [n, 2, 2, 2] whose covariance is Q diag(variances) Q^T for a random rotation Q."""
    gen = _generator(seed)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    scaled = torch.randn(n, 8, generator=gen, dtype=torch.float64) * torch.tensor(variances, dtype=torch.float64).sqrt()
    return (scaled @ rotation.T + 3.0).to(torch.float32).view(n, 2, 2, 2), rotation


def test_zca_whitens_to_identity_with_small_eps() -> None:
    images, _ = _correlated(4000, [9.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.05, 0.01], seed=0)
    zca = ZCA.fit(images, eps=1e-5)
    whitened = zca(images)
    assert whitened.shape == images.shape
    assert torch.allclose(whitened.flatten(1).mean(0), torch.zeros(8), atol=1e-4)
    covariance = torch.cov(whitened.flatten(1).double().T)
    assert torch.allclose(covariance, torch.eye(8, dtype=torch.float64), atol=2e-3)
    assert torch.allclose(zca.transform, zca.transform.T, atol=1e-5)


def test_zca_eps_shrinks_eigenvalues() -> None:
    images, _ = _correlated(4000, [4.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02], seed=1)
    eps = 0.1
    sample_eigenvalues = torch.linalg.eigvalsh(torch.cov(images.flatten(1).double().T))
    whitened_eigenvalues = torch.linalg.eigvalsh(torch.cov(ZCA.fit(images, eps=eps)(images).flatten(1).double().T))
    # Whitened variance along each principal axis is S / (S + eps): far below 1 for the small axes.
    expected = sample_eigenvalues / (sample_eigenvalues + eps)
    assert torch.allclose(whitened_eigenvalues, expected, atol=1e-4)
    assert whitened_eigenvalues.min() < 0.2


def test_zca_matches_unbiased_covariance_formula() -> None:
    # Few samples, so the unbiased (N - 1) and biased (N) covariances differ by 5%.
    images, _ = _correlated(20, [2.0, 1.0, 1.0, 0.5, 0.5, 0.3, 0.2, 0.1], seed=3)
    flat = images.flatten(1).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(flat.T, correction=1))
    scale = eigenvalues + 0.1
    expected_transform = eigenvectors @ torch.diag(scale.rsqrt()) @ eigenvectors.T
    expected_inverse = eigenvectors @ torch.diag(scale.sqrt()) @ eigenvectors.T

    zca = ZCA.fit(images, eps=0.1)

    assert torch.allclose(zca.transform.double(), expected_transform, atol=1e-5)
    assert torch.allclose(zca.inverse.double(), expected_inverse, atol=1e-5)
    assert torch.allclose(zca(images).flatten(1).double(), (flat - flat.mean(0)) @ expected_transform, atol=1e-4)


def test_zca_invert_round_trip_and_shape_check() -> None:
    images, _ = _correlated(500, [1.0] * 8, seed=2)
    zca = ZCA.fit(images[:400])
    held_out = images[400:]
    assert torch.allclose(zca.invert(zca(held_out)), held_out, atol=1e-4)
    with pytest.raises(ValueError, match="8 values per image"):
        zca(torch.zeros(2, 3, 2, 2))


# --- prepare -----------------------------------------------------------------------------------------


def _pixel_keys(images: torch.Tensor) -> list[bytes]:
    """Exact uint8 pixels of each image, as hashable keys."""
    as_bytes = torch.round(images * 255).to(torch.uint8).flatten(1)
    return [row.numpy().tobytes() for row in as_bytes]


def _raw_index(images: torch.Tensor) -> dict[bytes, int]:
    return {key: i for i, key in enumerate(_pixel_keys(images))}


def _prepare_small(seed: int, zca: bool = False):
    return prepare("mnist", MNIST_ROOT, val_fraction=0.2, zca=zca, seed=seed, train_per_class=50, test_size=200)


def test_prepare_mnist_subsets_and_disjoint_val(mnist) -> None:
    train_x, _, test_x, test_y, _ = mnist
    dataset = _prepare_small(seed=0)

    assert (dataset.name, dataset.num_classes, dataset.channels, dataset.image_size) == ("mnist", 10, 1, 28)
    assert dataset.mean == (0.1307,) and dataset.std == (0.3081,) and dataset.zca is None
    assert torch.bincount(dataset.train.labels).tolist() == [40] * 10
    assert torch.bincount(dataset.val.labels).tolist() == [10] * 10
    assert dataset.test.images.shape == (200, 1, 28, 28)

    raw_train, raw_test = _raw_index(train_x), _raw_index(test_x)
    train_keys = _pixel_keys(dataset.to_pixels(dataset.train.images))
    val_keys = _pixel_keys(dataset.to_pixels(dataset.val.images))
    test_keys = _pixel_keys(dataset.to_pixels(dataset.test.images))
    assert all(key in raw_train for key in train_keys + val_keys)
    assert set(train_keys).isdisjoint(val_keys)
    assert set(test_keys) <= set(raw_test) and len(set(test_keys)) == 200
    assert [test_y[raw_test[key]].item() for key in test_keys] == dataset.test.labels.tolist()
    # Normalisation with MNIST's fixed statistics, not re-estimated ones.
    first = train_x[raw_train[train_keys[0]]]
    assert torch.allclose(dataset.train.images[0], (first - 0.1307) / 0.3081, atol=1e-6)


def test_prepare_is_deterministic_per_seed() -> None:
    first, again, other = _prepare_small(seed=5), _prepare_small(seed=5), _prepare_small(seed=6)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).images, getattr(again, name).images)
        assert torch.equal(getattr(first, name).labels, getattr(again, name).labels)
    assert not torch.equal(first.val.images, other.val.images)


def test_prepare_zca_is_fitted_on_train_only(mnist) -> None:
    train_x, _, test_x, _, _ = mnist
    dataset = _prepare_small(seed=1, zca=True)
    assert dataset.zca is not None

    raw_train, raw_test = _raw_index(train_x), _raw_index(test_x)
    pixels = {name: dataset.to_pixels(getattr(dataset, name).images) for name in ("train", "val", "test")}
    train_raw = train_x[[raw_train[key] for key in _pixel_keys(pixels["train"])]]
    val_raw = train_x[[raw_train[key] for key in _pixel_keys(pixels["val"])]]
    test_raw = test_x[[raw_test[key] for key in _pixel_keys(pixels["test"])]]

    refit = ZCA.fit(train_raw)
    assert torch.allclose(dataset.zca.transform, refit.transform, atol=1e-4)
    assert torch.allclose(dataset.train.images, refit(train_raw), atol=1e-4)
    assert torch.allclose(dataset.val.images, refit(val_raw), atol=1e-4)
    assert torch.allclose(dataset.test.images, refit(test_raw), atol=1e-4)
    with_val = ZCA.fit(torch.cat([train_raw, val_raw]))
    assert not torch.allclose(dataset.zca.transform, with_val.transform, atol=1e-3)
    assert torch.allclose(dataset.to_pixels(dataset.val.images), val_raw, atol=1e-4)


def test_prepare_cifar10_zero_val_fraction(tmp_path: Path) -> None:
    _write_cifar10(tmp_path, per_batch=4)
    dataset = prepare("cifar10", tmp_path, val_fraction=0.0, zca=False, seed=0)
    assert dataset.train.images.shape == (20, 3, 32, 32) and dataset.val.images.shape == (0, 3, 32, 32)
    assert dataset.class_names[3] == "cat" and (dataset.channels, dataset.image_size) == (3, 32)
    raw_train = load_raw("cifar10", tmp_path)[0]
    assert torch.allclose(dataset.to_pixels(dataset.train.images), raw_train, atol=1e-6)


def test_a_worker_that_receives_a_split_does_not_import_torchvision() -> None:
    """A Ray worker that receives a Split imports this module (the class's) and, for experts and EL2N,
    pad_ray.ray_stages; torchvision (about 1.5 s of imports) waits until a dataset is read."""
    probe = ("import sys, torch; from pad_ray.data import Split; import pad_ray.ray_stages; "
             "split = Split(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64), torch.arange(2)); "
             "print(type(split).__name__, len(split.labels), 'torchvision' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["Split", "2", "False"], result.stdout + result.stderr
