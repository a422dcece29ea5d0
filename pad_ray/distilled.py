"""A distilled set as a product: one self-describing safetensors file, loaded back with one call.

The file (`distilled_best.safetensors` in a run folder or a trial's checkpoint) holds tensors

    images         float32 [n, C, H, W]  in the preprocessed space pad_ray trains in
    pixels         float32 [n, C, H, W]  the same images with the preprocessing undone (not clamped:
                                         distilled pixels may leave [0, 1], and clamping would lose them)
    labels         int64 [n]             the class each image was distilled for
    soft_labels    float32 [n, classes]  the learned logit labels (absent for hard-label sets)
    lr             float32 []            the learned step size
    preprocessing.mean, .std             per-channel normalisation, or
    preprocessing.mean, .zca_transform   flat ZCA mean [D] and transform [D, D]: x -> (x - mean) @ T

and string metadata: `format`, `class_names`, `config` (the resolved run config) and `provenance`
(sweep, trial, MLflow run id when known, pad_ray version, git commit), the last three as JSON. It
verifies itself: `sha256` in the metadata covers the rest of the header and every tensor byte, so a
file that travels alone (an MLflow artifact, a download) is checked like the store's files with
their sidecars. Nothing is unpickled: safetensors is a JSON header and raw little-endian buffers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save
from torch.utils.data import Dataset as TorchDataset

from pad_ray import export_target, files
from pad_ray.config import RunConfig, to_dict
from pad_ray.data import Dataset
from pad_ray.evaluate import SyntheticSet
from pad_ray.runtime import software

FILE_NAME = "distilled_best.safetensors"
FORMAT = "pad_ray.distilled/1"
SIDECAR = "distilled.json"  # an ImageFolder export's labels, lr and provenance
SPACES = ("preprocessed", "pixels")
# A source with a scheme (runs:/, mlflow-artifacts:/, s3://, file://) is an artifact MLflow downloads.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


@dataclass(frozen=True)
class Preprocessing:
    """What pad_ray applies to real images in [0, 1] before training on or testing with them: per-channel
    normalisation (`std` set) or ZCA whitening (`zca_transform` set). Called on one image [C, H, W] (a
    torchvision transform after `ToTensor()`) or a batch [N, C, H, W]."""

    mean: torch.Tensor  # [C] for normalisation, [C*H*W] for ZCA
    std: torch.Tensor | None = None
    zca_transform: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return "zca" if self.zca_transform is not None else "normalize"

    @classmethod
    def of(cls, data: Dataset) -> Preprocessing:
        if data.zca is not None:
            return cls(data.zca.mean.float(), zca_transform=data.zca.transform.float())
        return cls(torch.tensor(data.mean, dtype=torch.float32), std=torch.tensor(data.std, dtype=torch.float32))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        batch = pixels.unsqueeze(0) if pixels.ndim == 3 else pixels
        # The same operations as data.prepare, so real data preprocessed here matches pad_ray's splits bit for bit.
        if self.zca_transform is not None:
            flat = batch.flatten(1)
            out = ((flat - self.mean.to(flat)) @ self.zca_transform.to(flat)).reshape(batch.shape)
        else:
            out = (batch - self.mean.to(batch).view(-1, 1, 1)) / self.std.to(batch).view(-1, 1, 1)
        return out[0] if pixels.ndim == 3 else out

    def tensors(self) -> dict[str, torch.Tensor]:
        extra = {"zca_transform": self.zca_transform} if self.zca_transform is not None else {"std": self.std}
        return {f"preprocessing.{k}": v.contiguous() for k, v in {"mean": self.mean, **extra}.items()}


def _pixels(images: torch.Tensor, data: Dataset) -> torch.Tensor:
    """Preprocessing undone, unclamped (`Dataset.to_pixels` clamps, for image grids)."""
    if data.zca is not None:
        return data.zca.invert(images)
    mean, std = (torch.tensor(v, dtype=images.dtype).view(-1, 1, 1) for v in (data.mean, data.std))
    return images * std + mean


class DistilledSet(TorchDataset):
    """A distilled set as a torch `Dataset` of (image, target) pairs in one space: `preprocessed` (what
    pad_ray trains and reports accuracy in) or `pixels`; targets are the soft logit labels (`soft=True`,
    where the set has them) or the class indices. `transform` maps real images in [0, 1] into the same
    space, for the test data a model trained on this set is measured on."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], space: str = "preprocessed",
                 soft: bool = True):
        if space not in SPACES:
            raise ValueError(f"space: {space!r} is not one of {', '.join(SPACES)}")
        self.images, self.pixels, self.labels = tensors["images"], tensors["pixels"], tensors["labels"]
        self.soft_labels = tensors.get("soft_labels")
        self.lr = float(tensors["lr"])
        self.preprocessing = Preprocessing(tensors["preprocessing.mean"], tensors.get("preprocessing.std"),
                                           tensors.get("preprocessing.zca_transform"))
        self.class_names: list[str] = meta["class_names"]
        self.config: dict[str, Any] = meta["config"]
        self.provenance: dict[str, Any] = meta["provenance"]
        self.space = space
        self.transform = self.preprocessing if space == "preprocessed" else (lambda pixels: pixels)
        self.targets = self.soft_labels if soft and self.soft_labels is not None else self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.images if self.space == "preprocessed" else self.pixels
        return source[index], self.targets[index]

    def synthetic(self) -> SyntheticSet:
        """The set as pad_ray's evaluation takes it (preprocessed images, learned labels and lr)."""
        return SyntheticSet(self.images, self.soft_labels if self.soft_labels is not None else self.labels, self.lr)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images, "pixels": self.pixels, "labels": self.labels,
               "lr": torch.tensor(self.lr, dtype=torch.float32), **self.preprocessing.tensors()}
        if self.soft_labels is not None:
            out["soft_labels"] = self.soft_labels
        return out


