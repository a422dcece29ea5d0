"""The durable, content-addressed store of difficulty orders and expert trajectories.

An expert set lives in a directory named by a hash of everything that determines its experts
(data, preprocessing and split seed, model, difficulty, schedule, expert optimiser, epochs and
seed; never the distillation seed), so no two runs train the same experts twice and a run asking
for more experts trains only the missing ones.
Each expert is one `.npy` [epochs + 1, P] plus a JSON sidecar with its checksum, written atomically;
a file whose checksum does not match is treated as missing.

The store's root is a local directory or an fsspec URI (`s3://bucket/store`, `gs://...`), so workers
on several machines can share one store; locations below it are built with `files.join`, which gives
a `Path` on local disk and a URI string elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pad_ray import files
from pad_ray.config import DEFAULT_DSA_STRATEGY, RunConfig, to_dict


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


# Bumped whenever the networks' parameter layout changes, so that stores of the old layout are not reused.
MODEL_LAYOUT = 2  # 2: 28x28 inputs padded to 32x32 in the ConvNet's first layer


def difficulty_identity(cfg: RunConfig) -> dict[str, Any]:
    data = to_dict(cfg.data)  # data.seed included: it draws the split and seeds the EL2N runs
    data.pop("root")  # where the files are does not change what they hold
    data.pop("test_size")  # the test subset is drawn from a generator of its own (data.prepare)
    identity = {"data": data, "model": to_dict(cfg.model)}
    if cfg.difficulty.index_file:
        identity["index_file_sha256"] = files.sha256(Path(cfg.difficulty.index_file))  # a Path: read from local disk
    else:
        # EL2N trains the agent model, so its scores change with the model's parameter layout too.
        identity.update(difficulty=to_dict(cfg.difficulty), model_layout=MODEL_LAYOUT)
    return identity


def expert_identity(cfg: RunConfig) -> dict[str, Any]:
    experts = to_dict(cfg.experts)  # experts.seed included
    experts.pop("num_experts")  # more experts extend the same set
    experts.pop("compile")  # how they run, like the device and the thread count, which change only the last bits
    identity = {**difficulty_identity(cfg), "schedule": to_dict(cfg.schedule), "experts": experts,
                "model_layout": MODEL_LAYOUT}
    # Only a strategy other than the default is named: stores from before augment.strategy existed
    # trained with the default and keep their keys. EL2N does not augment, so the scores keep theirs.
    if cfg.experts.dsa and cfg.augment.strategy != DEFAULT_DSA_STRATEGY:
        identity["augment"] = to_dict(cfg.augment)
    return identity


class DifficultyCache:
    """Per-class easy -> hard orders, one `.npz` per identity."""

    def __init__(self, root: files.Location, cfg: RunConfig):
        self.identity = difficulty_identity(cfg)
        digest = _digest(self.identity)
        self.path = files.join(root, "difficulty", f"{digest}.npz")
        self.sidecar = files.join(root, "difficulty", f"{digest}.json")

    def load(self) -> list[torch.Tensor] | None:
        if not files.exists(self.sidecar):
            return None
        try:
            arrays = files.load_arrays(self.path, files.read_json(self.sidecar)["sha256"])
        except (files.IntegrityError, ValueError, KeyError, TypeError, OSError):
            return None
        return [torch.from_numpy(arrays[f"class_{c}"]) for c in range(len(arrays))]

    def save(self, order: list[torch.Tensor]) -> None:
        digest = files.save_arrays(self.path, **{f"class_{c}": o.numpy() for c, o in enumerate(order)})
        files.write_json(self.sidecar, {"sha256": digest, "identity": self.identity})


class TrajectoryStore:
    """One expert set: `expert_00007.npy` + `expert_00007.json` per expert, and `identity.json`."""

    def __init__(self, root: files.Location, cfg: RunConfig):
        self.identity = expert_identity(cfg)
        self.key = _digest(self.identity)
        self.dir = files.join(root, "experts", self.key)

    def _paths(self, index: int) -> tuple[Path | str, Path | str]:
        stem = f"expert_{index:05d}"
        return files.join(self.dir, f"{stem}.npy"), files.join(self.dir, f"{stem}.json")

    def is_valid(self, index: int) -> bool:
        """True when expert `index` is stored whole; its checksum is verified."""
        array_path, sidecar = self._paths(index)
        if not (files.exists(array_path) and files.exists(sidecar)):
            return False
        try:
            return files.sha256(array_path) == files.read_json(sidecar)["sha256"]
        except (ValueError, KeyError, TypeError, OSError):
            return False

    def missing(self, count: int) -> list[int]:
        return [i for i in range(count) if not self.is_valid(i)]

    def save(self, index: int, trajectory: np.ndarray, resumed_at: list[int] | None = None,
             quality: dict[str, Any] | None = None) -> None:
        """Store a finished expert; `resumed_at` records the epochs it was resumed from after failures,
        `quality` its per-epoch loss and validation accuracy and its final accuracies."""
        identity = files.join(self.dir, "identity.json")
        if not files.exists(identity):
            files.write_json(identity, self.identity)
        array_path, sidecar = self._paths(index)
        trajectory = np.asarray(trajectory, dtype=np.float32)
        digest = files.save_array(array_path, trajectory)
        files.write_json(sidecar, {"sha256": digest, "shape": list(trajectory.shape),
                                   "resumed_at": resumed_at or [], **({"quality": quality} if quality else {})})
        files.remove(self.partial_path(index))

    def info(self, index: int) -> dict[str, Any]:
        return files.read_json(self._paths(index)[1])

    def quality(self, count: int) -> ExpertQuality:
        return ExpertQuality(self.key, [self.info(i).get("quality") for i in range(count)])

    # An expert in training checkpoints here after every epoch, so a killed worker loses one epoch.
    def partial_path(self, index: int) -> Path | str:
        return files.join(self.dir, "partial", f"expert_{index:05d}.pt")

    def save_partial(self, index: int, state: dict[str, Any]) -> None:
        files.save_torch(self.partial_path(index), state)

    def load_partial(self, index: int) -> dict[str, Any] | None:
        path = self.partial_path(index)
        if not files.exists(path):
            return None
        try:
            return files.load_torch(path)
        except files.IntegrityError:
            return None

    def load(self, index: int) -> np.ndarray:
        """The trajectory [epochs + 1, P], read-only (memory-mapped from local disk, read into memory
        from a remote store); IntegrityError if damaged."""
        array_path, sidecar = self._paths(index)
        if not files.exists(sidecar):
            raise files.IntegrityError(f"{sidecar}: missing")
        return files.load_array(array_path, files.read_json(sidecar)["sha256"])


@dataclass(frozen=True)
class ExpertQuality:
    """The stored accuracy of each expert of a set (None for experts stored before it was recorded)."""

    key: str
    experts: list[dict[str, Any] | None]

    def mean(self, name: str) -> float:
        values = [q[name] for q in self.experts if q is not None]
        return float(np.mean(values)) if values else float("nan")

    def summary(self) -> dict[str, float]:
        return {name: self.mean(name) for name in ("train_accuracy", "final_val_accuracy", "test_accuracy")}

    def line(self) -> str:
        """One line a user reads to see at once whether the experts are any good."""
        tests = [q["test_accuracy"] for q in self.experts if q is not None]
        if not tests:
            return f"experts {self.key}: {len(self.experts)} experts, accuracy not recorded"
        s = self.summary()
        return (f"experts {self.key}: {len(self.experts)} experts, test accuracy {100 * s['test_accuracy']:.1f}% "
                f"(min {100 * min(tests):.1f}%, max {100 * max(tests):.1f}%), validation "
                f"{100 * s['final_val_accuracy']:.1f}%, train {100 * s['train_accuracy']:.1f}%")
