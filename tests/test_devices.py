"""Device choice on the CPU: which CUDA index a Ray worker uses, and a GPU that torch cannot use failing
loudly on a real local Ray with a fake GPU (issue 11, item 7). The checks that need CUDA are in test_cuda.py."""

from __future__ import annotations


import pytest
import ray
import torch

from conftest import tiny_config, tiny_dataset
from pad_ray import ray_stages
from pad_ray.config import to_dict, with_absolute_paths
from pad_ray.difficulty import el2n_run
from pad_ray.runtime import cuda_unusable_reason, derive_seed, visible_cuda_index
from pad_ray.sweep_config import SweepConfig

# On a GPU machine the fake GPU of `ray.init(num_gpus=1)` is the real one: these make CUDA unusable in every
# worker (none visible; Ray told not to re-set the variable per task; Ray Train told not to share its GPUs).
NO_CUDA = {"CUDA_VISIBLE_DEVICES": "", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
           "RAY_TRAIN_ENABLE_SHARE_CUDA_VISIBLE_DEVICES": "0"}


@pytest.mark.parametrize(("ids", "visible", "index"), [
    (["0"], "0", 0),          # a task or trial: only its own GPU is visible
    (["1"], "0,1", 1),        # the second Train worker on a 2-GPU node sees both
    ([3], "2,3", 1),          # Ray may give ids as ints
    (["2"], "5, 2", 1),
    ([], None, 0),
    (["1"], None, 0),         # nothing hidden: torch's own first device
])
def test_visible_cuda_index_is_the_assigned_gpu_among_the_visible_ones(ids, visible, index):
    assert visible_cuda_index(ids, visible) == index


def test_cuda_unusable_reason_is_given_exactly_when_cuda_is_unusable():
    reason = cuda_unusable_reason()
    assert (reason is None) == torch.cuda.is_available()
    if reason is not None:
        assert reason and "\n" not in reason


@pytest.fixture(scope="module")
def fake_gpu_ray(ray_cluster_with_a_gpu):
    ray.init(address=ray_cluster_with_a_gpu.address, log_to_driver=False, runtime_env={"env_vars": NO_CUDA})
    yield
    ray.shutdown()


def _gpu_config(tmp_path, **sections):
    return with_absolute_paths(tiny_config(tmp_path, resources={"use_gpu": True, "workers": 1, "max_failures": 0}, **sections))


def _order(data):
    return [torch.nonzero(data.train.labels == c).flatten() for c in range(data.num_classes)]


@pytest.mark.slow
def test_el2n_task_on_an_unusable_gpu_fails_with_the_reason(fake_gpu_ray, tmp_path):
    with pytest.raises(Exception, match=r"Ray assigned this worker 1 GPU .* cannot use CUDA: \S") as raised:
        ray_stages.difficulty_order(_gpu_config(tmp_path), tiny_dataset())
    assert isinstance(raised.value.as_instanceof_cause(), ray_stages.GPUUnusableError)


@pytest.mark.slow
def test_expert_worker_on_an_unusable_gpu_fails_with_the_reason(fake_gpu_ray, tmp_path):
    cfg = _gpu_config(tmp_path)
    data = tiny_dataset()
    with pytest.raises(Exception, match=r"GPUUnusableError: Ray assigned this worker 1 GPU .* cannot use CUDA"):
        ray_stages.generate_experts([ray_stages.ExpertSet(cfg, data, _order(data))])
    assert ray_stages.TrajectoryStore(cfg.store_dir, cfg).missing(cfg.experts.num_experts) == [0, 1]


@pytest.mark.slow
def test_sweep_trial_on_an_unusable_gpu_fails_with_the_reason(fake_gpu_ray, tmp_path):
    from ray import tune

    from pad_ray.trial import pad_trial

    sweep = SweepConfig.model_validate({"name": "gpu", "base": to_dict(_gpu_config(tmp_path)),
                                        "space": {"alpha": {"kind": "grid", "values": [0.1]}}})
    # The trial asks for its device before it touches the experts, so none are needed to reach the check.
    trainable = tune.with_parameters(pad_trial, sweep=sweep.model_dump(mode="json"), data=tiny_dataset(),
                                     experts={}, threads=1)
    results = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1, "gpu": 1}), param_space={"alpha": 0.1},
        run_config=tune.RunConfig(name="gpu", storage_path=str(tmp_path / "tune"),
                                  failure_config=tune.FailureConfig(max_failures=0)),
    ).fit()
    assert len(results.errors) == 1
    assert "GPUUnusableError: Ray assigned this worker 1 GPU" in str(results.errors[0])


@pytest.mark.slow
def test_fake_gpus_opt_in_runs_on_the_cpu(fake_gpu_ray, tmp_path):
    cfg = _gpu_config(tmp_path)
    data = tiny_dataset()
    task = ray_stages._el2n_task.options(num_cpus=1, num_gpus=1,
                                          runtime_env={"env_vars": {**NO_CUDA, ray_stages.FAKE_GPUS_ENV: "1"}})
    seed = derive_seed(cfg.data.seed, "el2n", 0)
    scores = ray.get(task.remote(data.train, data.num_classes, to_dict(cfg), seed, 1))
    expected = el2n_run(data.train, data.num_classes, cfg.model, cfg.difficulty, seed, torch.device("cpu"))
    assert torch.equal(scores, expected)


@pytest.mark.slow
def test_a_task_plans_on_its_share_of_the_node_and_of_its_gpu(fake_gpu_ray):
    # The test cluster has 2 CPUs and 1 GPU: auto's default memory budget is scaled by these shares.
    share = ray.remote(ray_stages.task_memory_share)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ray.get(share.options(num_cpus=1).remote(cpu)) == 0.5
    assert ray.get(share.options(num_cpus=2).remote(cpu)) == 1.0
    assert ray.get(share.options(num_cpus=1, num_gpus=0.25).remote(cuda)) == 0.25
    assert ray.get(share.options(num_cpus=1, num_gpus=1).remote(cuda)) == 1.0
