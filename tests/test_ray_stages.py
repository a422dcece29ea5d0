"""Experts on a real local Ray: Ray Train workers, the durable store, the object store."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch
from ray._common.test_utils import wait_for_condition
from ray.experimental import tqdm_ray

from conftest import tiny_config, tiny_dataset
from pad_ray import cli, local_stages, ray_stages
from pad_ray.config import build_config, with_absolute_paths
from pad_ray.distill import distill
from pad_ray.trajectories import DifficultyCache, TrajectoryStore

CPU = torch.device("cpu")


def _driver(cluster):
    ray_stages.init_ray()  # as pad-ray and pad_ray.sweep join a cluster: RAY_ADDRESS, the workers' env, their logs
    try:
        yield cluster
    finally:
        ray.shutdown()


@pytest.fixture
def local_ray(ray_cluster):
    """This test's own cluster, with this process as the driver."""
    yield from _driver(ray_cluster)


@pytest.fixture
def local_ray_with_state_api(ray_cluster_with_dashboard):
    """The same with the dashboard, whose state API finds this test's workers."""
    yield from _driver(ray_cluster_with_dashboard)


def _reference(cfg, data, order, count):
    """The single-process trainer, into its own store."""
    reference = cfg.model_copy(update={"store_dir": cfg.store_dir + "-reference",
                                       "experts": cfg.experts.model_copy(update={"num_experts": count})})
    return local_stages.ensure_experts(reference, data, order, CPU, progress=False)


def _order(data):
    return [torch.nonzero(data.train.labels == c).flatten() for c in range(data.num_classes)]


def _generate(*sets):
    return ray_stages.generate_experts([ray_stages.ExpertSet(cfg, data, order) for cfg, data, order in sets])


def _record_bar_states(monkeypatch) -> list[dict]:
    """The tqdm_ray states that reach this driver from workers' logs, as they arrive."""
    manager = tqdm_ray.instance()
    states, apply = [], manager.process_state_update

    def record(state):
        states.append(dict(state))
        apply(state)

    monkeypatch.setattr(manager, "process_state_update", record)
    return states


@pytest.mark.slow
def test_ray_train_experts_equal_single_process_and_are_never_trained_twice(local_ray, tmp_path, monkeypatch):
    cfg = with_absolute_paths(tiny_config(tmp_path))
    data, order = tiny_dataset(), _order(tiny_dataset())
    reference = _reference(cfg, data, order, 3)
    # A second set (another IR, on other data) in the same call: both come out of one Ray Train run.
    other = cfg.model_copy(update={"schedule": cfg.schedule.model_copy(update={"init_ratio": 0.8})})
    other_data = tiny_dataset(seed=1)
    other_reference = _reference(other, other_data, _order(other_data), 2)

    states = _record_bar_states(monkeypatch)
    store, other_store = _generate((cfg, data, order), (other, other_data, _order(other_data)))
    # Each expert's bar reaches the driver and closes, and no state arrives twice: a second "closed" state
    # would open the bar again, to be redrawn around every later driver print.
    wait_for_condition(lambda: sum(s["closed"] for s in states) >= 4, timeout=60)
    seen = [(s["uuid"], s["x"], s["closed"]) for s in states]
    assert len(seen) == len(set(seen)), seen
    assert sorted(s["desc"].rsplit(" expert ", 1)[1] for s in states if s["closed"]) == ["0", "0", "1", "1"]
    assert not any(group.bars_by_uuid for group in tqdm_ray.instance().bar_groups.values())
    assert store.key != other_store.key
    assert store.missing(2) == [] and other_store.missing(2) == []
    for i in range(2):
        assert np.array_equal(store.load(i), reference[i]), f"expert {i} differs from the single-process one"
        assert np.array_equal(other_store.load(i), other_reference[i]), f"second set's expert {i} differs"
    assert len(list((tmp_path / "runs" / "ray_train").iterdir())) == 1

    stamps = {i: os.stat(store._paths(i)[0]).st_mtime_ns for i in range(2)}
    _generate((cfg, data, order))  # nothing missing: nothing trained
    assert {i: os.stat(store._paths(i)[0]).st_mtime_ns for i in range(2)} == stamps

    # Expert 1 damaged, and one more expert asked for: only those two are trained.
    path = store._paths(1)[0]
    path.write_bytes(path.read_bytes()[:-100])
    more = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"num_experts": 3})})
    _generate((more, data, order))
    assert os.stat(store._paths(0)[0]).st_mtime_ns == stamps[0]
    for i in range(3):
        assert np.array_equal(store.load(i), reference[i])