# -- writing ------------------------------------------------------------------------------------

def save_distilled(loc: files.Location, synthetic: SyntheticSet, data: Dataset, cfg: RunConfig,
                   provenance: dict[str, Any]) -> None:
    """Write the best (or any) set of a run as a self-describing file, atomically."""
    images = synthetic.images.detach().cpu().float().contiguous()
    labels = synthetic.labels.detach().cpu()
    soft = labels.dtype.is_floating_point
    if soft:  # Distiller lays its images out class by class, ipc each (distill.initial_images)
        hard = torch.arange(data.num_classes).repeat_interleave(len(images) // data.num_classes)
    else:
        hard = labels.long()
    tensors = {"images": images, "pixels": _pixels(images, data).contiguous(), "labels": hard,
               "lr": torch.tensor(synthetic.lr, dtype=torch.float32), **Preprocessing.of(data).tensors()}
    if soft:
        tensors["soft_labels"] = labels.float().contiguous()
    meta = {"class_names": list(data.class_names), "config": to_dict(cfg),
            "provenance": {"pad_ray_version": software()["pad_ray"], "git_commit": software()["git_commit"], "dataset": data.name,
                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance}}
    files.write_bytes(loc, _serialize(tensors, meta))


def _serialize(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    strings = {"format": FORMAT, **{k: json.dumps(v, sort_keys=True) for k, v in meta.items()}}
    unsigned = save(tensors, strings)
    header, body = _split(unsigned, "serialized set")
    # The tensors' offsets do not depend on the metadata, so the signed file has the same body and table.
    return save(tensors, {**strings, "sha256": _digest(header, body)})


def _split(raw: bytes, name: str) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (JSON) and tensor bytes."""
    if len(raw) < 8:
        raise files.IntegrityError(f"{name}: not a safetensors file ({len(raw)} bytes)")
    size = int.from_bytes(raw[:8], "little")
    if size > len(raw) - 8:
        raise files.IntegrityError(f"{name}: not a safetensors file (header of {size} bytes in {len(raw)})")
    try:
        header = json.loads(raw[8:8 + size])
    except ValueError:
        raise files.IntegrityError(f"{name}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise files.IntegrityError(f"{name}: not a safetensors file (header is not a JSON object)")
    return header, raw[8 + size:]


def _digest(header: dict[str, Any], body: bytes) -> str:
    unsigned = {**header, "__metadata__": {k: v for k, v in header.get("__metadata__", {}).items() if k != "sha256"}}
    return hashlib.sha256(json.dumps(unsigned, sort_keys=True).encode() + body).hexdigest()


# -- reading ------------------------------------------------------------------------------------

def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a distilled set whose checksum matches; anything else is one line."""
    if path.suffix == ".npz":
        raise files.IntegrityError(
            f"{path}: a distilled set of an older pad_ray (.npz: no preprocessing, class names or provenance); "
            f"`pad-ray distill` on the run's config.yaml writes {FILE_NAME} beside it")
    header, body = _split(path.read_bytes(), str(path))
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise files.IntegrityError(f"{path}: not a pad_ray distilled set (format {meta.get('format')!r}, "
                                   f"expected {FORMAT!r})")
    if meta.get("sha256") != _digest(header, body):
        raise files.IntegrityError(f"{path}: checksum mismatch (truncated or altered)")
    try:
        with safe_open(str(path), framework="pt") as handle:  # memory-mapped, then copied out
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        parsed = {key: json.loads(meta[key]) for key in ("class_names", "config", "provenance")}
    except (SafetensorError, KeyError, ValueError) as exc:
        raise files.IntegrityError(f"{path}: damaged distilled set ({type(exc).__name__}: {exc})".splitlines()[0]) \
            from None
    _check(path, tensors, parsed)
    return tensors, parsed


def _check(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    missing = {"images", "pixels", "labels", "lr", "preprocessing.mean"} - set(tensors)
    if missing:
        raise files.IntegrityError(f"{path}: not a complete distilled set (lacks {', '.join(sorted(missing))})")
    images, labels, soft = tensors["images"], tensors["labels"], tensors.get("soft_labels")
    classes = len(meta["class_names"])
    shapes_agree = (images.ndim == 4 and tensors["pixels"].shape == images.shape and labels.shape == (len(images),)
                    and (soft is None or soft.shape == (len(images), classes)))
    if not shapes_agree or labels.dtype != torch.int64 or (len(labels) and not 0 <= int(labels.min())
                                                           <= int(labels.max()) < classes):
        raise files.IntegrityError(f"{path}: inconsistent distilled set (images {list(images.shape)}, labels "
                                   f"{labels.dtype} {list(labels.shape)}, {classes} class names)")


def resolve(source: str, tracking_uri: str | None = None) -> tuple[Path, str | None, tempfile.TemporaryDirectory | None]:
    """The local file a SOURCE names, the MLflow run it came from (for `runs:/` URIs), and the temporary
    folder holding a download (the caller removes it). SOURCE: a distilled file, a run folder or a
    checkpoint holding one, a Tune trial folder (its latest checkpoint), a sweep folder (its best trial),
    or an MLflow artifact URI."""
    download, run_id = None, None
    if not _URI.match(source) and (Path(source) / "results.csv").is_file():
        source = _best_in_sweep(Path(source))
    if _URI.match(source):
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        download = tempfile.TemporaryDirectory(prefix="pad_ray_distilled_")
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=download.name,
                                                             tracking_uri=tracking_uri))
        except (MlflowException, OSError) as exc:
            download.cleanup()
            raise files.IntegrityError(f"{source}: cannot download ({str(exc).splitlines()[0][:300]})") from None
        if source.startswith("runs:/"):
            run_id = source.removeprefix("runs:/").split("/")[0]
    else:
        local = Path(source)
    try:
        return _find(local, source), run_id, download
    except files.IntegrityError:
        if download is not None:
            download.cleanup()
        raise


def _best_in_sweep(folder: Path) -> str:
    """Where a sweep folder's best trial keeps its set: the top row of results.csv, which ranks trials by
    validation accuracy within each IPC, so it is the best only where the sweep has one IPC."""
    with open(folder / "results.csv", newline="", encoding="utf-8", errors="replace") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("distilled_set_uri")]
    if not rows:
        raise files.IntegrityError(f"{folder / 'results.csv'}: no trial has a distilled set")
    ipcs = sorted({row.get("ipc", "") for row in rows}, key=lambda ipc: (len(ipc), ipc))
    if len(ipcs) > 1:
        raise files.IntegrityError(f"{folder}: the sweep has a best set per IPC ({', '.join(ipcs)}); pass the "
                                   "distilled_set_uri of the row you want from its results.csv")
    return rows[0]["distilled_set_uri"]


