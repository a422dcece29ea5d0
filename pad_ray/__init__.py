"""pad_ray: PAD dataset distillation (trajectory matching with data and parameter alignment) as Ray
Tune sweeps, tracked in MLflow.

    import pad_ray
    cfg = pad_ray.load_config("configs/smoke.yaml")         # a preset plus overrides, validated
    sweep = pad_ray.load_sweep("sweeps/smoke.yaml")         # every trial config checked
    pad_ray.run_sweep(sweep)                                # Ray Tune + MLflow
    best = pad_ray.load_synthetic("runs/.../synthetic_best.npz")

`distill(cfg, data, trajectories, device)` and `evaluate(...)` are the single-process algorithm; the
`pad-ray` command runs its stages from a config file.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# Public name -> the module defining it. Imported on first use: torch, Ray and MLflow take seconds
# to import, and `pad-ray --help` or a config check should not wait for them.
_EXPORTS = {
    "ConfigError": "pad_ray.config",
    "RunConfig": "pad_ray.config",
    "build_config": "pad_ray.config",
    "load_config": "pad_ray.config",
    "SweepConfig": "pad_ray.sweep_config",
    "load_sweep": "pad_ray.sweep_config",
    "run_sweep": "pad_ray.sweep",
    "Distiller": "pad_ray.distill",
    "distill": "pad_ray.distill",
    "SyntheticSet": "pad_ray.evaluate",
    "evaluate": "pad_ray.evaluate",
    "load_synthetic": "pad_ray.stages",
}

__all__ = sorted(_EXPORTS)

# `distill` and `evaluate` are functions here and also the names of their modules.
_NAMED_LIKE_A_MODULE = {"distill", "evaluate"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pad_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a submodule binds it on its package, which would turn `pad_ray.distill` from the
        # function into the module depending on what happened to be imported first. The modules stay
        # reachable by their full names (`from pad_ray.distill import Distiller`).
        if name in _NAMED_LIKE_A_MODULE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
