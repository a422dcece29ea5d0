"""Dataset loading and preprocessing for pad_ray.

Every dataset is held in memory as float32 [N, C, H, W] tensors: the distillation loop samples
real images per class many thousands of times, so a DataLoader per draw would dominate the cost.
"""

from __future__ import annotations

import functools
import os
import shlex
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from pad_ray.runtime import derive_seed

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

DATASETS = ("mnist", "fashionmnist", "kmnist", "svhn", "cifar10", "cifar100", "tinyimagenet")

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)
# Per-channel mean and std in [0, 1] of each train split. CIFAR's std is not the train set's (it is
# smaller); it and SVHN's are kept as the DC/DSA/MTT code that PAD's release builds on has them.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashionmnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": (_CIFAR_MEAN, _CIFAR_STD),
    "cifar100": (_CIFAR_MEAN, _CIFAR_STD),
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

RawData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


class DataError(ValueError):
    """Missing or malformed dataset files. Message is ONE line naming the file/dir and what was expected."""


class _MissingData(DataError):
    """A file or folder that is not there at all, which `download` can fix (unlike a garbled one)."""


@dataclass
class Split:
    images: torch.Tensor  # float32 [N, C, H, W], preprocessed (normalised or ZCA-whitened)
    labels: torch.Tensor  # int64 [N]
    index: torch.Tensor  # int64 [N]: each sample's position in the official train (or test) set