def _find(local: Path, source: str) -> Path:
    if local.is_file():
        return local
    if not local.is_dir():
        raise files.IntegrityError(f"{source}: no such file or folder")
    if (local / FILE_NAME).is_file():
        return local / FILE_NAME
    # Tune numbers a trial's checkpoints in order; each holds the best set so far, so the latest is the best.
    checkpoints = sorted(p for p in local.glob(f"checkpoint_*/{FILE_NAME}"))
    if checkpoints:
        return checkpoints[-1]
    if (local / "synthetic_best.npz").is_file():
        return local / "synthetic_best.npz"  # refused by _read, with what to do
    raise files.IntegrityError(f"{source}: no distilled set there (expected {FILE_NAME}, or "
                               f"checkpoint_*/{FILE_NAME} in a Tune trial folder)")


def load_distilled(source: str | os.PathLike[str], space: str = "preprocessed", soft: bool = True, *,
                   tracking_uri: str | None = None) -> DistilledSet:
    """Load a distilled set (verified by its checksum) as a torch `Dataset`.

    `source`: a `.safetensors` file, a run folder, a Tune trial folder or checkpoint, a sweep folder
    (its best trial, where the sweep has one IPC), or an MLflow artifact URI
    (`runs:/RUN_ID/distilled_best.safetensors`, resolved with `mlflow.artifacts.download_artifacts`
    against `tracking_uri` or MLflow's default). `space`:
    `preprocessed` (pad_ray's training space; `.transform` preprocesses real test images likewise) or
    `pixels` (`.transform` is the identity). `soft`: targets are the learned logits, else class indices.
    """
    path, run_id, download = resolve(os.fspath(source), tracking_uri)
    try:
        tensors, meta = _read(path)
    finally:
        if download is not None:
            download.cleanup()
    if run_id is not None:
        meta["provenance"].setdefault("mlflow_run_id", run_id)
    return DistilledSet(tensors, meta, space, soft)


