"""Sweep start-up overhead and MLflow logging cost.

    python3 benchmarks/sweep_overhead.py [--quick]

Part 1: `python -m pad_ray.sweep` on a one-trial sweep derived from `sweeps/smoke.yaml` (real MNIST
from ../shared/data, outputs in a temp dir). The first invocation trains the EL2N order and the
experts into the store; the next ones (new sweep names, same store and MLflow database) find them
cached. For those, the phases from the command's start are read back from what the sweep leaves:
the parent MLflow run's start (validation, data, `ray.init`, experts, object store done), the trial's
MLflow run start (Tune started the trial), the trial function's start (first result's timestamp
minus its `time_total_s`, from Tune's result.json) and the first `tune.report` (first metric in
MLflow, logged by the driver's callback when the result arrives).

Part 2: the smoke sweep's whole space (8 trials, two at a time, ASHA stopping most early) with the
experts cached, run with Tune's `reuse_actors` off and on, alternately: a finished trial's actor taking
the next trial saves a process start and torch's import per trial. Rows: the command's wall time, the
span from the first trial's MLflow run start to the last one's end, and the results table, which must
be the same both ways.

Part 3: the cost of logging one reported result, `MlflowSweepCallback.on_trial_result` (batched
`log_batch`) vs one `log_metric` call per value, into a sqlite store, for results carrying the
per-iteration statistics of 4, 100 and 500 iterations (smoke, mnist and the paper presets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "sweep_overhead"
DATA = common.REPO.parent / "shared" / "data"


def _sweep_yaml(folder: Path, name: str, quick: bool, whole_space: bool = False, **top) -> Path:
    """sweeps/smoke.yaml as `name`: one trial of 8 iterations, or (`whole_space`) its own space and length."""
    import yaml

    sweep = yaml.safe_load((common.REPO / "sweeps" / "smoke.yaml").read_text())
    sweep.update(name=name, **top)
    if not whole_space:
        sweep["base"]["distill"] = {"iterations": 8, "eval_every": 4}
        sweep["space"] = {"alpha": [0.1], "ir": [0.5]}
    if quick:
        sweep["base"]["distill"] = {"iterations": 2, "eval_every": 2}
        sweep["base"]["evaluate"] = {"epochs": 10, "num_nets": 1}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _run_sweep(yaml_path: Path, home: Path, log: Path) -> dict:
    env = {**os.environ, "PAD_RAY_HOME": str(home), "PAD_RAY_DATA": str(DATA),
           # This machine also hosts other Ray clusters: make the sweep start its own local one.
           "RAY_ADDRESS": "local"}
    began = time.time()
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "pad_ray.sweep", str(yaml_path)], cwd=common.REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=1200)
    ended = time.time()
    return {"began": began, "ended": ended, "returncode": proc.returncode}


def _phases(name: str, home: Path, began: float) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "trial_id" not in r.data.tags)
    trials = [r for r in runs if "trial_id" in r.data.tags]
    first_trial = min(trials, key=lambda r: r.info.start_time)
    metrics = [m.timestamp for r in trials for m in client.get_metric_history(r.info.run_id, "val_accuracy")]
    out = {"parent_run_start_s": parent.info.start_time / 1e3 - began,
           "trial_run_start_s": first_trial.info.start_time / 1e3 - began,
           "first_report_s": min(metrics) / 1e3 - began if metrics else None}
    results = sorted((home / "sweeps" / name).glob("*/result.json"))
    starts = []
    for path in results:
        lines = path.read_text().splitlines()
        if lines:
            first = json.loads(lines[0])
            starts.append(first["timestamp"] - first["time_total_s"])
    if starts:
        # result.json's timestamp has one-second resolution: so has this phase.
        out["trial_function_start_s"] = min(starts) - began
    return out


def _trial_span(name: str, home: Path) -> tuple[int, float]:
    """(trials, seconds from the first trial run's start to the last one's end) in MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    trials = [r for r in runs if "trial_id" in r.data.tags]
    return len(trials), (max(r.info.end_time for r in trials) - min(r.info.start_time for r in trials)) / 1e3


