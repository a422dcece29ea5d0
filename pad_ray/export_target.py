"""Where and how `pad-ray export` may write, checked without torch so that a refused command answers at once."""

from __future__ import annotations

from pathlib import Path

from pad_ray import files
from pad_ray.config import ConfigError

FORMATS = ("safetensors", "imagefolder")


def check(fmt: str, out: Path) -> Path:
    """The absolute folder to create; refused unless `fmt` is a format and `out` is missing or empty and writable."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not a format; allowed: {', '.join(FORMATS)}")
    out = Path(out).absolute()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not an empty folder (nothing is overwritten)")
    files.check_writable(out, "--out")
    return out
