"""The end of a sweep: a results table (console and CSV, ranked within each IPC), the best config of
each IPC as a ready-to-run YAML (`best_config_ipc10.yaml`; `best_config.yaml` when the sweep has no
groups), and plots of accuracy against alpha per IPC and against IR x AEE per IPC, all logged to the
sweep's parent run. An interrupted sweep's summary says it is partial: a `partial` column in the table
and a `# partial:` line heading each best config."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: sweeps run on headless nodes

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pad_ray import distilled, files  # noqa: E402
from pad_ray.config import to_dict  # noqa: E402
from pad_ray.sweep_config import SweepConfig, trial_config  # noqa: E402

SCORE = "best_val_accuracy"  # selection is on validation, never on test


def _status(result) -> str:
    if result.error:
        return "error"
    if not (result.metrics or {}).get("done"):  # Tune marks the last result of a trial that ended
        return "unfinished"
    return "done" if "final_test_accuracy" in result.metrics else "stopped"


def unfinished(results, sweep: SweepConfig) -> int:
    """Trials of the sweep that have not ended: interrupted ones and those never started."""
    return sum(_status(r) == "unfinished" for r in results) + max(0, sweep.total_trials - len(results))


def results_table(results, sweep: SweepConfig, partial: bool = False) -> pd.DataFrame:
    # A column per evaluated architecture (final_test_accuracy/resnet18, ...), in the order they ran.
    per_architecture = list(dict.fromkeys(
        key for result in results for key in (result.metrics or {})
        if key.startswith(("final_test_accuracy/", "final_test_std/"))))
    rows = []
    for result in results:
        metrics, params = result.metrics or {}, result.config or {}
        pad = {}
        if params:
            cfg = trial_config(sweep, params)
            pad = {"ipc": cfg.distill.ipc, "alpha": cfg.distill.alpha, "ir": cfg.schedule.init_ratio,
                   "aee": cfg.schedule.add_end_epoch, "seed": cfg.seed}
        rows.append({
            "trial_id": metrics.get("trial_id", ""),
            **pad,
            **{key: params.get(key) for key in sweep.trial_keys},
            SCORE: metrics.get(SCORE),
            "best_iteration": metrics.get("best_iteration"),  # 0: no distilled set beat the starting set
            "final_test_accuracy": metrics.get("final_test_accuracy"),
            "final_test_std": metrics.get("final_test_std"),
            **{key: metrics.get(key) for key in per_architecture},
            "iterations": metrics.get("iteration"),
            "status": _status(result),
            "error": str(result.error).strip().splitlines()[-1][:200] if result.error else "",
            "partial": partial,
        })
    return pd.DataFrame(rows)


def plot_alpha(table: pd.DataFrame, path: Path) -> bool:
    if "alpha" not in table or table["alpha"].nunique() < 2:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for ipc, group in table.groupby("ipc"):
        points = group.dropna(subset=[SCORE]).groupby("alpha")[SCORE].max()
        ax.plot(points.index, points.values, marker="o", label=f"IPC {ipc}")
    ax.set(xlabel="alpha (fraction of shallow parameters dropped)", ylabel="best validation accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_ir_aee(table: pd.DataFrame, path: Path) -> bool:
    if not {"ir", "aee"} <= set(table) or table[["ir", "aee"]].drop_duplicates().shape[0] < 2:
        return False
    grid = table.dropna(subset=[SCORE]).pivot_table(index="ir", columns="aee", values=SCORE, aggfunc="max")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    image = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set(xticks=range(len(grid.columns)), xticklabels=grid.columns, yticks=range(len(grid.index)),
           yticklabels=grid.index, xlabel="AEE (epoch hard samples are all added)", ylabel="IR (initial ratio)")
    for (i, j), value in pd.DataFrame(grid.values).stack().items():
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white")
    fig.colorbar(image, label="best validation accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summarize(results, sweep: SweepConfig, where: str, client: MlflowClient, parent_run_id: str,
              partial: bool = False) -> pd.DataFrame:
    """Write the table, best config and plots to `where` (a folder or a URI) and the parent run."""
    if "://" in where:
        with tempfile.TemporaryDirectory() as folder:
            table = _summarize(results, sweep, Path(folder), client, parent_run_id, partial)
            for path in Path(folder).iterdir():
                files.upload(path, f"{where}/{path.name}")
            return table
    return _summarize(results, sweep, Path(where), client, parent_run_id, partial)


def _summarize(results, sweep: SweepConfig, out: Path, client: MlflowClient, parent_run_id: str,
               partial: bool) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    groups = list(sweep.group_by)
    # Ranked within each group (IPC): trials of different IPCs are never compared.
    table = results_table(results, sweep, partial).sort_values([*groups, SCORE], ascending=[True] * len(groups) + [False],
                                                      na_position="last")
    table = _with_mlflow_runs(table, sweep, client, parent_run_id)
    print(table.drop(columns=["mlflow_run_id", "distilled_set_uri"]).to_string(index=False))
    written = [out / "results.csv"]
    table.to_csv(written[0], index=False)
    summary = {"trials": len(table), **{f"trials_{status}": int((table["status"] == status).sum())
                                        for status in ("done", "stopped", "error", "unfinished")}}
    for key, group in (table.groupby(groups, dropna=False) if groups else [((), table)]):
        suffix = "".join(f"_{name}{_plain(value)}" for name, value in zip(groups, key if groups else ()))
        ranked = group.dropna(subset=[SCORE])
        # The parent run's own metrics, so that its charts in MLflow say how each IPC went.
        summary[f"trials{suffix.replace('_', '/', 1)}"] = len(group)
        if not ranked.empty:
            summary[f"{SCORE}{suffix.replace('_', '/', 1)}"] = float(ranked.iloc[0][SCORE])
            if pd.notna(ranked.iloc[0]["final_test_accuracy"]):
                summary[f"best_trial_test_accuracy{suffix.replace('_', '/', 1)}"] = float(
                    ranked.iloc[0]["final_test_accuracy"])
            params = {name: _plain(ranked.iloc[0][name]) for name in sweep.trial_keys}
            written.append(out / f"best_config{suffix}.yaml")
            header = "# partial: true (the sweep was interrupted; best of the trials so far)\n" if partial else ""
            written[-1].write_text(f"{header}# best trial of sweep {sweep.name} by {SCORE}{suffix.replace('_', ' ')}: "
                                   f"{params}\n" + yaml.safe_dump(to_dict(trial_config(sweep, params)), sort_keys=False))
        if plot_ir_aee(group, out / f"accuracy_vs_ir_aee{suffix}.png"):
            written.append(out / f"accuracy_vs_ir_aee{suffix}.png")
    if plot_alpha(table, out / "accuracy_vs_alpha.png"):
        written.append(out / "accuracy_vs_alpha.png")
    client.log_batch(parent_run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in summary.items()])
    for path in written:
        client.log_artifact(parent_run_id, str(path))
    return table


def _with_mlflow_runs(table: pd.DataFrame, sweep: SweepConfig, client: MlflowClient, parent_run_id: str) -> pd.DataFrame:
    """Each trial's MLflow run id and the URI of its distilled set, found by the trial id the callback tags."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = {run.data.tags["trial_id"]: run
            for run in client.search_runs([experiment_id], f"tags.sweep = '{sweep.name}'", max_results=50000)
            if "trial_id" in run.data.tags}
    found = [runs.get(trial_id) for trial_id in table["trial_id"]]
    return table.assign(
        mlflow_run_id=[run.info.run_id if run else "" for run in found],
        distilled_set_uri=[f"{run.info.artifact_uri}/{distilled.FILE_NAME}" if run and status != "error" else ""
                           for run, status in zip(found, table["status"])])


def _plain(value):
    """numpy scalars from pandas back to Python values for YAML and the config."""
    return value.item() if hasattr(value, "item") else value
