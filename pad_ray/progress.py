"""What a sweep's driver tells the person watching it: where to look, and that long stages are moving."""

from __future__ import annotations


def addresses(mlflow_link: str, dashboard_url: str | None) -> str:
    """The MLflow UI (`tracking.ui_link`) and Ray dashboard of a sweep, printed at its start: both are where
    the minutes of expert training and the first trials can be followed before the results table arrives."""
    mlflow = f"MLflow: {mlflow_link}"
    if dashboard_url:
        dashboard = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
        ray_line = f"Ray dashboard: {dashboard}"
    else:
        ray_line = "Ray dashboard: not running on this cluster (ray start --include-dashboard=true)"
    return f"{mlflow}\n{ray_line}"
