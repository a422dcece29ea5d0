"""The GPU path: the CPU tests' checks that matter, run on CUDA (`pytest -m cuda`).

Every test here is skipped, with torch's reason, where CUDA is not usable. Random draws come from CPU
generators on every device, so a CUDA run must draw exactly what the CPU run draws (experts, start
epochs, minibatches, DSA parameters); the arithmetic may differ in the last bits (other kernels, and
atomic adds in some CUDA backward passes), so numbers are compared with tolerances.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import tiny_config, tiny_dataset
from pad_ray import local_stages
from pad_ray.augment import DSA
from pad_ray.config import with_absolute_paths
from pad_ray.difficulty import el2n_run
from pad_ray.distill import Distiller, distill
from pad_ray.evaluate import evaluate, train_on
from pad_ray.experts import train_expert
from pad_ray.models import seeded_model
from pad_ray.runtime import cuda_unusable_reason, derive_seed, peak_memory_mb
from test_augment import draws_equal, gen, images
from test_clipping import check_an_exploding_step_is_bounded
from test_matching import check_two_pass_equals_unrolled

# is_available() does not initialise CUDA, so a GPU machine's test process stays uninitialised until a test runs.
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA device: {None if torch.cuda.is_available() else cuda_unusable_reason()}")]

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# -- matching ---------------------------------------------------------------------------------

@pytest.mark.parametrize("selection", ["depth", "loss", "none"])
@pytest.mark.parametrize("dsa", [False, True])
def test_two_pass_gradients_equal_the_unrolled_ones_on_cuda(selection, dsa):
    check_two_pass_equals_unrolled(selection, dsa, "cuda")


# -- DSA --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))  # enough seeds that every family is drawn
def test_dsa_draws_the_same_per_seed_on_cuda_and_cpu(seed):
    dsa, x = DSA(), images()
    on_cpu_gen, on_cuda_gen = gen(seed), gen(seed)
    on_cpu = dsa(x, on_cpu_gen)
    on_cuda = dsa(x.cuda(), on_cuda_gen)
    assert torch.equal(on_cpu_gen.get_state(), on_cuda_gen.get_state())  # the same number of draws
    assert draws_equal(dsa.sample(8, (32, 32), gen(seed)), dsa.sample(8, (32, 32), gen(seed)))
    assert torch.equal(on_cuda, dsa(x.cuda(), gen(seed)))  # reproducible on the GPU
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-5, atol=1e-5)


# -- distillation and evaluation ----------------------------------------------------------------

@pytest.mark.parametrize("gradient", ["unrolled", "constant_memory", "auto"])
def test_short_distillation_on_cuda_draws_what_the_cpu_run_draws(tiny, gradient):
    _, data, _, trajectories = tiny
    cfg = tiny_config(distill={"gradient": gradient})
    reports = {}

    def keep(device):
        return lambda distiller, metrics: reports.setdefault(device, []).append(metrics)

    on_cuda = distill(cfg, data, trajectories, CUDA, on_eval=keep("cuda"), progress=False)
    on_cpu = distill(cfg, data, trajectories, CPU, on_eval=keep("cpu"), progress=False)
    assert on_cuda.images.device.type == on_cuda.labels.device.type == on_cuda.syn_lr.device.type == "cuda"
    for a, b in zip(reports["cuda"], reports["cpu"]):
        assert [(s["expert"], s["start_epoch"]) for s in a["steps"]] == \
               [(s["expert"], s["start_epoch"]) for s in b["steps"]]
        assert all(np.isfinite(a[k]) for k in ("loss", "syn_lr", "val_accuracy", "test_accuracy"))
        assert a["peak_memory_mb"] > 0
    # The first step starts from the same set, so only the arithmetic separates the two losses.
    assert reports["cuda"][0]["steps"][0]["loss"] == pytest.approx(reports["cpu"][0]["steps"][0]["loss"], rel=1e-4)
    assert on_cuda.iteration == on_cpu.iteration == cfg.distill.iterations


def test_an_exploding_step_on_cuda_is_clipped_to_its_bound(tiny):
    check_an_exploding_step_is_bounded(tiny, CUDA)


def test_initial_set_on_cuda_is_the_cpu_one(tiny):
    cfg, data, _, trajectories = tiny
    for pix_init in ("correct", "real", "noise"):
        run = tiny_config(distill={"pix_init": pix_init})
        on_cuda, on_cpu = Distiller(run, data, trajectories, CUDA), Distiller(run, data, trajectories, CPU)
        assert torch.equal(on_cuda.images.cpu(), on_cpu.images), pix_init
        torch.testing.assert_close(on_cuda.labels.cpu(), on_cpu.labels, rtol=1e-5, atol=1e-5)


def test_a_cuda_checkpoint_resumes_on_the_cpu(tiny, tmp_path):
    cfg, data, _, trajectories = tiny
    on_cuda = Distiller(cfg, data, trajectories, CUDA)
    on_cuda.step()
    on_cuda.step()
    on_cuda.save(tmp_path / "state.pt")
    on_cpu = Distiller(cfg, data, trajectories, CPU)
    on_cpu.restore(tmp_path / "state.pt")
    assert on_cpu.iteration == 2 and torch.equal(on_cpu.images.detach(), on_cuda.images.detach().cpu())
    on_cpu.step()  # the optimisers' momenta came back on the CPU too
    assert on_cpu.iteration == 3


def test_evaluation_on_cuda_trains_the_nets_the_cpu_trains(tiny):
    cfg, data, _, trajectories = tiny
    synthetic = Distiller(cfg, data, trajectories, CPU).synthetic()
    nets = {}
    for name, device in (("cpu", CPU), ("cuda", CUDA)):
        net = seeded_model(cfg.model, 1, 3, 8, 5).to(device)
        nets[name] = train_on(synthetic, net, cfg.evaluate, 5, device)
    for a, b in zip(nets["cuda"].parameters(), nets["cpu"].parameters()):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-4, atol=1e-4)
    scores = evaluate(synthetic, data.val, data.test, 3, cfg.model, cfg.evaluate, 7, CUDA)
    assert len(scores.test["convnet"]) == cfg.evaluate.num_nets
    assert all(0.0 <= acc <= 1.0 for acc in scores.val["convnet"] + scores.test["convnet"])


def test_peak_memory_on_cuda_is_what_the_process_reserved():
    torch.ones(1 << 20, device=CUDA)
    assert peak_memory_mb(CUDA) >= torch.cuda.max_memory_allocated(CUDA) / 2**20 >= 4


# -- EL2N and experts --------------------------------------------------------------------------

def test_el2n_on_cuda_scores_what_the_cpu_scores():
    cfg, data = tiny_config(), tiny_dataset()
    seed = derive_seed(cfg.data.seed, "el2n", 0)
    on_cuda = el2n_run(data.train, 3, cfg.model, cfg.difficulty, seed, CUDA)
    on_cpu = el2n_run(data.train, 3, cfg.model, cfg.difficulty, seed, CPU)
    assert on_cuda.device.type == "cpu"
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "gsam"])
def test_expert_on_cuda_follows_the_cpu_trajectory(tiny, optimizer):
    cfg, data, order, _ = tiny
    experts = cfg.experts.model_copy(update={"optimizer": optimizer})
    seed = derive_seed(cfg.experts.seed, "expert", 0)
    trajectories = {name: train_expert(data.train, order, 3, cfg.model, experts, cfg.schedule, seed, device)
                    for name, device in (("cpu", CPU), ("cuda", CUDA))}
    np.testing.assert_allclose(trajectories["cuda"], trajectories["cpu"], rtol=1e-3, atol=1e-4)


def test_expert_on_ray_train_with_a_gpu(tmp_path, ray_cluster_with_a_gpu):
    import ray

    from pad_ray import ray_stages

    cfg = with_absolute_paths(tiny_config(tmp_path, resources={"use_gpu": True, "workers": 1, "max_failures": 0}))
    data = tiny_dataset()
    order = [torch.nonzero(data.train.labels == c).flatten() for c in range(3)]
    reference = local_stages.ensure_experts(cfg.model_copy(update={"store_dir": cfg.store_dir + "-cpu"}), data, order,
                                      CPU, progress=False)
    ray.init(address=ray_cluster_with_a_gpu.address, log_to_driver=False)
    try:
        (store,) = ray_stages.generate_experts([ray_stages.ExpertSet(cfg, data, order)])
    finally:
        ray.shutdown()
    for i in range(cfg.experts.num_experts):
        trained = store.load(i)
        np.testing.assert_allclose(trained, reference[i], rtol=1e-3, atol=1e-4)
        # Bit-equal to the CPU run would mean the worker quietly trained on the CPU.
        assert not np.array_equal(trained, reference[i]), f"expert {i} was not trained on the GPU"