@pytest.mark.slow
def test_killed_worker_loses_at_most_its_current_epoch(local_ray_with_state_api, tmp_path, mnist_root):
    cfg = with_absolute_paths(build_config({
        "preset": "smoke", "seed": 5, "data": {"root": str(mnist_root)},
        "output_dir": str(tmp_path / "runs"), "store_dir": str(tmp_path / "store"),
        "experts": {"num_experts": 2, "epochs": 12},
        "schedule": {"remove": []},
        "resources": {"workers": 2, "max_failures": 2},
    }))
    data = local_stages.load_data(cfg)
    order = local_stages.difficulty_order(cfg, data, CPU, progress=False)
    store = TrajectoryStore(cfg.store_dir, cfg)

    failure: list[BaseException] = []
    runner = threading.Thread(target=lambda: _capture(failure, _generate, (cfg, data, order)))
    runner.start()
    killed_at = None
    deadline = time.monotonic() + 300
    while killed_at is None and time.monotonic() < deadline:
        partial = store.load_partial(0)
        if partial is not None and len(partial["run"]["snapshots"]) - 1 >= 3:
            killed_at = len(partial["run"]["snapshots"]) - 1
            workers = local_ray_with_state_api.actor_pids("RayTrainWorker")  # this test's, from its cluster's state API
            assert len(workers) == 2
            assert local_ray_with_state_api.actor_pids("PreemptionWatcher") == []  # pad_ray's workers run without it
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)  # polling the store for a real checkpoint, not waiting for one
    runner.join(timeout=600)
    assert not failure, failure
    assert killed_at is not None, "expert 0 finished before it could be interrupted"

    resumed = store.info(0)["resumed_at"]
    assert resumed and resumed[0] >= killed_at  # restarted from its last checkpoint, not from zero
    reference = _reference(cfg, data, order, 2)
    for i in range(2):
        assert np.array_equal(store.load(i), reference[i])
    assert not store.partial_path(0).exists()


def _capture(failure, fn, *args):
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - surfaced by the test's assertion
        failure.append(exc)


