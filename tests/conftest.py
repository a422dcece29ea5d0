"""Shared fixtures: a tiny in-memory dataset and its experts for fast unit tests, the real MNIST, a
fresh Ray cluster per test (free ports, its own temp dir, stopped and checked after the test), and
the smoke sweep's store, trained once per session and copied where a test needs it warm."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

# Two tests run at once on 2 cores, so each process they start (sweep drivers, the CLI, Ray workers that set
# no thread count of their own) gets one thread, as this process does below: with two, a process's OpenMP
# threads spin while they wait on a partner that the other test's work has descheduled (BENCHMARKS.md,
# section 8). Read once, when torch starts; child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
import yaml
from filelock import FileLock

from pad_ray.config import RunConfig, build_config, deep_merge
from pad_ray.data import Dataset, Split
from pad_ray.experts import train_expert
from pad_ray.runtime import derive_seed

# Tiny problems run faster on one thread, and two threads fight over 2 cores when tests run in parallel.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SWEEP_REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """Slow tests first (stable, so otherwise in file order): under pytest-xdist a sweep test that came last
    would run alone on one worker while the other had nothing left to do."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def tiny_config(tmp_path: Path | None = None, **sections) -> RunConfig:
    """A 3-class, 8x8 problem: every stage runs in well under a second."""
    raw = {
        "seed": 3,
        "device": "cpu",
        "data": {"dataset": "mnist", "zca": False},
        "model": {"width": 4, "depth": 2},
        "difficulty": {"seeds": 2, "epochs": 1, "batch_size": 16},
        "schedule": {"init_ratio": 0.5, "add_end_epoch": 2, "remove": [{"after_epoch": 3, "easiest_fraction": 0.2}]},
        "experts": {"num_experts": 2, "epochs": 5, "optimizer": "sgd", "batch_size": 8, "lr": 0.05},
        "distill": {"ipc": 2, "alpha": 0.2, "syn_steps": 3, "expert_epochs": 2, "min_start_epoch": 0,
                    "current_max_start_epoch": 2, "max_start_epoch": 3, "interval": 2, "batch_syn": 4,
                    "lr_img": 10, "lr_lr": 1e-5, "lr_y": 2, "threshold": 10.0, "iterations": 4, "eval_every": 2},
        "evaluate": {"num_nets": 2, "epochs": 3, "batch_size": 8},
    }
    if tmp_path is not None:
        raw["output_dir"] = str(tmp_path / "runs")
        raw["store_dir"] = str(tmp_path / "store")
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return build_config(raw, "tiny")


def tiny_dataset(seed: int = 0) -> Dataset:
    """Three separable classes of 8x8 one-channel images (class c brightens row band c)."""
    gen = torch.Generator().manual_seed(seed)

    def split(n_per_class: int, offset: int) -> Split:
        labels = torch.arange(3).repeat_interleave(n_per_class)
        images = 0.3 * torch.randn(len(labels), 1, 8, 8, generator=gen)
        for c in range(3):
            images[labels == c, :, 2 * c:2 * c + 3, :] += 1.0
        return Split(images, labels, torch.arange(len(labels)) + offset)

    return Dataset("tiny", split(20, 0), split(4, 60), split(10, 0), 3, ["a", "b", "c"], None, (0.0,), (1.0,))