def reuse_part(quick: bool, pairs: int, folder: Path, home: Path) -> list[dict]:
    """The whole smoke space with reuse_actors off and on, alternately, on the experts in `home`'s store."""
    import csv

    rows = []
    for k in range(pairs):
        for reuse in (False, True):
            name = f"reuse_{str(reuse).lower()}_{k}"
            log = folder / f"{name}.log"
            run = _run_sweep(_sweep_yaml(folder, name, quick, whole_space=True, reuse_actors=reuse), home, log)
            row = {"reuse_actors": reuse, "pair": k, "returncode": run["returncode"],
                   "total_s": run["ended"] - run["began"]}
            if run["returncode"] == 0:
                row["trials"], row["trials_span_s"] = _trial_span(name, home)
                with open(home / "sweeps" / name / "results.csv") as table:
                    row["results"] = sorted((r["alpha"], r["ir"], r["best_val_accuracy"], r["iterations"])
                                            for r in csv.DictReader(table))
            else:
                row["log_tail"] = log.read_text().splitlines()[-20:]
            rows.append(row)
            print(name, {key: (round(v, 2) if isinstance(v, float) else v) for key, v in row.items()
                         if key not in ("results", "log_tail")}, flush=True)
    results = {repr(r.get("results")) for r in rows}
    for row in rows:
        row["same_results_every_run"] = len(results) == 1
    return rows