def for_evaluation(source: str, data: Dataset, tracking_uri: str | None = None) -> SyntheticSet:
    """The set `pad-ray evaluate --synthetic SOURCE` trains on (SOURCE as `load_distilled`'s): only if it
    was made under the preprocessing of the data it is to be measured on (another split fits another ZCA)."""
    distilled = load_distilled(source, tracking_uri=tracking_uri)
    mine = Preprocessing.of(data)
    theirs = distilled.preprocessing
    same = (theirs.kind == mine.kind and theirs.mean.shape == mine.mean.shape
            and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(theirs.tensors().values(), mine.tensors().values())))
    if list(distilled.images.shape[1:]) != [data.channels, data.image_size, data.image_size] \
            or len(distilled.class_names) != data.num_classes:
        raise files.IntegrityError(f"{source}: a distilled set of {list(distilled.images.shape[1:])} images and "
                                   f"{len(distilled.class_names)} classes, but {data.name} has "
                                   f"{[data.channels, data.image_size, data.image_size]} and {data.num_classes}")
    if not same:
        raise files.IntegrityError(f"{source}: made under another preprocessing ({theirs.kind}) than this config's "
                                   f"({mine.kind}, data.seed/train_per_class/zca decide it); evaluate it with the "
                                   "config in its metadata")
    return distilled.synthetic()


# -- export -------------------------------------------------------------------------------------

def export(source: str, fmt: str, out: Path, tracking_uri: str | None = None) -> Path:
    """Write SOURCE's distilled set to the folder `out`, whole or not at all: it is built in a temporary
    folder beside `out` and renamed into place. `safetensors`: `out/distilled.safetensors`;
    `imagefolder`: one PNG per image in a folder per class (`0_airplane/`, ...: the index prefix makes
    torchvision's alphabetical class order pad_ray's), and `distilled.json` beside them."""
    out = export_target.check(fmt, out)
    distilled = load_distilled(source, tracking_uri=tracking_uri)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if fmt == "safetensors":
            meta = {"class_names": distilled.class_names, "config": distilled.config,
                    "provenance": distilled.provenance}
            (staging / "distilled.safetensors").write_bytes(_serialize(distilled.tensors(), meta))
        else:
            _write_image_folder(distilled, staging)
        os.replace(staging, out)  # onto a missing or empty folder: atomic on one filesystem
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def class_folders(class_names: list[str]) -> list[str]:
    width = len(str(len(class_names) - 1))
    safe = [re.sub(r"[/\\\0]", "_", name) for name in class_names]  # a class name is never a path
    return [f"{i:0{width}d}_{name}" for i, name in enumerate(safe)]


def _write_image_folder(distilled: DistilledSet, folder: Path) -> None:
    from PIL import Image

    # PNG holds 8 bits in [0, 1]: pixels outside it are clamped, the rest rounded to the nearest level.
    levels = (distilled.pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    names = class_folders(distilled.class_names)
    counts = np.zeros(len(names), dtype=int)
    entries = []
    for k, (pixels, label) in enumerate(zip(levels, distilled.labels.tolist())):
        relative = f"{names[label]}/{counts[label]:04d}.png"
        counts[label] += 1
        (folder / names[label]).mkdir(exist_ok=True)
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(folder / relative)
        entry = {"file": relative, "label": label}
        if distilled.soft_labels is not None:
            entry["soft_label"] = distilled.soft_labels[k].tolist()
        entries.append(entry)
    pre = distilled.preprocessing
    sidecar = {
        "format": FORMAT, "lr": distilled.lr, "class_names": distilled.class_names, "class_folders": names,
        "images": entries,
        "preprocessing": {"kind": pre.kind, "mean": pre.mean.tolist(), "std": pre.std.tolist()} if pre.std is not None
        else {"kind": "zca", "note": "the ZCA mean and transform are in the safetensors export"},
        "config": distilled.config, "provenance": distilled.provenance,
    }
    (folder / SIDECAR).write_text(json.dumps(sidecar, indent=2))
