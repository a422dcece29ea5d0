"""What a researcher sees of a sweep in MLflow: a real `mlflow server` started here, the smoke sweep
submitted as a Ray job (`ray job submit`, as the README says) and logged to it over HTTP, read back
through the server's REST API and shown by its UI in headless Chromium."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from mlflow.tracking import MlflowClient

from conftest import RAY_BIN, free_ports, start_mlflow_server, wait_for
from pad_ray.distilled import FILE_NAME
from pad_ray.sweep_config import load_sweep
from test_sweep import SMOKE, assert_runs_match_their_trials, tune_trials

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


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


@pytest.fixture
def mlflow_server(sweep_home):
    (port,) = free_ports(1)
    server = start_mlflow_server(sweep_home / "mlflow_server", port)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=60)


def test_a_submitted_sweep_in_mlflow_reads_without_opening_each_run(sweep_home, warm_store,
                                                                   ray_cluster_with_dashboard, mlflow_server):
    """`ray job submit --working-dir .` against a local head: the copied working dir changes nothing, the job
    reads PAD_RAY_HOME and PAD_RAY_DATA from the environment of `ray start`, and logs to the server."""
    assert ray_cluster_with_dashboard.env["PAD_RAY_HOME"] == str(sweep_home)  # set before the head started
    # One alpha: two trials, one per expert set, are enough to show where a job reads and writes.
    job = subprocess.run([RAY_BIN, "job", "submit", "--working-dir", ".", "--", "python", "-m", "pad_ray.sweep",
                          "sweeps/smoke.yaml", "--set", "space.alpha=[0.1]",
                          "--set", f"mlflow.tracking_uri={mlflow_server}"],
                         cwd=REPO, capture_output=True, text=True, timeout=1500)
    output = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in output, output[-3000:]
    # Tune's folders are where PAD_RAY_HOME says, not inside the copied working dir, and every child run
    # holds its own trial's values and read its own IR's expert set from the store there.
    tune = tune_trials(sweep_home, "smoke")
    client = MlflowClient(mlflow_server)
    logged = [r for r in client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
              if "trial_id" in r.data.tags]
    assert_runs_match_their_trials(client, logged, tune, load_sweep(SMOKE, {"space": {"alpha": [0.1]}}))
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
    assert len(trials) == 2

    # Child runs are named by their values; each shows its synthetic set at every evaluation.
    for run in trials:
        run_id, params = run["info"]["run_id"], as_dict(run["data"]["params"])
        assert tags[run_id]["mlflow.runName"] == (
            f"ipc{params['ipc']} alpha{params['alpha']} ir{params['ir']} aee{params['aee']}")
        evaluations = sorted(m["step"] for m in rest(mlflow_server, "metrics/get-history", run_id=run_id,
                                                      metric_key="val_accuracy")["metrics"])
        grids = artifact_paths(mlflow_server, run_id, "images")
        # MLflow names each logged image images/<key>+step+<step>+timestamp+...png
        steps = sorted(int(m.group(1)) for p in grids if (m := re.search(r"synthetic\+step\+(\d+)\+.*(?<!compressed)\.png$", p)))
        assert steps == evaluations and evaluations, (grids, evaluations)

    # The parent says what the sweep was and how it went.
    params, metrics = as_dict(parent["data"]["params"]), {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert json.loads(params["space.alpha"]) == {"kind": "grid", "values": [0.1]}
    assert tags[parent_id]["version.pad_ray"] and len(tags[parent_id]["git_commit"]) in (40, len("unknown"))
    assert {"sweep.yaml", "results.csv", "best_config.yaml"} <= artifact_paths(mlflow_server, parent_id)
    assert metrics["trials"] == 2
    assert metrics["trials_done"] + metrics["trials_stopped"] + metrics["trials_error"] == 2
    # The smoke sweep has one IPC, so no groups: its summary has no /ipc suffix.
    assert metrics["best_val_accuracy"] == max(r_metric(r, "best_val_accuracy") for r in trials)

    # results.csv rows lead to their runs and to each distilled set's artifact.
    with open(sweep_home / "sweeps" / "smoke" / "results.csv") as handle:
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