@pytest.fixture(scope="session")
def tiny():
    cfg = tiny_config()
    data = tiny_dataset()
    order = [torch.nonzero(data.train.labels == c).flatten() for c in range(3)]
    trajectories = [
        train_expert(data.train, order, 3, cfg.model, cfg.experts, cfg.schedule,
                     derive_seed(cfg.experts.seed, "expert", i), torch.device("cpu"))
        for i in range(cfg.experts.num_experts)
    ]
    return cfg, data, order, trajectories


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    assert (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(), f"real MNIST missing under {SHARED_DATA}"
    return SHARED_DATA


class _Payload:
    """Unpickling this creates a directory at `marker`: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_malicious_pickle(path: Path, marker: Path, fmt: str = "pickle") -> None:
    """A file that runs code when unpickled (written by torch.save or plain pickle)."""
    if fmt == "torch.save":
        torch.save(_Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))


@pytest.fixture
def sweep_home(tmp_path, mnist_root, monkeypatch):
    """Where sweeps write (PAD_RAY_HOME) and read (PAD_RAY_DATA), as sweeps/smoke.yaml expects."""
    monkeypatch.setenv("PAD_RAY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PAD_RAY_DATA", str(mnist_root))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    return tmp_path / "home"


# -- the sweep driver as users run it ----------------------------------------------------------------

def wait_for(condition, what: str, timeout: float = 600, poll: float = 0.5, alive=None):
    """Poll a real condition (a file, a process, a server) until it holds; fail at once if the
    process `alive` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the process exited ({alive.returncode}) before {what}")
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def start_driver(sweep: Path, log_path: Path, *flags: str):
    """The sweep driver in the background, its output to a file (a pipe nobody reads would block it)."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "pad_ray.sweep", str(sweep), *flags], cwd=SWEEP_REPO, stdout=log,
                            stderr=subprocess.STDOUT), log


# -- a Ray cluster of the test's own ---------------------------------------------------------------

RAY_BIN = shutil.which("ray") or str(Path(sys.executable).parent / "ray")


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (all held at once, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class RayCluster:
    """A head started by `ray start` on free ports, in a temp dir of its own. `env` points Ray at it
    and nowhere else: RAY_ADDRESS names it, and RAY_TMPDIR keeps `ray.init()` from finding (or
    starting) a cluster under the machine-wide /tmp/ray."""

    temp_dir: Path
    address: str = ""
    dashboard: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    head_pids: set[int] = field(default_factory=set)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: command lines naming its temp dir or GCS address, and
        their descendants (workers, agents)."""
        marks = [str(self.temp_dir)] + ([f"={self.address}"] if self.address else [])
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["cmdline"]):
            line = " ".join(process.info["cmdline"] or [])
            if any(mark in line for mark in marks) and process.pid != os.getpid():
                found[process.pid] = process
                try:
                    found.update({child.pid: child for child in process.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def control_processes(self) -> dict[int, str]:
        """pid -> name of this cluster's raylets and GCS servers."""
        out = {}
        for process in self.processes():
            try:
                name = process.name()
            except psutil.NoSuchProcess:
                continue
            if name in ("raylet", "gcs_server"):
                out[process.pid] = name
        return out

    def actor_pids(self, class_suffix: str) -> list[int]:
        """Live actors of this cluster whose class name ends with `class_suffix`, from Ray's state API."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        return [a.pid for a in actors if a.class_name.endswith(class_suffix) and a.pid]

    def stop(self) -> list[str]:
        """Stop every process of this cluster (never another's); what was still alive after SIGKILL."""
        processes = self.processes()
        for process in processes:  # a test cluster keeps nothing worth a graceful stop
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=10)
        left = [f"{pid} {name}" for pid, name in self.control_processes().items()]
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


# Ray's job server hands a submission to the head's dashboard agent, and gives up if that agent has not
# registered within 10 s ("No available agent to submit job"). On a busy machine a fresh head's agent can take
# longer than that, so a test waits for the registration itself (as Ray's own tests do) before it submits.
JOB_AGENT_READY = """
import sys, time
from ray._raylet import GcsClient
from ray._private import ray_constants as rc
from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
gcs, deadline = GcsClient(address=sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    head = gcs.internal_kv_get(rc.KV_HEAD_NODE_ID_KEY, namespace=rc.KV_NAMESPACE_JOB)
    key = f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head.decode()}".encode() if head else None
    if key and gcs.internal_kv_get(key, namespace=rc.KV_NAMESPACE_DASHBOARD):
        sys.exit(0)
    time.sleep(0.2)
sys.exit(f"the head's dashboard agent did not register within {sys.argv[2]} s")
"""


def wait_for_job_agent(address: str, env: dict[str, str], timeout_s: float = 240) -> None:
    """Return once the head of the cluster at `address` can take `ray job submit`. In a child process with
    the cluster's environment, so that it also joins a cluster with token auth."""
    ready = subprocess.run([sys.executable, "-c", JOB_AGENT_READY, address, str(timeout_s)], env=env,
                           capture_output=True, text=True, timeout=timeout_s + 60)
    assert ready.returncode == 0, ready.stderr[-3000:]


def start_ray_cluster(dashboard: bool = False, num_cpus: int = 2, num_gpus: int = 0) -> RayCluster:
    import ray

    # Short: Ray's unix socket paths under the temp dir must fit in 107 bytes.
    cluster = RayCluster(Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")))
    gcs, dashboard_port, client, agent = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # Token auth off for test clusters: a process that imported Ray before RAY_AUTH_MODE was set (pytest
    # itself) cannot join a token cluster by address. Free ports and the temp dir keep them apart.
    env.update({"RAY_TMPDIR": str(cluster.temp_dir), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    # Without the autoscaler's monitor, a Python process of its own: these clusters never scale (test_cluster
    # starts its own head for that).
    command = [RAY_BIN, "start", "--head", f"--port={gcs}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
               f"--temp-dir={cluster.temp_dir}", f"--include-dashboard={str(dashboard).lower()}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--no-monitor",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"]
    started = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    cluster.address = f"{ray.util.get_node_ip_address()}:{gcs}"
    if started.returncode != 0:
        cluster.stop()
        raise AssertionError(f"ray start failed: {started.stderr[-3000:]}")
    env["RAY_ADDRESS"] = cluster.address
    if dashboard:
        cluster.dashboard = f"http://127.0.0.1:{dashboard_port}"
        env["RAY_API_SERVER_ADDRESS"] = cluster.dashboard
        try:
            wait_for_job_agent(cluster.address, env)
        except AssertionError:
            cluster.stop()
            raise
    cluster.env = env
    cluster.head_pids = set(cluster.control_processes())
    assert sorted(cluster.control_processes().values()) == ["gcs_server", "raylet"], cluster.control_processes()
    return cluster


def _ray_cluster(monkeypatch, dashboard: bool, num_gpus: int = 0):
    cluster = start_ray_cluster(dashboard=dashboard, num_gpus=num_gpus)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    for key in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        if key in cluster.env:
            monkeypatch.setenv(key, cluster.env[key])
    try:
        yield cluster
        # Code under test attaches to this cluster; a second raylet or GCS means it started its own.
        extra = {pid: name for pid, name in cluster.control_processes().items() if pid not in cluster.head_pids}
    finally:
        left = cluster.stop()
    assert not extra, f"the test started Ray processes of its own: {extra}"
    assert not left, f"Ray processes of this test still running after it: {left}"


@pytest.fixture
def ray_cluster(monkeypatch):
    """A fresh local Ray cluster for this test, which every `ray.init()` here and in child processes joins."""
    yield from _ray_cluster(monkeypatch, dashboard=False)


@pytest.fixture
def ray_cluster_with_dashboard(monkeypatch):
    """The same, with the dashboard (state API, job submission)."""
    yield from _ray_cluster(monkeypatch, dashboard=True)


@pytest.fixture(scope="module")
def ray_cluster_with_a_gpu():
    """A cluster for this module whose node offers one GPU: the real one on a GPU machine, a nominal one
    elsewhere. Never `ray.init(address="local")` in the test process: the token-auth cluster it starts
    leaves the process unable to create Ray Train's controller on any later test's cluster."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _ray_cluster(monkeypatch, dashboard=False, num_gpus=1)


# -- the smoke sweep's store, trained once ------------------------------------------------------------

SMOKE_SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"

# Tests of the sweep machinery (ASHA's groups, reruns, resumes, faults) check what trials report and where it
# goes, not how well they distill: their trials take 5 inner steps instead of 10 and train each evaluation net
# for 20 epochs instead of 100, which takes 10 to 40% off such a test's CPU time (BENCHMARKS.md, section 8). The
# experts, and so the store, are the smoke sweep's; test_smoke_sweep runs the sweep as shipped.
LIGHT_TRIALS = {"distill": {"syn_steps": 5}, "evaluate": {"epochs": 20}}


def light_smoke_sweep() -> dict:
    """sweeps/smoke.yaml as a dict (its ${PAD_RAY_*} paths unexpanded), its trials made light."""
    sweep = yaml.safe_load(SMOKE_SWEEP.read_text())
    sweep["base"] = deep_merge(sweep["base"], LIGHT_TRIALS)
    return sweep


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory, mnist_root) -> Path:
    """The smoke sweep's difficulty order and both expert sets (IR 0.5 and 0.75), trained once per
    session: under pytest-xdist by the first worker that needs it, while the others wait on a lock.
    The single-process trainer gives the same arrays as Ray Train, which the cold sweep test checks
    against this store. Tests copy it (`warm_store`) and never write to it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's folder, above each worker's own
    store, done = shared / "smoke_store" / "store", shared / "smoke_store" / "done"
    with FileLock(shared / "smoke_store.lock"):
        if not done.exists():
            _train_smoke_store(store, mnist_root)
            done.touch()
    return store


def _train_smoke_store(store: Path, mnist_root: Path) -> None:
    from pad_ray import local_stages
    from pad_ray.sweep_config import load_sweep
    from pad_ray.plan import expert_sets

    sweep = load_sweep(SMOKE_SWEEP, {"base": {"data": {"root": str(mnist_root)}, "store_dir": str(store),
                                               "output_dir": str(store.parent / "runs")}})
    data = None
    for cfg, _, count in expert_sets(sweep).values():
        assert cfg.experts.num_experts == count
        data = data or local_stages.load_data(cfg)
        order = local_stages.difficulty_order(cfg, data, torch.device("cpu"), progress=False)
        local_stages.ensure_experts(cfg, data, order, torch.device("cpu"), progress=False)


@pytest.fixture
def warm_store(sweep_home, smoke_store) -> Path:
    """A copy of the session's smoke store where sweeps/smoke.yaml looks for it (PAD_RAY_HOME/store)."""
    shutil.copytree(smoke_store, sweep_home / "store")
    return sweep_home / "store"


# -- a real MLflow server -----------------------------------------------------------------------

def start_mlflow_server(home: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on localhost:`port`, a sqlite store and served artifacts under `home`; returns
    once it accepts connections."""
    home.mkdir(parents=True, exist_ok=True)
    # Without job execution: MLflow 3's server otherwise starts a job runner and 7 Huey consumers (GenAI
    # scorers, trace rollups; nothing a tracking server needs), each its own interpreter: 25 busy core-seconds
    # per start on 2 cores, against 5.6 without them.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{home}/server.db", "--artifacts-destination", str(home / "served"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    def healthy():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(healthy, "the MLflow server", timeout=300, alive=server)
    return server


# -- a distilled set used elsewhere ---------------------------------------------------------------

TORCHVISION_ONLY = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchvision import datasets, transforms

    folder, mnist_root = sys.argv[1:]
    torch.manual_seed(0)
    pixels = transforms.Compose([transforms.Grayscale(), transforms.ToTensor()])
    train = datasets.ImageFolder(folder, transform=pixels)
    test = datasets.MNIST(mnist_root, train=False, transform=pixels)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                        nn.Flatten(), nn.Linear(512, 10))
    images, labels = next(iter(torch.utils.data.DataLoader(train, batch_size=len(train))))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(300):
        optimizer.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        optimizer.step()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=1000):
            correct += (net(x).argmax(1) == y).sum().item()
    print(correct / len(test), "pad_ray" in sys.modules)
""")


def train_without_pad_ray(folder: Path, mnist_root: Path, where: Path) -> float:
    """Train a small torchvision model on an exported ImageFolder in a fresh interpreter that never
    imports pad_ray; its accuracy on the real MNIST test set."""
    script = where / "train_without_pad_ray.py"
    script.write_text(TORCHVISION_ONLY)
    trained = subprocess.run([sys.executable, str(script), str(folder), str(mnist_root)], capture_output=True,
                             text=True, timeout=600, cwd=where)
    assert trained.returncode == 0, trained.stderr[-2000:]
    accuracy, imported = trained.stdout.split()
    assert imported == "False"
    return float(accuracy)
