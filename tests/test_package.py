"""The package's public API: every exported name resolves, and importing pad_ray costs nothing."""

import subprocess
import sys

import pad_ray


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_the_package_loads_no_torch_ray_or_mlflow():
    loaded = _python("import sys, pad_ray; print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))")
    assert loaded == "[]"


def test_a_trial_process_loads_no_mlflow_or_plotting():
    """Tune unpickles `pad_trial` by its module in every trial actor; the driver's MLflow and the report's
    plotting stay in the driver."""
    loaded = _python("import sys, pad_ray.trial; "
                     "print(sorted({'mlflow', 'matplotlib', 'pad_ray.tracking', 'pad_ray.report'} & set(sys.modules)))")
    assert loaded == "[]"


def test_every_export_resolves():
    from pad_ray.config import load_config
    from pad_ray.distill import Distiller
    from pad_ray.local_stages import load_synthetic

    assert pad_ray.load_config is load_config and pad_ray.Distiller is Distiller
    assert pad_ray.load_synthetic is load_synthetic
    for name in pad_ray.__all__:
        assert callable(getattr(pad_ray, name)), name
    assert set(pad_ray.__all__) <= set(dir(pad_ray))
