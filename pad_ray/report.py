"""The end of a sweep: a results table (console and CSV, ranked within each IPC), the best config of
each IPC as a ready-to-run YAML (`best_config_ipc10.yaml`; `best_config.yaml` when the sweep has no
groups), each IPC's top trial beside its controls (`controls.csv`: random real subsets and its starting
set, `pad_ray.controls`), and plots of accuracy against alpha per IPC and against IR x AEE per IPC, all
logged to the sweep's parent run. An interrupted sweep's summary says it is partial: a `partial` column
in the table and a `# partial:` line heading each best config."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: sweeps run on headless nodes

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pad_ray import distilled, files  # noqa: E402
from pad_ray.config import to_dict  # noqa: E402
from pad_ray.evaluate import Scores  # noqa: E402
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


def printable(table: pd.DataFrame) -> pd.DataFrame:
    """The results table as the sweep prints it: without the long MLflow columns (they are in results.csv), and
    without per-architecture columns that repeat `final_test_accuracy` or `final_test_std` (the first
    architecture's, which is all of them when one is evaluated)."""
    repeats = [column for column in table.columns if column.startswith(("final_test_accuracy/", "final_test_std/"))
               and table[column].equals(table[column.split("/", 1)[0]])]
    return table.drop(columns=[c for c in ("mlflow_run_id", "distilled_set_uri") if c in table] + repeats)


def ranked_table(results, sweep: SweepConfig, partial: bool = False) -> pd.DataFrame:
    """The results table ranked by validation within each group (IPC): trials of different IPCs are never
    compared."""
    groups = list(sweep.group_by)
    return results_table(results, sweep, partial).sort_values(
        [*groups, SCORE], ascending=[True] * len(groups) + [False], na_position="last")


@dataclass(frozen=True)
class Top:
    """A group's top trial by validation."""

    group: dict[str, Any]  # its values of the group keys: {"ipc": 10}, or {} when the sweep has no groups
    params: dict[str, Any]  # its trial params, by their sweep names
    row: pd.Series  # its row of the results table

    @property
    def suffix(self) -> str:
        return _suffix(self.group)


def _suffix(group: dict[str, Any]) -> str:
    """`_ipc10` for the group {"ipc": 10}, as file names end; metric names end in `/ipc10`."""
    return "".join(f"_{name}{value}" for name, value in group.items())


def top_trials(table: pd.DataFrame, sweep: SweepConfig) -> list[Top]:
    """The top trial of each group of a ranked table that has a scored trial."""
    groups = list(sweep.group_by)
    tops = []
    for key, group in (table.groupby(groups, dropna=False) if groups else [((), table)]):
        ranked = group.dropna(subset=[SCORE])
        if not ranked.empty:
            row = ranked.iloc[0]
            tops.append(Top(dict(zip(groups, map(_plain, key))), {name: _plain(row[name]) for name in sweep.trial_keys},
                            row))
    return tops


def controls_table(tops: list[Top], controls: list[dict[str, list[float]]]) -> pd.DataFrame:
    """Each group's top trial beside its controls (test accuracy, mean and std over every net), and its lead
    over each (NaN where the trial was stopped before its final evaluation)."""
    rows = []
    for top, by_kind in zip(tops, controls):
        row = {**top.group, "trial_id": top.row["trial_id"], "final_test_accuracy": top.row["final_test_accuracy"],
               "final_test_std": top.row["final_test_std"]}
        for kind, tests in by_kind.items():
            mean, std = Scores.summary(tests)
            row.update({f"{kind}_test_accuracy": mean, f"{kind}_test_std": std, f"{kind}_nets": len(tests),
                        f"lead_over_{kind}": row["final_test_accuracy"] - mean})
        rows.append(row)
    return pd.DataFrame(rows)


def plot_controls(against: pd.DataFrame, groups: list[str], path: Path) -> None:
    """Per group: the top trial's final test accuracy beside its controls' (error bars: std over nets), and
    its lead over each in points, where differences of tenths at large IPCs show."""
    bars = [(kind, label, f"C{k}") for k, (kind, label) in enumerate(
        (("final", "top trial"), ("start", "its starting set"), ("random", "random real subsets")))
        if f"{kind}_test_accuracy" in against]
    names = ([" ".join(f"{g} {_plain(v)}" for g, v in zip(groups, values))
              for values in zip(*(against[g] for g in groups))] if groups else ["all trials"])

    def slots(k: int, of: int) -> dict[str, Any]:
        """Where the k-th of `of` bars stands beside each group's tick."""
        return {"x": [i + (k - (of - 1) / 2) * 0.8 / of for i in range(len(names))], "width": 0.8 / of}

    fig, (level, lead) = plt.subplots(1, 2, figsize=(3 + 1.6 * len(names), 3.5))
    for k, (kind, label, color) in enumerate(bars):
        level.bar(**slots(k, len(bars)), height=against[f"{kind}_test_accuracy"], yerr=against[f"{kind}_test_std"],
                  capsize=3, label=label, color=color)
    for k, (kind, _, color) in enumerate(bars[1:]):
        lead.bar(**slots(k, len(bars) - 1), height=100 * against[f"lead_over_{kind}"], color=color)
    level.set(xticks=range(len(names)), xticklabels=names, ylabel="test accuracy (final evaluation)")
    level.legend(fontsize="small", loc="lower left")
    lead.axhline(0, color="black", linewidth=0.8)
    lead.set(xticks=range(len(names)), xticklabels=names, ylabel="top trial's lead (points)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def summarize(table: pd.DataFrame, tops: list[Top], controls: list[dict[str, list[float]]], sweep: SweepConfig,
              where: str, client: MlflowClient, parent_run_id: str, partial: bool = False) -> pd.DataFrame:
    """Write the ranked table, the best config of each of its `tops` (`top_trials(table)`), their controls
    (one for each top, in order; none for an interrupted sweep) and plots to `where` (a folder or a URI) and
    the parent run."""
    if "://" in where:
        with tempfile.TemporaryDirectory() as folder:
            table = _summarize(table, tops, controls, sweep, Path(folder), client, parent_run_id, partial)
            for path in Path(folder).iterdir():
                files.upload(path, f"{where}/{path.name}")
            return table
    return _summarize(table, tops, controls, sweep, Path(where), client, parent_run_id, partial)


def _summarize(table: pd.DataFrame, tops: list[Top], controls: list[dict[str, list[float]]], sweep: SweepConfig,
               out: Path, client: MlflowClient, parent_run_id: str, partial: bool) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    groups = list(sweep.group_by)
    table = _with_mlflow_runs(table, sweep, client, parent_run_id)
    print(printable(table).to_string(index=False))
    written = [out / "results.csv"]
    table.to_csv(written[0], index=False)
    # The parent run's own metrics, so that its charts in MLflow say how each IPC went.
    summary = {"trials": len(table), **{f"trials_{status}": int((table["status"] == status).sum())
                                        for status in ("done", "stopped", "error", "unfinished")}}
    for key, group in (table.groupby(groups, dropna=False) if groups else [((), table)]):
        suffix = _suffix(dict(zip(groups, map(_plain, key))))
        summary[f"trials{suffix.replace('_', '/', 1)}"] = len(group)
        if plot_ir_aee(group, out / f"accuracy_vs_ir_aee{suffix}.png"):
            written.append(out / f"accuracy_vs_ir_aee{suffix}.png")
    for top in tops:
        at = top.suffix.replace("_", "/", 1)
        summary[f"{SCORE}{at}"] = float(top.row[SCORE])
        if pd.notna(top.row["final_test_accuracy"]):
            summary[f"best_trial_test_accuracy{at}"] = float(top.row["final_test_accuracy"])
        written.append(out / f"best_config{top.suffix}.yaml")
        header = "# partial: true (the sweep was interrupted; best of the trials so far)\n" if partial else ""
        written[-1].write_text(f"{header}# best trial of sweep {sweep.name} by {SCORE}{top.suffix.replace('_', ' ')}: "
                               f"{top.params}\n" + yaml.safe_dump(to_dict(trial_config(sweep, top.params)),
                                                                   sort_keys=False))
    if controls:
        against = controls_table(tops, controls)
        print("\nEach top trial against its controls (test accuracy under its final evaluation: random real subsets "
              "of its size, hard labels; its starting set):")
        print(against.to_string(index=False))
        written.append(out / "controls.csv")
        against.to_csv(written[-1], index=False)
        written.append(out / "controls.png")
        plot_controls(against, groups, written[-1])
        for top, (_, row) in zip(tops, against.iterrows()):
            at = top.suffix.replace("_", "/", 1)
            for kind in controls[0]:
                for metric, column in ((f"control_{kind}_test_accuracy", f"{kind}_test_accuracy"),
                                       (f"control_{kind}_test_std", f"{kind}_test_std"),
                                       (f"lead_over_{kind}", f"lead_over_{kind}")):
                    if pd.notna(row[column]):
                        summary[f"{metric}{at}"] = float(row[column])
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
