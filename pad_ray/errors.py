"""How bad input reaches the user: one line naming the file and the key, exit code 2, no traceback.

Shared by `pad-ray` and `python -m pad_ray.sweep`. It imports neither torch nor Ray, so that a config
error, `pad-ray validate` and `pad-ray --help` answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pad_ray.config import ConfigError


def input_error_types() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input rather than a bug: ConfigError, and the dataset and store
    errors once their modules are loaded. A module never imported cannot have raised its error, and
    importing torch just to name the class would make every config error wait for it."""
    types: list[type[Exception]] = [ConfigError]
    data, files = sys.modules.get("pad_ray.data"), sys.modules.get("pad_ray.files")
    if data is not None:
        types.append(data.DataError)
    if files is not None:
        types.append(files.IntegrityError)
    return tuple(types)


def input_error(exc: Exception, source: Path) -> str:
    """One line naming the file and the key, also for errors found after the config was read."""
    message = str(exc).splitlines()[0]
    data, files = sys.modules.get("pad_ray.data"), sys.modules.get("pad_ray.files")
    if data is not None and isinstance(exc, data.DataError):
        message = f"data.root: {message}"
    if not ((files is not None and isinstance(exc, files.IntegrityError)) or message.startswith(str(source))):
        message = f"{source}: {message}"
    more = len(getattr(exc, "errors", ())) - 1
    if more > 0:
        message += f" (and {more} more: pad-ray validate {source} lists them all)"
    return message
