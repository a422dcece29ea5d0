"""Where randomness and compute come from: derived seeds and the device."""

from __future__ import annotations

import ctypes
import hashlib
import resource
import sys

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
        raise ConfigError("device: cuda requested but no CUDA device is available")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: max allocated on CUDA, max resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
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