@pytest.mark.slow
def test_el2n_seeds_in_parallel_give_the_sequential_order(local_ray, tmp_path):
    cfg = with_absolute_paths(tiny_config(tmp_path))
    data = tiny_dataset()
    parallel = ray_stages.difficulty_order(cfg, data)
    sequential = local_stages.difficulty_order(cfg.model_copy(update={"store_dir": str(tmp_path / "seq")}), data, CPU,
                                         progress=False)
    assert len(parallel) == len(sequential) == data.num_classes
    for a, b in zip(parallel, sequential, strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_distillation_from_object_refs_equals_distillation_from_files(local_ray, tmp_path):
    cfg = with_absolute_paths(tiny_config(tmp_path))
    data = tiny_dataset()
    from_files = local_stages.ensure_experts(cfg, data, _order(data), CPU, progress=False)
    store = TrajectoryStore(cfg.store_dir, cfg)
    refs = ray_stages.put_trajectories(store, 2, cfg.distill.last_sampled_epoch)
    windows = ray.get(refs)
    assert windows[0].dtype == np.float32 and not windows[0].flags.writeable  # zero-copy, read-only
    assert len(windows[0]) == cfg.distill.last_sampled_epoch + 2 or len(windows[0]) == len(from_files[0])

    a = distill(cfg, data, from_files, CPU, progress=False)
    b = distill(cfg, data, windows, CPU, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.syn_lr.item() == b.syn_lr.item()


@pytest.mark.slow
def test_workers_of_pad_rays_ray_reuse_freed_buffers_in_their_training_threads(ray_cluster):
    def faults_per_step_in_a_thread() -> float:
        """Minor page faults of one batch-1,024 training step of a ConvNet, run in a thread of its own as Ray
        Train and Tune run a worker's loop (steps 3 to 6: the buffers of the first two are there to reuse)."""
        import resource

        import torch.nn.functional as F

        from pad_ray.config import ModelConfig
        from pad_ray.models import seeded_model
        from pad_ray.runtime import keep_freed_memory_in_heap

        torch.set_num_threads(1)
        keep_freed_memory_in_heap()
        faults = {}

        def train() -> None:
            net = seeded_model(ModelConfig(width=32), 1, 10, 28, 0)
            x, y = torch.randn(1024, 1, 28, 28), torch.randint(0, 10, (1024,))
            for step in range(6):
                if step == 2:
                    faults["start"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                F.cross_entropy(net(x), y).backward()
            faults["end"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        thread = threading.Thread(target=train)
        thread.start()
        thread.join()
        return (faults["end"] - faults["start"]) / 4

    ray_stages.init_ray()  # joins this test's cluster (RAY_ADDRESS), as pad-ray and pad_ray.sweep do
    try:
        measure = ray.remote(num_cpus=1)(faults_per_step_in_a_thread)
        reused = ray.get(measure.remote())
        # The same task with glibc's default arenas: the thread's own arena unmaps its large buffers on free.
        refaulted = ray.get(measure.options(runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "8"}}).remote())
    finally:
        ray.shutdown()
    # A step's activations are several [1024, 32, 32, 32] float32 tensors. With the defaults each is faulted
    # in again at every step; with one arena less than one's worth is (the worker's other threads fault too).
    pages = 1024 * 32 * 32 * 32 * 4 / 4096
    assert refaulted > 4 * pages, (reused, refaulted)
    assert reused < pages, (reused, refaulted)


@pytest.mark.slow
def test_pad_ray_run_leaves_ray_before_it_distills(ray_cluster, tmp_path):
    """`pad-ray run` needs Ray only for EL2N and the experts: it disconnects (and stops a local Ray it
    started) before distilling in its own process, with the order and experts as local copies. Here the
    store is warm, so the Ray path trains nothing and the test's cluster outlives the call."""
    cfg = with_absolute_paths(tiny_config(tmp_path, resources={"workers": 2}))
    data, order = tiny_dataset(), _order(tiny_dataset())
    DifficultyCache(cfg.store_dir, cfg).save(order)
    reference = local_stages.ensure_experts(cfg, data, order, CPU, progress=False)

    got_order, trajectories = cli._experts_on_ray("run", cfg, data)
    assert not ray.is_initialized()
    assert all(torch.equal(a, b) for a, b in zip(got_order, order, strict=True))
    assert len(trajectories) == 2 and all(np.array_equal(t, r) for t, r in zip(trajectories, reference, strict=True))
    assert set(ray_cluster.control_processes()) == ray_cluster.head_pids  # disconnected, not stopped
    assert distill(cfg, data, trajectories, CPU, progress=False).iteration == cfg.distill.iterations


def test_distillation_window_keeps_sampled_rows_and_the_final_one():
    trajectory = np.arange(11 * 3, dtype=np.float32).reshape(11, 3)
    window = ray_stages.distillation_window(trajectory, 4)
    assert np.array_equal(window[:5], trajectory[:5]) and np.array_equal(window[-1], trajectory[-1])
    assert len(window) == 6
    assert len(ray_stages.distillation_window(trajectory, 9)) == 11
