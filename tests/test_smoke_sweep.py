"""The shipped smoke sweep as a user runs it, from cold: `ray job submit` to a local head (as the README
says), logging over HTTP to a real `mlflow server`. The job runs once for this module (`smoke_job`) and
every test here reads what it left: the store, Tune's folders, MLflow through its client, REST API and
UI in headless Chromium, and the best set exported for torchvision."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import RAY_BIN, _ray_cluster, free_ports, start_mlflow_server, train_without_pad_ray, wait_for
from pad_ray.distilled import FILE_NAME
from pad_ray.sweep_config import load_sweep
from test_sweep import (REPO, SMOKE, assert_each_step_once, assert_runs_match_their_trials, children,
                        store_checksums, tune_trials)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# One xdist worker runs this module: on two, each would run the minutes-long cold job of its own.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smoke_job")]


@dataclass
class SmokeJob:
    home: Path  # PAD_RAY_HOME: the store, Tune's folders
    server: str  # the MLflow server the job logged to
    output: str  # what `ray job submit` printed (the driver's output)


@pytest.fixture(scope="module")
def smoke_job(tmp_path_factory, mnist_root) -> SmokeJob:
    """sweeps/smoke.yaml submitted from cold to a fresh local head whose environment (PAD_RAY_HOME,
    PAD_RAY_DATA, set before `ray start`) the job reads; the head is stopped, and checked gone, before
    the tests read the results. The MLflow server lives as long as the module."""
    home = tmp_path_factory.mktemp("smoke_job") / "home"
    (port,) = free_ports(1)
    server = start_mlflow_server(home.parent / "mlflow_server", port)
    uri = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            for key, value in (("PAD_RAY_HOME", home), ("PAD_RAY_DATA", mnist_root), ("RAY_USAGE_STATS_ENABLED", 0)):
                monkeypatch.setenv(key, str(value))
            cluster = _ray_cluster(monkeypatch, dashboard=True)
            assert next(cluster).env["PAD_RAY_HOME"] == str(home)
            try:
                job = subprocess.run([RAY_BIN, "job", "submit", "--working-dir", ".", "--", "python", "-m",
                                      "pad_ray.sweep", "sweeps/smoke.yaml", "--set", f"mlflow.tracking_uri={uri}"],
                                     cwd=REPO, capture_output=True, text=True, timeout=1500)
            finally:
                next(cluster, None)  # stops this head and checks that none of its processes is left
        output = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in output, output[-3000:]
        yield SmokeJob(home, uri, output)
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture
def smoke(smoke_job, mnist_root, monkeypatch):
    """The smoke sweep as the job loaded it: its ${PAD_RAY_*} paths are the job's."""
    monkeypatch.setenv("PAD_RAY_HOME", str(smoke_job.home))
    monkeypatch.setenv("PAD_RAY_DATA", str(mnist_root))
    return load_sweep(SMOKE)