def sweep_part(quick: bool, timed_runs: int, reuse_pairs: int) -> tuple[list[dict], list[dict]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        home = folder / "home"
        import_began = time.time()
        subprocess.run([sys.executable, "-c", "import pad_ray.sweep"], cwd=common.REPO, check=True)
        import_s = time.time() - import_began
        for k in range(timed_runs + 1):
            name = "cold" if k == 0 else f"warm{k}"
            yaml_path = _sweep_yaml(folder, name, quick)
            log = folder / f"{name}.log"
            run = _run_sweep(yaml_path, home, log)
            row = {"run": name, "store": "empty" if k == 0 else "experts cached", "returncode": run["returncode"],
                   "total_s": run["ended"] - run["began"], "import_pad_ray_sweep_s": import_s}
            try:
                row.update(_phases(name, home, run["began"]))
            except Exception as exc:  # noqa: BLE001 - reported, with the log's tail
                row["error"] = f"{type(exc).__name__}: {exc}"
            if run["returncode"] != 0 or "error" in row:
                row["log_tail"] = log.read_text().splitlines()[-20:]
            rows.append(row)
            for line in row.get("log_tail", []):
                print("   ", line, flush=True)
            print(row["run"], {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
                               if k not in ("log_tail",)}, flush=True)
        reuse_rows = reuse_part(quick, reuse_pairs, folder, home)
    return rows, reuse_rows


class _Trial:
    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config = trial_id, config

    def __str__(self) -> str:
        return f"pad_trial_{self.trial_id}"


def _result(iterations: int, iteration: int) -> dict:
    steps = [{"iteration": iteration - iterations + i + 1, "loss": 0.5, "skipped": False, "syn_lr": 0.01,
              "expert": 3, "start_epoch": 7} for i in range(iterations)]
    return {"iteration": iteration, "loss": 0.5, "skipped": 1, "syn_lr": 0.01, "val_accuracy": 0.4,
            "test_accuracy": 0.39, "best_val_accuracy": 0.41, "distill_time_s": 12.5, "peak_memory_mb": 900.0,
            "steps": steps, "training_iteration": iteration // iterations, "time_this_iter_s": 1.0,
            "time_total_s": 10.0, "trial_id": "t1", "done": False, "timestamp": int(time.time())}


def logging_part(quick: bool) -> list[dict]:
    from mlflow.entities import Metric

    from pad_ray import tracking
    from pad_ray.sweep_config import load_sweep

    os.environ.setdefault("PAD_RAY_DATA", str(DATA))
    sweep = load_sweep(common.REPO / "sweeps" / "smoke.yaml", []).model_dump(mode="json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment = tracking.open_experiment(client, "bench", uri)
        os.environ["BENCH_PARENT_RUN"] = client.create_run(experiment).info.run_id
        callback = tracking.MlflowSweepCallback(uri, experiment, "smoke", "BENCH_PARENT_RUN", 5, sweep)
        repeats = 3 if quick else 10
        for per_result in (4, 100, 500):
            trial = _Trial(f"batched{per_result}", {"alpha": 0.1, "ir": 0.5})
            callback.on_trial_result(0, [], trial, _result(per_result, per_result))  # creates the run
            times = []
            for k in range(repeats):
                result = _result(per_result, per_result * (k + 2))
                began = time.perf_counter()
                callback.on_trial_result(0, [], trial, result)
                times.append(time.perf_counter() - began)
            batched = common.median(times)

            # The same values, one `log_metric` call each (what a per-metric logger does).
            run_id = client.create_run(experiment).info.run_id
            per_metric_repeats = 1 if per_result >= 500 or quick else 3
            times, count = [], 0
            for k in range(per_metric_repeats):
                result = _result(per_result, per_result * (k + 2))
                now = int(time.time() * 1000)
                values = [Metric(key, float(v), now, result["iteration"]) for key, v in result.items()
                          if key not in tracking._NOT_METRICS and isinstance(v, (int, float))
                          and not isinstance(v, bool)]
                for stats in result["steps"]:
                    values += [Metric(f"step_{key}", float(stats[key]), now, stats["iteration"])
                               for key in tracking._PER_STEP]
                if per_result >= 500:
                    values = values[:400]  # timed on the first 400 calls, scaled to the full count below
                count = len(values)
                began = time.perf_counter()
                for m in values:
                    client.log_metric(run_id, m.key, m.value, m.timestamp, m.step)
                times.append(time.perf_counter() - began)
            metrics_per_result = 7 + 4 * per_result
            per_metric = common.median(times) / count * metrics_per_result
            rows.append({"iterations_per_result": per_result, "metrics_per_result": metrics_per_result,
                         "batched_ms": batched * 1e3, "per_metric_ms": per_metric * 1e3,
                         "speedup": per_metric / batched})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.parse_args(__doc__.splitlines()[0])
    parser.add_argument("--timed-runs", type=int, default=2, help="sweep invocations with experts cached")
    parser.add_argument("--reuse-pairs", type=int, default=2, help="whole-space runs with reuse_actors off, then on")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args(argv)
    meta = common.machine()
    print(f"# {NAME} on {meta['cpu']} ({meta['usable_cores']} cores), load {meta['load_average_at_start']}",
          flush=True)
    sweep_rows, reuse_rows = ([], []) if args.skip_sweep else sweep_part(args.quick, args.timed_runs,
                                                                          args.reuse_pairs)
    log_rows = logging_part(args.quick)
    warm = [r for r in sweep_rows if r["store"] == "experts cached" and r.get("trial_run_start_s") is not None]
    summary = {}
    if warm:
        summary["start_to_trial_running_s"] = common.median([r["trial_run_start_s"] for r in warm])
        summary["start_to_trial_function_s"] = common.median([r.get("trial_function_start_s", float("nan"))
                                                               for r in warm])
        summary["start_to_first_report_s"] = common.median([r["first_report_s"] for r in warm
                                                            if r.get("first_report_s") is not None])
        summary["start_to_parent_run_s"] = common.median([r["parent_run_start_s"] for r in warm])
    for reuse in (False, True):
        timed = [r for r in reuse_rows if r["reuse_actors"] == reuse and r["returncode"] == 0]
        if timed:
            summary[f"whole_space_total_s_reuse_{str(reuse).lower()}"] = common.median([r["total_s"] for r in timed])
            summary[f"whole_space_trials_span_s_reuse_{str(reuse).lower()}"] = common.median(
                [r["trials_span_s"] for r in timed])
    if reuse_rows:
        summary["same_results_with_and_without_reuse"] = reuse_rows[0]["same_results_every_run"]
    summary["logging_ms_per_report"] = {r["iterations_per_result"]: round(r["batched_ms"], 2) for r in log_rows}
    print()
    print(common.table(sweep_rows, [("run", "run"), ("store", "store"), ("import_pad_ray_sweep_s", "import s"),
                                    ("parent_run_start_s", "driver ready s"),
                                    ("trial_run_start_s", "trial started s"),
                                    ("trial_function_start_s", "trial fn running s (+-1)"),
                                    ("first_report_s", "first report s"), ("total_s", "total s"),
                                    ("returncode", "rc")]))
    print()
    print(common.table(reuse_rows, [("reuse_actors", "reuse_actors"), ("pair", "pair"), ("trials", "trials"),
                                    ("trials_span_s", "first trial start to last end s"), ("total_s", "total s"),
                                    ("same_results_every_run", "same results"), ("returncode", "rc")]))
    print()
    print(common.table(log_rows, [("iterations_per_result", "iterations/result"),
                                  ("metrics_per_result", "metrics/result"), ("batched_ms", "log_batch ms"),
                                  ("per_metric_ms", "per-metric ms"), ("speedup", "speed-up")]))
    print()
    for key, value in summary.items():
        print(f"{key}: {value if isinstance(value, dict) else common.fmt(value)}")
    rows = ([{"part": "sweep", **r} for r in sweep_rows] + [{"part": "reuse_actors", **r} for r in reuse_rows]
            + [{"part": "logging", **r} for r in log_rows])
    print(f"\nwrote {common.write_results(NAME, args.quick, meta, rows, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