@dataclass(eq=False)
class ZCA:
    """ZCA whitening as kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True) computes it.

    Fitted on flattened images: transform = U diag(1/sqrt(S+eps)) U^T and
    inverse = U diag(sqrt(S+eps)) U^T, where U, S decompose the unbiased covariance.
    """

    mean: torch.Tensor
    transform: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = 0.1) -> ZCA:
        flat = images.flatten(1).to(torch.float32)
        if flat.shape[0] < 2:
            raise ValueError(f"ZCA needs at least 2 images to estimate a covariance, got {flat.shape[0]}")
        mean = flat.mean(dim=0)
        centered = flat - mean
        covariance = centered.T @ centered / (flat.shape[0] - 1)
        # The covariance is symmetric PSD, so eigh gives the same U, S as kornia's SVD; double
        # precision keeps the small eigenvalues accurate when eps is small.
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        # Rounding can leave tiny negative eigenvalues, which the true covariance cannot have.
        scale = eigenvalues.clamp(min=0) + eps
        transform = (eigenvectors * scale.rsqrt()) @ eigenvectors.T
        inverse = (eigenvectors * scale.sqrt()) @ eigenvectors.T
        return cls(mean, transform.to(torch.float32), inverse.to(torch.float32))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten a batch [N, ...]; the result has the batch's shape."""
        flat = self._flatten(images)
        return ((flat - self.mean.to(flat)) @ self.transform.to(flat)).reshape(images.shape)

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        flat = self._flatten(images)
        return (flat @ self.inverse.to(flat) + self.mean.to(flat)).reshape(images.shape)

    def _flatten(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        if flat.shape[1] != self.mean.numel():
            raise ValueError(
                f"ZCA was fitted on {self.mean.numel()} values per image, got a batch of shape {tuple(images.shape)}"
            )
        return flat


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: list[str]
    zca: ZCA | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[2]

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Undo preprocessing of a batch [N, C, H, W] and clamp to [0, 1], for image grids."""
        if self.zca is not None:
            pixels = self.zca.invert(images)
        else:
            pixels = images * _per_channel(self.std, images) + _per_channel(self.mean, images)
        return pixels.clamp(0.0, 1.0)


def _per_channel(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def _normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (images - _per_channel(mean, images)) / _per_channel(std, images)


def _one_line(error: BaseException) -> str:
    # A bare assert in a reader has no text; its type still tells the user something.
    return " ".join(str(error).split()) or type(error).__name__


def _require_file(path: Path, expected: str) -> None:
    if not path.is_file():
        raise _MissingData(f"dataset file not found: {path} (expected {expected})")


def _require_dir(path: Path, expected: str) -> None:
    if not path.is_dir():
        raise _MissingData(f"dataset directory not found: {path} (expected {expected})")


def _unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] (any strides) -> contiguous float32 in [0, 1]."""
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def _torchvision() -> ModuleType:
    """torchvision.datasets, imported where a dataset is read or fetched: importing torchvision takes
    about 1.5 s (it loads its models and torch._dynamo), and every Ray worker that receives a Split
    imports this module."""
    import torchvision.datasets
    import torchvision.datasets.utils

    return torchvision.datasets


# --- MNIST family (MNIST, Fashion-MNIST, KMNIST: the same idx files under <root>/<Class>/raw) ----

_IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _load_mnist_family(root: Path, title: str) -> RawData:
    source = getattr(_torchvision(), title)
    # torchvision's raw_folder rule, needed before an instance exists to report a missing file.
    raw_dir = root / title / "raw"
    for names in _IDX_FILES.values():
        for name in names:
            _require_file(raw_dir / name, f"the unpacked {title} idx files under {raw_dir}")
    splits = []
    for train, names in _IDX_FILES.items():
        where = f"{title} idx files {' and '.join(str(raw_dir / name) for name in names)}"
        try:
            dataset = source(str(root), train=train, download=False)
        except (RuntimeError, ValueError, TypeError, KeyError, AssertionError) as error:
            raise DataError(f"malformed {where}: {_one_line(error)}") from error
        images, labels = dataset.data, dataset.targets
        # torchvision checks neither that the two files agree nor the label range; a mismatch would
        # silently pair images with the wrong labels.
        if images.shape[1:] != (28, 28) or len(labels) != len(images) or not len(images):
            raise DataError(
                f"malformed {where}: {len(images)} images of {tuple(images.shape[1:])} and {len(labels)} labels "
                "(expected at least one 28x28 image and one label per image)"
            )
        classes = len(source.classes)
        if int(labels.max()) >= classes:
            raise DataError(f"malformed {where}: label {int(labels.max())} (expected labels below {classes})")
        splits += [_unit_float(images.unsqueeze(1)), labels.to(torch.int64)]
    train_x, train_y, test_x, test_y = splits
    return train_x, train_y, test_x, test_y, list(source.classes)


# --- CIFAR (binary version: the python version is pickled, which we refuse to load) ----------

_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class _CifarFormat:
    title: str
    binary_dir: str
    python_dir: str
    archive: str
    archive_md5: str  # published next to the archive on the CIFAR page
    train_files: tuple[str, ...]
    test_file: str
    names_file: str
    num_classes: int
    label_offset: int  # byte within a record holding the label we use
    header_bytes: int  # label bytes before the pixels


_CIFAR10 = _CifarFormat(
    title="CIFAR-10",
    binary_dir="cifar-10-batches-bin",
    python_dir="cifar-10-batches-py",
    archive="cifar-10-binary.tar.gz",
    archive_md5="c32a1d4ab5d03f1284b67883e8d87530",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_file="test_batch.bin",
    names_file="batches.meta.txt",
    num_classes=10,
    label_offset=0,
    header_bytes=1,
)

_CIFAR100 = _CifarFormat(
    title="CIFAR-100",
    binary_dir="cifar-100-binary",
    python_dir="cifar-100-python",
    archive="cifar-100-binary.tar.gz",
    archive_md5="03b5dce01913d631647c71ecec9e9cb8",
    train_files=("train.bin",),
    test_file="test.bin",
    names_file="fine_label_names.txt",
    num_classes=100,
    label_offset=1,  # byte 0 is the coarse label; the benchmark uses the 100 fine labels
    header_bytes=2,
)


def _read_cifar_records(path: Path, fmt: _CifarFormat, expected: str) -> tuple[torch.Tensor, torch.Tensor]:
    _require_file(path, expected)
    raw = np.fromfile(path, dtype=np.uint8)
    record_bytes = fmt.header_bytes + _CIFAR_PIXELS
    if raw.size == 0 or raw.size % record_bytes:
        raise DataError(
            f"malformed {fmt.title} file: {path} has {raw.size} bytes "
            f"(expected a non-zero multiple of the {record_bytes}-byte record)"
        )
    records = raw.reshape(-1, record_bytes)
    labels = torch.from_numpy(records[:, fmt.label_offset].astype(np.int64))
    if int(labels.max()) >= fmt.num_classes:
        raise DataError(
            f"malformed {fmt.title} file: {path} has label {int(labels.max())} "
            f"(expected labels below {fmt.num_classes})"
        )
    # Each record stores the R, G and B planes one after another, each 32x32 row-major.
    pixels = torch.from_numpy(np.ascontiguousarray(records[:, fmt.header_bytes :])).view(-1, 3, 32, 32)
    return _unit_float(pixels), labels


def _read_text(path: Path, expected: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"malformed text file: {path} is not UTF-8 at byte {error.start} (expected {expected})") from None


def _read_class_names(path: Path, count: int, expected: str) -> list[str]:
    _require_file(path, expected)
    names = [line.strip() for line in _read_text(path, expected).splitlines() if line.strip()]
    if len(names) != count:
        raise DataError(f"malformed class-name file: {path} has {len(names)} names (expected {count}, one per line)")
    return names


def _load_cifar(root: Path, fmt: _CifarFormat) -> RawData:
    binary_dir = root / fmt.binary_dir
    if not binary_dir.is_dir() and (root / fmt.python_dir).is_dir():
        raise _MissingData(
            f"found only the python (pickled) {fmt.title} at {root / fmt.python_dir}; pad_ray reads the "
            f"binary version (no unpickling), {fmt.archive} extracted under {root}"
        )
    expected = f"the {fmt.title} binary version ({fmt.archive}) extracted under {root}"
    _require_dir(binary_dir, expected)
    batches = [_read_cifar_records(binary_dir / name, fmt, expected) for name in fmt.train_files]
    test_x, test_y = _read_cifar_records(binary_dir / fmt.test_file, fmt, expected)
    names = _read_class_names(binary_dir / fmt.names_file, fmt.num_classes, expected)
    train_x = torch.cat([images for images, _ in batches])
    train_y = torch.cat([labels for _, labels in batches])
    return train_x, train_y, test_x, test_y, names


# --- SVHN (the cropped-digits .mat files that torchvision.datasets.SVHN reads) ---------------------

_SVHN_DIR = "SVHN"
# SVHN stores the digit 0 as label 10; torchvision maps it to 0, so label k is the digit k.
_SVHN_CLASSES = [str(digit) for digit in range(10)]


def _svhn_file(split: str) -> tuple[str, str, str]:
    """(url, filename, md5) of an SVHN split: torchvision's own table."""
    return _torchvision().SVHN.split_list[split]


def _read_svhn_split(path: Path, expected: str) -> tuple[torch.Tensor, torch.Tensor]:
    _require_file(path, expected)
    # Imported here because only SVHN needs scipy, and every Ray worker imports this module.
    from scipy.io import loadmat, matlab

    layout = "expected a MATLAB v5 file with X uint8 [32, 32, 3, N] and y [N, 1] holding 1..10"
    try:
        contents = loadmat(path, variable_names=("X", "y"))
    except (ValueError, TypeError, LookupError, OSError, NotImplementedError, zlib.error, matlab.MatReadError) as error:
        raise DataError(f"malformed SVHN file: {path} ({_one_line(error)}; {layout})") from error
    pixels, labels = contents.get("X"), contents.get("y")
    if pixels is None or labels is None:
        raise DataError(f"malformed SVHN file: {path} lacks {'X' if pixels is None else 'y'} ({layout})")
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[:3] != (32, 32, 3) or not pixels.shape[3]:
        raise DataError(f"malformed SVHN file: {path} has X {pixels.dtype} {list(pixels.shape)} ({layout})")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.size != pixels.shape[3]:
        raise DataError(f"malformed SVHN file: {path} has {labels.size} labels for {pixels.shape[3]} images ({layout})")
    if labels.min() < 1 or labels.max() > 10:
        raise DataError(f"malformed SVHN file: {path} has labels in [{labels.min()}, {labels.max()}] ({layout})")
    labels[labels == 10] = 0
    # MATLAB's [H, W, C, N] -> [N, C, H, W], as torchvision transposes it.
    images = torch.from_numpy(pixels).permute(3, 2, 0, 1)
    return _unit_float(images), torch.from_numpy(labels)


def _load_svhn(root: Path) -> RawData:
    folder = root / _SVHN_DIR
    expected = f"torchvision's SVHN train_32x32.mat and test_32x32.mat under {folder}"
    train_x, train_y = _read_svhn_split(folder / _svhn_file("train")[1], expected)
    test_x, test_y = _read_svhn_split(folder / _svhn_file("test")[1], expected)
    return train_x, train_y, test_x, test_y, list(_SVHN_CLASSES)


# --- Tiny ImageNet -------------------------------------------------------------------------------

_TINY_SHAPE = (64, 64, 3)


def _image_folder(path: Path) -> ImageFolder:
    try:
        return _torchvision().ImageFolder(str(path))
    except FileNotFoundError as error:
        raise DataError(f"no usable class folders in {path}: {_one_line(error)}") from error


def _official_val_samples(val_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    annotations = val_dir / "val_annotations.txt"
    _require_file(annotations, "the official Tiny ImageNet val annotations next to val/images")
    samples = []
    text = _read_text(annotations, "the official Tiny ImageNet val annotations, filename<TAB>wnid per line")
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in class_to_idx:
            raise DataError(
                f"malformed line {line_no} of {annotations}: {line!r} (expected filename<TAB>wnid of a train class)"
            )
        image = val_dir / "images" / fields[0]
        _require_file(image, f"the image named on line {line_no} of {annotations}")
        samples.append((str(image), class_to_idx[fields[1]]))
    if not samples:
        raise DataError(f"no entries in {annotations} (expected one line per val image)")
    return samples


def _tiny_val_samples(val_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """Labelled val images from either the official layout (val/images + annotations) or val/<wnid>/."""
    if (val_dir / "images").is_dir():
        return _official_val_samples(val_dir, class_to_idx)
    folder = _image_folder(val_dir)
    if folder.class_to_idx != class_to_idx:
        missing = sorted(set(class_to_idx) - set(folder.class_to_idx))
        extra = sorted(set(folder.class_to_idx) - set(class_to_idx))
        raise DataError(
            f"class folders in {val_dir} differ from train (missing {missing[:5]}, extra {extra[:5]}; "
            "expected one folder per train wnid)"
        )
    return folder.samples


def _load_images(samples: list[tuple[str, int]], loader: Callable[[str], object]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = np.empty((len(samples), *_TINY_SHAPE), dtype=np.uint8)

    def decode(index: int) -> None:
        path = samples[index][0]
        try:
            array = np.asarray(loader(path))
        except OSError as error:
            raise DataError(f"unreadable image: {path} ({_one_line(error)})") from error
        if array.shape != _TINY_SHAPE:
            raise DataError(f"unexpected image shape {array.shape} in {path} (expected 64x64 RGB)")
        pixels[index] = array

    # PIL releases the GIL while decoding, so threads cut the load time of 110k JPEGs.
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(decode, range(len(samples))))
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return _unit_float(torch.from_numpy(pixels).permute(0, 3, 1, 2)), labels


_TINY_DIR = "tiny-imagenet-200"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def _load_tiny(root: Path) -> RawData:
    base = root / _TINY_DIR
    layout = f"Tiny ImageNet (tiny-imagenet-200/train and tiny-imagenet-200/val) under {root}"
    _require_dir(base / "train", layout)
    _require_dir(base / "val", layout)
    train = _image_folder(base / "train")
    val_samples = _tiny_val_samples(base / "val", train.class_to_idx)
    train_x, train_y = _load_images(train.samples, train.loader)
    test_x, test_y = _load_images(val_samples, train.loader)
    return train_x, train_y, test_x, test_y, list(train.classes)


# --- public API ----------------------------------------------------------------------------------

_MNIST_FAMILY = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}  # torchvision's classes

_LOADERS: dict[str, Callable[[Path], RawData]] = {
    **{name: functools.partial(_load_mnist_family, title=title) for name, title in _MNIST_FAMILY.items()},
    "svhn": _load_svhn,
    "cifar10": functools.partial(_load_cifar, fmt=_CIFAR10),
    "cifar100": functools.partial(_load_cifar, fmt=_CIFAR100),
    "tinyimagenet": _load_tiny,
}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (expected one of {', '.join(DATASETS)})")


def load_raw(name: str, root: str | Path) -> RawData:
    """(train_x float32 in [0,1] [N,C,H,W], train_y int64, test_x, test_y, class_names).

    For Tiny ImageNet the returned test split is the labelled official val set.
    """
    _check_name(name)
    try:
        _require_dir(Path(root), f"the dataset root holding the {name} files")
        return _LOADERS[name](Path(root))
    except _MissingData as error:
        fix = f"pad-ray data {name} --root {shlex.quote(str(root))}"
        raise _MissingData(f"{error} (get it with: {fix})") from None


def _fetch_mnist_family(root: Path, title: str) -> Path:
    # The constructor downloads all four idx files whichever split it is asked for.
    getattr(_torchvision(), title)(str(root), train=True, download=True)
    return root / title


def _fetch_svhn(root: Path) -> Path:
    # The download_url call SVHN.download makes; building an SVHN object would also parse the 180 MB file.
    folder = root / _SVHN_DIR
    for url, filename, md5 in map(_svhn_file, ("train", "test")):
        _torchvision().utils.download_url(url, str(folder), filename, md5)
    return folder


def _fetch_archive(root: Path, url: str, md5: str, folder: str) -> Path:
    # The archive stays in root, so a second call verifies it by md5 instead of fetching it again.
    _torchvision().utils.download_and_extract_archive(url, download_root=str(root), md5=md5)
    return root / folder


_FETCHERS: dict[str, Callable[[Path], Path]] = {
    **{name: functools.partial(_fetch_mnist_family, title=title) for name, title in _MNIST_FAMILY.items()},
    "svhn": _fetch_svhn,
    **{
        name: functools.partial(
            _fetch_archive, url=_CIFAR_URL + fmt.archive, md5=fmt.archive_md5, folder=fmt.binary_dir
        )
        for name, fmt in (("cifar10", _CIFAR10), ("cifar100", _CIFAR100))
    },
    "tinyimagenet": functools.partial(_fetch_archive, url=_TINY_URL, md5=_TINY_MD5, folder=_TINY_DIR),
}


def download(name: str, root: str | Path) -> Path:
    """Fetch dataset `name` into `root` in the layout `load_raw` reads; returns the dataset's folder.

    Uses torchvision's downloaders and checksums; files already there with the right md5 are kept.
    Raises ValueError for an unknown name and a one-line DataError when the download fails.
    """
    _check_name(name)
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return _FETCHERS[name](root)
    # URLError and HTTPError are OSErrors; torchvision reports a bad checksum or a failed mirror as RuntimeError.
    except (OSError, RuntimeError, tarfile.TarError, zipfile.BadZipFile) as error:
        raise DataError(f"could not download {name} into {root}: {_one_line(error)}") from error


def _class_members(labels: torch.Tensor) -> list[torch.Tensor]:
    """Indices of each class's samples, classes in ascending label order (keeps draws reproducible)."""
    labels = labels.cpu()
    return [(labels == label).nonzero().flatten() for label in labels.unique().tolist()]


def _sorted_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(parts).sort().values


def _val_count(class_size: int, fraction: float) -> int:
    if fraction == 0 or class_size < 2:
        return 0
    # At least one val sample so every class is measured, and at least one left to train on.
    return min(max(round(fraction * class_size), 1), class_size - 1)


def class_balanced_split(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_idx, val_idx), both sorted: per class, round(fraction * n_c) random samples go to val.

    A class with n_c >= 2 gives at least 1 and at most n_c - 1 samples to val; one with n_c == 1
    stays in keep. `generator` must be a CPU generator.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {fraction}")
    keep, val = [], []
    for members in _class_members(labels):
        shuffled = members[torch.randperm(members.numel(), generator=generator)]
        count = _val_count(members.numel(), fraction)
        val.append(shuffled[:count])
        keep.append(shuffled[count:])
    return _sorted_cat(keep), _sorted_cat(val)


def per_class_subset(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of at most `per_class` random samples of each class (for small CPU runs)."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    chosen = [
        members[torch.randperm(members.numel(), generator=generator)[:per_class]]
        for members in _class_members(labels)
    ]
    return _sorted_cat(chosen)


def _generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, purpose))


