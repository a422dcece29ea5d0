"""pad_ray: PAD dataset distillation (trajectory matching with data and parameter alignment) as Ray
Tune sweeps, tracked in MLflow.

    import pad_ray
    cfg = pad_ray.load_config("configs/smoke.yaml")         # a preset plus overrides, validated
    sweep = pad_ray.load_sweep("sweeps/smoke.yaml")         # every trial config checked
    pad_ray.run_sweep(sweep)                                # Ray Tune + MLflow
    best = pad_ray.load_distilled("runs/.../distilled_best.safetensors")  # a torch Dataset, or runs:/ID/...

The single-process algorithm lives in its modules: `from pad_ray.distill import distill` and
`from pad_ray.evaluate import evaluate` (their names stay the modules', as Python binds them); the
`pad-ray` command runs the stages from a config file.
"""

from __future__ import annotations

import importlib
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
    "run_sweep": "pad_ray.tune_sweep",
    "Distiller": "pad_ray.distill",
    "SyntheticSet": "pad_ray.evaluate",
    "random_real_subset": "pad_ray.evaluate",
    "load_synthetic": "pad_ray.local_stages",
    "load_distilled": "pad_ray.distilled",
    "DistilledSet": "pad_ray.distilled",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pad_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
