"""What a sweep's driver tells the person watching it: where to look, and that long stages are moving."""

from __future__ import annotations


def addresses(tracking_uri: str, dashboard_url: str | None) -> str:
    """The MLflow UI and Ray dashboard of a sweep, printed at its start: both are where the minutes
    of expert training and the first trials can be followed before the results table arrives."""
    if tracking_uri.startswith(("http://", "https://")):
        mlflow = f"MLflow: {tracking_uri}"
    else:  # a file or sqlite store has no server: the UI must be started on it
        mlflow = f"MLflow: mlflow ui --backend-store-uri {tracking_uri}  (then open http://127.0.0.1:5000)"
    if dashboard_url:
        dashboard = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
        ray_line = f"Ray dashboard: {dashboard}"
    else:
        ray_line = "Ray dashboard: not running on this cluster (ray start --include-dashboard=true)"
    return f"{mlflow}\n{ray_line}"
