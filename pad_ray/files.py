"""Plain-array files written atomically and read back only if their checksum matches.

Nothing here unpickles: arrays are `.npy`/`.npz` read with `allow_pickle=False`, metadata is JSON,
and checkpoints go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


class IntegrityError(RuntimeError):
    """A stored file is missing, truncated or altered: it is never used."""


def _atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    _atomic(Path(path), lambda h: h.write(json.dumps(data, indent=2, sort_keys=True).encode()))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_array(path: Path, array: np.ndarray) -> str:
    """Save one array as `.npy`; returns its sha256."""
    _atomic(Path(path), lambda h: np.save(h, np.ascontiguousarray(array), allow_pickle=False))
    return sha256(Path(path))


def load_array(path: Path, expected_sha256: str, mmap: bool = True) -> np.ndarray:
    """Load an `.npy` whose sha256 must match; memory-mapped by default (read-only)."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path}: missing")
    if sha256(path) != expected_sha256:
        raise IntegrityError(f"{path}: checksum mismatch (truncated or altered)")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def save_arrays(path: Path, **arrays: np.ndarray) -> str:
    """Save several arrays as one `.npz`; returns its sha256."""
    _atomic(Path(path), lambda h: np.savez(h, **arrays))
    return sha256(Path(path))


def load_arrays(path: Path, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path}: missing")
    if expected_sha256 is not None and sha256(path) != expected_sha256:
        raise IntegrityError(f"{path}: checksum mismatch (truncated or altered)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError) as exc:
        raise IntegrityError(f"{path}: not a plain-array file ({exc})") from None


def save_torch(path: Path, state: dict[str, Any]) -> None:
    """Checkpoints: tensors and plain Python values only, so `weights_only=True` can read them back."""
    _atomic(Path(path), lambda h: torch.save(state, h))


def load_torch(path: Path) -> dict[str, Any]:
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused or file damaged: never used
        raise IntegrityError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from None
