"""Where randomness and compute come from: derived seeds and the device."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import resource
import subprocess
import sys
from pathlib import Path

import torch

from pad_ray.config import ConfigError


def derive_seed(seed: int, *tags: object) -> int:
    """A stable 31-bit seed for one purpose (e.g. `derive_seed(cfg.seed, "expert", 3)`).

    Hashing keeps streams independent: expert 3 gets the same draws however many experts exist.
    """
    text = "/".join(str(t) for t in (seed, *tags))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def generator(seed: int) -> torch.Generator:
    """A CPU generator: draws are made on the CPU so results do not depend on the device."""
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: cuda requested but no CUDA device is available ({cuda_unusable_reason()})")
    return torch.device(name)


def cuda_unusable_reason() -> str | None:
    """Why torch cannot run on CUDA in this process (one line), or None when it can."""
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} is built without CUDA"
    try:
        # is_available() only says no; initialising gives the driver's or the runtime's own reason.
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError or AssertionError, both a reason
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if torch.cuda.device_count() == 0:
        return "torch sees no CUDA device"
    return None


def visible_cuda_index(gpu_ids: list, visible: str | None) -> int:
    """torch's index of the first GPU Ray assigned, among the devices CUDA_VISIBLE_DEVICES shows.

    Ray Train shows each worker every GPU its node's workers hold (so they could use NCCL), in
    the order of Ray's ids: the second worker on a 2-GPU node sees "0,1" and must use index 1, not
    `cuda` (index 0, the first worker's GPU). Tasks and Tune trials see only their own GPU: index 0.
    """
    shown = [d.strip() for d in (visible or "").split(",") if d.strip()]
    if gpu_ids and str(gpu_ids[0]) in shown:
        return shown.index(str(gpu_ids[0]))
    return 0


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory this process held: on CUDA what its caching allocator reserved from the device,
    on the CPU the max resident set size.

    Reserved rather than allocated, because reserved is what other processes sharing the GPU
    (fractional trials) cannot have; allocated leaves out the allocator's cached and fragmented
    blocks, as RSS on the CPU does not leave out glibc's.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_heap_reuse = {"done": False}


def keep_freed_memory_in_heap() -> bool:
    """Make glibc keep freed large blocks in the heap for reuse instead of unmapping them (once per process).

    glibc serves every block above 32 MiB with its own mmap and unmaps it on free, so each of the
    step's large activation buffers (a [100, 128, 32, 32] float32 tensor is 52 MB) is fresh memory
    that the kernel must fault in and zero again, step after step: about 40% of the CPU time of an
    iteration on a 2-core machine (BENCHMARKS.md). With mmap off and heap trimming only
    above 2 GiB, freed buffers are reused. Numerics are untouched; the process keeps its peak heap
    instead of returning freed memory to the system. A no-op where the C library is not glibc.
    Returns whether the setting was applied (now or before).
    """
    if _heap_reuse["done"]:
        return bool(_heap_reuse.get("applied"))
    _heap_reuse["done"] = True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    _heap_reuse["applied"] = applied
    return applied


@functools.lru_cache(maxsize=1)
def software() -> dict[str, str | None]:
    """pad_ray's and its main libraries' versions (None: not installed), and pad_ray's git commit when it
    runs from a checkout (an installed wheel or a Ray job's copied working dir has none: None)."""
    from importlib import metadata

    found: dict[str, str | None] = {}
    for package in ("pad_ray", "ray", "torch", "torchvision", "mlflow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)
        found["git_commit"] = commit.stdout.strip() if commit.returncode == 0 and commit.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        found["git_commit"] = None
    return found
