"""Where randomness and compute come from: derived seeds and the device."""

from __future__ import annotations

import hashlib
import resource

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