def prepare(
    name: str,
    root: str | Path,
    *,
    val_fraction: float,
    zca: bool,
    seed: int,
    train_per_class: int | None = None,
    test_size: int | None = None,
) -> Dataset:
    """Load, subsample, carve a class-balanced val split out of train, and preprocess.

    The train subset, test subset and val split each draw from their own generator derived from
    `seed`, so the size of the test subset does not change which training samples are kept. ZCA is fitted on the remaining train images only and applied to all
    splits; without ZCA the splits are normalised with the dataset's fixed mean/std.
    """
    train_x, train_y, test_x, test_y, class_names = load_raw(name, root)
    train_i, test_i = torch.arange(len(train_y)), torch.arange(len(test_y))
    if train_per_class is not None:
        chosen = per_class_subset(train_y, train_per_class, _generator(seed, "train-subset"))
        train_x, train_y, train_i = train_x[chosen], train_y[chosen], train_i[chosen]
    if test_size is not None:
        if test_size < 1:
            raise ValueError(f"test_size must be at least 1, got {test_size}")
        chosen = torch.randperm(len(test_y), generator=_generator(seed, "test-subset"))[:test_size].sort().values
        test_x, test_y, test_i = test_x[chosen], test_y[chosen], test_i[chosen]
    keep, held_out = class_balanced_split(train_y, val_fraction, _generator(seed, "val-split"))
    train_x, val_x = train_x[keep], train_x[held_out]
    train_y, val_y = train_y[keep], train_y[held_out]
    train_i, val_i = train_i[keep], train_i[held_out]

    mean, std = _STATS[name]
    whitening = ZCA.fit(train_x) if zca else None
    preprocess = whitening if whitening is not None else functools.partial(_normalize, mean=mean, std=std)
    return Dataset(
        name=name,
        train=Split(preprocess(train_x), train_y, train_i),
        val=Split(preprocess(val_x), val_y, val_i),
        test=Split(preprocess(test_x), test_y, test_i),
        num_classes=len(class_names),
        class_names=class_names,
        zca=whitening,
        mean=mean,
        std=std,
    )
