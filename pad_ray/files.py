"""Plain-array files written atomically and read back only if their checksum matches.

A location is a local path (`str` or `Path`) or any fsspec URI (`s3://bucket/x`, `gs://...`,
`memory://...`, `file:///...`). Nothing here unpickles: arrays are `.npy`/`.npz` read with
`allow_pickle=False`, metadata is JSON, and checkpoints go through `torch.load(weights_only=True)`.

Atomicity: on local disk a file is written to a temporary file in the same directory, fsynced and
renamed over its name. Object stores (S3, GCS) have no rename but make each object appear whole or
not at all, so there the bytes are built in memory and written with one `pipe_file` call. Other
remote filesystems (SFTP, HDFS, ...) get the same single write, which they may not make atomic.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pad_ray.config import ConfigError

Location = str | os.PathLike[str]  # a local path or an fsspec URI


class IntegrityError(RuntimeError):
    """A stored file is missing, truncated or altered: it is never used."""


_LOCAL = LocalFileSystem()


def _resolve(loc: Location) -> tuple[AbstractFileSystem, str, bool]:
    """The filesystem holding `loc`, the path within it, and whether that is the local disk.

    A `Path` is always local (it cannot spell a URI: `s3://b` collapses to `s3:/b`), so a local
    name that happens to contain `::` or `://` is never taken for a remote one. A string goes to
    fsspec: a URI names its filesystem, a plain path (or `file://`) the local disk.
    """
    if isinstance(loc, os.PathLike):
        return _LOCAL, os.path.abspath(loc), True
    fs, path = url_to_fs(loc)
    return fs, path, isinstance(fs, LocalFileSystem)


def join(root: Location, *parts: str) -> Path | str:
    """`root/part/...`: a `Path` on local disk (as callers always had), a URI string elsewhere.

    Names are canonical, so `file:///x` and `/x` (or `memory://x` and `memory:///x`) give equal names.
    """
    fs, path, local = _resolve(root)
    if local:
        return Path(path, *parts)
    return fs.unstrip_protocol(posixpath.join(path, *parts))


def exists(loc: Location) -> bool:
    fs, path, _ = _resolve(loc)
    return fs.isfile(path)


def is_dir(loc: Location) -> bool:
    fs, path, _ = _resolve(loc)
    return fs.isdir(path)


def move(source: Location, target: Location) -> None:
    """Rename a folder (a copy and a delete on object stores, which cannot rename)."""
    fs, path, _ = _resolve(source)
    fs.mv(path, _resolve(target)[1], recursive=True)


def remove(loc: Location) -> None:
    """Delete `loc` if it is there."""
    fs, path, _ = _resolve(loc)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def _write(loc: Location, write: Callable[[BinaryIO], None]) -> str:
    """Write `loc` atomically (see the module docstring); returns the sha256 of what was written.

    The digest is of our own bytes (the temporary file before its rename, or the in-memory buffer),
    so it never describes a file another writer put there in between, and is never a re-download.
    """
    fs, path, local = _resolve(loc)
    if not local:
        buffer = io.BytesIO()
        write(buffer)  # a failure here leaves the object untouched: nothing was sent yet
        data = buffer.getvalue()
        fs.pipe_file(path, data)
        return hashlib.sha256(data).hexdigest()
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        digest = sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def _verified(loc: Location, expected_sha256: str | None) -> str | io.BytesIO:
    """What `np.load`/`torch.load` should read once the checksum (if given) matches: the local path,
    so it can be memory-mapped, or a remote object's bytes, fetched once and hashed in memory (so the
    bytes checked are the bytes used)."""
    fs, path, local = _resolve(loc)
    if local:
        if not fs.isfile(path):
            raise IntegrityError(f"{loc}: missing")
        if expected_sha256 is not None and sha256(path) != expected_sha256:
            raise IntegrityError(f"{loc}: checksum mismatch (truncated or altered)")
        return path
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise IntegrityError(f"{loc}: missing") from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise IntegrityError(f"{loc}: checksum mismatch (truncated or altered)")
    return io.BytesIO(data)


def check_writable(loc: Location, key: str) -> None:
    """Fail early, and without creating anything, when a local output location cannot be written."""
    fs, path, local = _resolve(loc)
    if not local:
        return  # object stores are checked by their first write
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write under {path} ({existing} is not a writable directory)")


def upload(local: Path, loc: Location) -> None:
    """Copy a finished local file to a location (object stores get it in one write)."""
    _write(loc, lambda handle: handle.write(Path(local).read_bytes()))


def write_bytes(loc: Location, data: bytes) -> str:
    """Write `data` to `loc` atomically; returns its sha256."""
    return _write(loc, lambda handle: handle.write(data))


def sha256(loc: Location) -> str:
    """Streamed in 4 MiB blocks, so a 1 GB trajectory is never held whole just to hash it."""
    fs, path, _ = _resolve(loc)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(loc: Location, data: Any) -> None:
    _write(loc, lambda h: h.write(json.dumps(data, indent=2, sort_keys=True).encode()))


def read_json(loc: Location) -> Any:
    fs, path, _ = _resolve(loc)
    return json.loads(fs.cat_file(path))


def read_checksum(sidecar: Location) -> str:
    """The sha256 a JSON sidecar records; anything else there (binary, truncated, a folder) is damage."""
    try:
        digest = read_json(sidecar)["sha256"]
    except FileNotFoundError:
        raise IntegrityError(f"{sidecar}: missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        raise IntegrityError(f"{sidecar}: not a checksum file ({type(exc).__name__})") from None
    if not isinstance(digest, str):
        raise IntegrityError(f"{sidecar}: not a checksum file (sha256 is not a string)")
    return digest


def save_array(loc: Location, array: np.ndarray) -> str:
    """Save one array as `.npy`; returns its sha256."""
    return _write(loc, lambda h: np.save(h, np.ascontiguousarray(array), allow_pickle=False))


def load_array(loc: Location, expected_sha256: str, mmap: bool = True) -> np.ndarray:
    """Load an `.npy` whose sha256 must match. With `mmap` the result is read-only: memory-mapped
    from local disk (zero-copy), or an in-memory copy of a remote object marked read-only alike."""
    source = _verified(loc, expected_sha256)
    try:
        if isinstance(source, str):
            return np.load(source, mmap_mode="r" if mmap else None, allow_pickle=False)
        array = np.load(source, allow_pickle=False)
    except (ValueError, OSError) as exc:  # a pickle or anything else that is not a plain .npy
        raise IntegrityError(f"{loc}: not a plain-array file ({exc})") from None
    array.flags.writeable = not mmap
    return array


def save_arrays(loc: Location, **arrays: np.ndarray) -> str:
    """Save several arrays as one `.npz`; returns its sha256."""
    return _write(loc, lambda h: np.savez(h, **arrays))


def load_arrays(loc: Location, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    source = _verified(loc, expected_sha256)
    try:
        with np.load(source, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError) as exc:
        raise IntegrityError(f"{loc}: not a plain-array file ({exc})") from None


def save_torch(loc: Location, state: dict[str, Any]) -> None:
    """Checkpoints: tensors and plain Python values only, so `weights_only=True` can read them back."""
    import torch  # here, not at the top: the CLI's output checks use this module before torch is needed

    _write(loc, lambda h: torch.save(state, h))


def load_torch(loc: Location) -> dict[str, Any]:
    import torch

    source = _verified(loc, None)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused or file damaged: never used
        raise IntegrityError(f"{loc}: unreadable checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from None