def test_smoke_sweep_runs_trials_with_early_stopping_and_mlflow(smoke_job, smoke, smoke_store, mnist_root,
                                                                 tmp_path):
    """From cold: EL2N and both expert sets on Ray Train, then 8 trials."""
    home, sweep = smoke_job.home, smoke
    # Ray Train and EL2N tasks wrote exactly what the single-process trainer of the session store did.
    assert store_checksums(home / "store") == store_checksums(smoke_store)
    assert len(list((home / "store" / "experts").iterdir())) == 2  # one set per IR

    client, trials, parents = children(home, tracking_uri=smoke_job.server)
    assert len(trials) == 8 and len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    assert_runs_match_their_trials(client, trials, tune_trials(home, "smoke"), sweep)
    for run in trials:
        assert run.data.params["config.distill.syn_steps"] == "10"
        assert run.info.status == "FINISHED"
        assert_each_step_once(client, run)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"synthetic.png", "synthetic_best.npz", "config.yaml"} <= artifacts
    stopped = [r for r in trials if r.data.tags["stopped_early"] == "true"]
    finished = [r for r in trials if "final_test_accuracy" in r.data.metrics]
    assert stopped, "ASHA stopped no trial early"
    assert finished and all(r.data.tags["stopped_early"] == "false" for r in finished)

    # The table ranks by validation within each IPC; the best config is its top trial's own config.
    out = home / "sweeps" / "smoke"
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    # Tune keeps its JSON and CSV record of every trial, and no TensorBoard files: nothing reads them, and
    # their logger warned with a dump of each report's per-iteration steps.
    trial_dirs = [p.parent for p in out.glob("pad_trial_*/params.json")]
    assert len(trial_dirs) == 8 and all((d / "result.json").stat().st_size and (d / "progress.csv").stat().st_size
                                        for d in trial_dirs)
    assert not list(out.rglob("events.out.tfevents.*")) and "tensorboard" not in smoke_job.output.lower()
    # No noise about pad_ray's own settings, and nothing from the trials after the closing MLflow link.
    lines = smoke_job.output.splitlines()
    assert not [line for line in lines if "snapshotting" in line or "Checkpoint successfully created" in line]
    link = max(i for i, line in enumerate(lines) if line.startswith("MLflow: "))
    assert not [line for line in lines[link:] if "(pad_trial" in line], lines[link:]
    top = rows[0]
    same_ipc = [r for r in rows if r["ipc"] == top["ipc"]]
    assert float(top["best_val_accuracy"]) == max(float(r["best_val_accuracy"]) for r in same_ipc)
    (best_run,) = [r for r in trials if r.data.params["alpha"] == top["alpha"] and r.data.params["ir"] == top["ir"]]
    assert best_run.data.metrics["best_val_accuracy"] == pytest.approx(float(top["best_val_accuracy"]))
    assert best_run.data.metrics["best_iteration"] == float(top["best_iteration"])  # 0 if the start won
    assert "start_val_accuracy" in best_run.data.metrics  # the starting set's score, on the first report
    trial_config_yaml = yaml.safe_load(Path(client.download_artifacts(best_run.info.run_id, "config.yaml")).read_text())
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best == trial_config_yaml  # what the trial itself ran with, paths included
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"results.csv", "best_config.yaml", "accuracy_vs_alpha.png"} <= logged

    # What a user takes away: the sweep's best set (its top row's MLflow artifact), exported, trains a
    # torchvision model that never imports pad_ray.
    exported = tmp_path / "best-imagefolder"
    export = subprocess.run([sys.executable, "-m", "pad_ray.cli", "export", str(out), "--format", "imagefolder",
                             "--out", str(exported), "--tracking-uri", smoke_job.server],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    assert len(list(exported.rglob("*.png"))) == int(top["ipc"]) * 10
    # One image per class, 10 in all: well above chance (0.1) only if images and class folders agree.
    assert train_without_pad_ray(exported, mnist_root, tmp_path) > 0.25



def test_the_top_trial_stands_beside_its_controls_scored_as_its_final_evaluation(smoke_job, smoke):
    """Random real subsets of the top trial's size and its starting set, each scored by that trial's final
    evaluation: in controls.csv, in the parent run, and the same numbers when scored again here."""
    import torch

    from pad_ray import local_stages
    from pad_ray.sweep_config import trial_config

    out = smoke_job.home / "sweeps" / "smoke"
    top = next(csv.DictReader((out / "results.csv").open()))
    (against,) = csv.DictReader((out / "controls.csv").open())
    assert against["trial_id"] == top["trial_id"] and against["final_test_accuracy"] == top["final_test_accuracy"]
    assert "Each top trial against its controls" in smoke_job.output

    cfg = trial_config(smoke, {"alpha": float(top["alpha"]), "ir": float(top["ir"])})
    cpu = torch.device("cpu")
    data = local_stages.load_data(cfg)
    trajectories = local_stages.ensure_experts(cfg, data, local_stages.difficulty_order(cfg, data, cpu), cpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's tasks ran (a trial's 1 CPU): the same arithmetic, the same scores
    try:
        for kind, draws in (("start", 1), ("random", 3)):
            tests = local_stages.control_tests(kind, cfg, data, trajectories, draws, cpu)
            assert len(tests) == int(against[f"{kind}_nets"]) == draws * cfg.evaluate.num_nets
            assert float(against[f"{kind}_test_accuracy"]) == pytest.approx(sum(tests) / len(tests), abs=1e-12)
            if top["final_test_accuracy"]:  # else ASHA stopped the top trial before its final evaluation
                lead = float(top["final_test_accuracy"]) - float(against[f"{kind}_test_accuracy"])
                assert float(against[f"lead_over_{kind}"]) == pytest.approx(lead)
    finally:
        torch.set_num_threads(threads)

    client, _, (parent,) = children(smoke_job.home, tracking_uri=smoke_job.server)
    for kind in ("start", "random"):
        assert parent.data.metrics[f"control_{kind}_test_accuracy"] == pytest.approx(
            float(against[f"{kind}_test_accuracy"]))
    assert {"controls.csv", "controls.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_submitted_sweep_in_mlflow_reads_without_opening_each_run(smoke_job, smoke):
    """The copied working dir of `ray job submit` changes nothing: Tune's folders are where PAD_RAY_HOME says,
    and every child run holds its own trial's values and read its own IR's expert set from the store there."""
    mlflow_server, output = smoke_job.server, smoke_job.output
    tune = tune_trials(smoke_job.home, "smoke")
    client, logged, _ = children(smoke_job.home, tracking_uri=mlflow_server)
    assert_runs_match_their_trials(client, logged, tune, smoke)
    assert {r.data.params["ir"] for r in logged} == {"0.5", "0.75"}

    experiment = rest(mlflow_server, "experiments/get-by-name", experiment_name="smoke")["experiment"]
    # A model-training experiment: MLflow 3 opens it on its runs, not on the GenAI overview.
    assert as_dict(experiment.get("tags"))["mlflow.experimentKind"] == "custom_model_development"
    runs = rest(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                               "max_results": 100})["runs"]
    tags = {r["info"]["run_id"]: as_dict(r["data"].get("tags")) for r in runs}
    trials = [r for r in runs if "trial_id" in tags[r["info"]["run_id"]]]
    (parent,) = [r for r in runs if tags[r["info"]["run_id"]].get("mlflow.runName") == "smoke sweep"]
    parent_id = parent["info"]["run_id"]
    assert len(trials) == 8

    # Child runs are named by their values; each shows its synthetic set at every evaluation.
    for run in trials:
        run_id, params = run["info"]["run_id"], as_dict(run["data"]["params"])
        assert tags[run_id]["mlflow.runName"] == (  # floats as %g: alpha 0.0 reads alpha0
            f"ipc{params['ipc']} alpha{float(params['alpha']):g} ir{float(params['ir']):g} aee{params['aee']}")
        evaluations = sorted(m["step"] for m in rest(mlflow_server, "metrics/get-history", run_id=run_id,
                                                      metric_key="val_accuracy")["metrics"])
        grids = artifact_paths(mlflow_server, run_id, "images")
        # MLflow names each logged image images/<key>+step+<step>+timestamp+...png
        named = (re.search(r"synthetic\+step\+(\d+)\+.*(?<!compressed)\.png$", p) for p in grids)
        steps = sorted(int(m.group(1)) for m in named if m)
        assert steps == evaluations and evaluations, (grids, evaluations)

    # The parent says what the sweep was and how it went.
    params, metrics = as_dict(parent["data"]["params"]), {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert json.loads(params["space.alpha"]) == {"kind": "grid", "values": [0.0, 0.1, 0.2, 0.3]}
    assert tags[parent_id]["version.pad_ray"] and len(tags[parent_id]["git_commit"]) in (40, len("unknown"))
    assert {"sweep.yaml", "results.csv", "best_config.yaml"} <= artifact_paths(mlflow_server, parent_id)
    assert metrics["trials"] == 8
    assert metrics["trials_done"] + metrics["trials_stopped"] + metrics["trials_error"] == 8
    # The smoke sweep has one IPC, so no groups: its summary has no /ipc suffix.
    assert metrics["best_val_accuracy"] == max(r_metric(r, "best_val_accuracy") for r in trials)

    # results.csv rows lead to their runs and to each distilled set's artifact.
    with open(smoke_job.home / "sweeps" / "smoke" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    by_trial = {tags[r["info"]["run_id"]]["trial_id"]: r["info"]["run_id"] for r in trials}
    assert {row["trial_id"]: row["mlflow_run_id"] for row in rows} == by_trial
    for row in rows:
        run_id = row["mlflow_run_id"]
        artifact_uri = next(r["info"]["artifact_uri"] for r in trials if r["info"]["run_id"] == run_id)
        assert row["distilled_set_uri"] == f"{artifact_uri}/{FILE_NAME}"
        assert FILE_NAME in artifact_paths(mlflow_server, run_id)

    # What a person sees, in headless Chromium: the link the sweep prints opens the runs (not "Traces 0"),
    # and each trial's page shows its name, its swept values and its accuracy.
    link = f"{mlflow_server}/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning"
    assert f"MLflow: {link}" in output
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("the UI half needs Debian's chromium and chromium-driver (.ci/run installs them)")
    with browser() as chromium:
        page = page_text(chromium, link, ["smoke sweep", "Run Name"])
        assert "Traces\n0" not in page
        for run in trials:
            run_id, params = run["info"]["run_id"], as_dict(run["data"]["params"])
            expected = [tags[run_id]["mlflow.runName"], f"best_val_accuracy\n{r_metric(run, 'best_val_accuracy')}",
                        *(f"{key}\n{params[key]}" for key in ("ipc", "alpha", "ir", "aee"))]
            page_text(chromium, f"{mlflow_server}/#/experiments/{experiment['experiment_id']}/runs/{run_id}"
                                "?workflowType=machine_learning", expected)


def rest(server: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """One call of MLflow's REST API (GET with a query, or POST with a JSON body)."""
    url = f"{server}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def as_dict(entries) -> dict[str, str]:
    return {e["key"]: e["value"] for e in entries or []}


def artifact_paths(server: str, run_id: str, path: str = "") -> set[str]:
    listed = rest(server, "artifacts/list", run_id=run_id, **({"path": path} if path else {}))
    return {f["path"] for f in listed.get("files", [])}


def r_metric(run: dict, key: str) -> float:
    return next(m["value"] for m in run["data"]["metrics"] if m["key"] == key)


@contextlib.contextmanager
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Without the background-networking flags Chromium keeps dialling Google on this closed network.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1000"):
        options.add_argument(flag)
    chromium = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield chromium
    finally:
        chromium.quit()


def page_text(chromium, url: str, expected: list[str]) -> str:
    """The page's text as Chromium renders it, once every expected string is on it (the UI fetches after load)."""
    chromium.get(url)

    def shown():
        text = chromium.find_element("tag name", "body").text
        return text if all(e in text for e in expected) else None

    try:
        return wait_for(shown, f"{expected} on {url}", timeout=180)
    except AssertionError:
        missing = [e for e in expected if e not in chromium.find_element("tag name", "body").text]
        raise AssertionError(f"{url} never showed {missing}") from None
