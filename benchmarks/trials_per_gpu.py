"""How many distillation trials one GPU holds at once, and their total throughput.

    python3 benchmarks/trials_per_gpu.py [--quick] [--concurrent 1,2,4] [--path constant_memory] [--ipc 10]

Each row runs K Ray Tune trials at once on one GPU, each with `trial_resources.gpu = 1/K` (what a sweep
file's fractional `trial_resources.gpu` asks for), on a local `ray.init(num_gpus=1)` in a fresh process.
A trial is one distillation iteration repeated (`plan_steps` + the gradient path, as in
distill_iteration.py) on the CIFAR-10 ConvNet with random images: the paper's IPC 10 setting by default
(N 80, batch_syn 100), IPC 50 with `--ipc 50` (batch_syn 500). Each trial warms up with one iteration,
waits until every trial is warm, then times `iterations`. The row's throughput is all trials' timed
iterations over the span from the first timed start to the last timed end; `overlapped` says whether
every trial started timing before any finished (otherwise the trials did not really share the GPU).
Peak memory per trial is what its process reserved on the GPU (`pad_ray.runtime.peak_memory_mb`).

Without CUDA the trials run on the CPU with fake GPUs (PAD_RAY_FAKE_GPUS=1): a check of the script
only, whose figures mean nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "trials_per_gpu"
PAPER = {10: {"batch": 100, "steps": 80}, 50: {"batch": 500, "steps": 80}}  # cifar10-ipc10 / -ipc50 presets
FULL_MODEL = {"classes": 10, "channels": 3, "size": 32, "width": 128, "depth": 3}
QUICK = {"classes": 10, "channels": 3, "size": 32, "width": 16, "depth": 3, "ipc": 1, "batch": 10, "steps": 4,
         "iterations": 2}


def _trial(config: dict) -> None:
    """One Tune trial: the device its GPU share gives it, then timed distillation iterations."""
    import torch
    from ray import tune

    from pad_ray import ray_stages
    from pad_ray.augment import DSA
    from pad_ray.matching import gradient_path, plan_steps
    from pad_ray.models import ConvNet, FlatParams
    from pad_ray.runtime import peak_memory_mb

    p = config["p"]
    torch.set_num_threads(1)
    dev = ray_stages.task_device()
    torch.manual_seed(config["index"])
    net = FlatParams(ConvNet(p["channels"], p["classes"], p["size"], p["width"], p["depth"]).to(dev))
    n, size = p["ipc"] * p["classes"], p["size"]
    gen = torch.Generator().manual_seed(config["index"])
    images = torch.randn(n, p["channels"], size, size, generator=gen).to(dev)
    labels = torch.randn(n, p["classes"], generator=gen).to(dev)
    syn_lr = torch.tensor(0.01, device=dev)
    start = net.flatten()
    target = start + 0.01 * torch.randn(start.shape, generator=gen).to(dev)
    dsa = DSA()
    gradients = gradient_path(p["path"])

    def iteration() -> None:
        plan = plan_steps(n, min(p["batch"], n), p["steps"], (size, size), dsa, gen)
        gradients(net, images, labels, syn_lr, start, target, plan, dsa, 0.25, "depth")

    iteration()
    common.sync(dev)
    # Trials start seconds apart; timing starts once all are warm, so the timed spans share the GPU.
    barrier = Path(config["barrier"])
    (barrier / f"ready-{config['index']}").touch()
    deadline = time.time() + 600
    while len(list(barrier.glob("ready-*"))) < config["trials"] and time.time() < deadline:
        time.sleep(0.05)
    began = time.time()
    for _ in range(p["iterations"]):
        iteration()
    common.sync(dev)
    ended = time.time()
    tune.report({"began": began, "ended": ended, "s_per_iter": (ended - began) / p["iterations"],
                 "peak_mb": peak_memory_mb(dev), "device": str(dev)})


def child(p: dict) -> dict:
    import ray
    import torch
    from ray import tune

    k = p["concurrent"]
    fake = not torch.cuda.is_available()
    if fake:
        os.environ["PAD_RAY_FAKE_GPUS"] = "1"  # workers inherit it from this process's local Ray
    ray.init(address="local", num_cpus=max(k, 1) + 1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as root:
            barrier = Path(root) / "barrier"
            barrier.mkdir()
            results = tune.Tuner(
                tune.with_resources(_trial, {"cpu": 1, "gpu": 1 / k}),
                param_space={"p": p, "index": tune.grid_search(list(range(k))), "trials": k,
                             "barrier": str(barrier)},
                tune_config=tune.TuneConfig(max_concurrent_trials=k),
                run_config=tune.RunConfig(name=NAME, storage_path=root, verbose=0),
            ).fit()
            trials = [r.metrics for r in results if r.error is None and r.metrics and "began" in r.metrics]
            errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error is not None]
    finally:
        ray.shutdown()
    row = {**p, "gpu_per_trial": 1 / k, "fake_gpu": fake, "finished": len(trials), "errors": errors or None}
    if trials:
        first, last = min(t["began"] for t in trials), max(t["ended"] for t in trials)
        row.update({
            "device": trials[0]["device"],
            "s_per_iter_per_trial": common.median([t["s_per_iter"] for t in trials]),
            "total_iters_per_s": len(trials) * p["iterations"] / (last - first),
            "overlapped": max(t["began"] for t in trials) < min(t["ended"] for t in trials),
            "peak_gb_per_trial": max(t["peak_mb"] for t in trials) * 2**20 / common.GB,
        })
    return row


def main(argv: list[str] | None = None) -> int:
    parser = common.parse_args(__doc__.splitlines()[0])
    parser.add_argument("--concurrent", default="1,2,4", help="trials sharing the GPU, one row each")
    parser.add_argument("--path", default="constant_memory", choices=["constant_memory", "unrolled"])
    parser.add_argument("--ipc", type=int, default=10, choices=sorted(PAPER))
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per trial")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else {**FULL_MODEL, "ipc": args.ipc, **PAPER[args.ipc], "iterations": args.iterations}
    meta = common.machine()
    if not meta["cuda"] and not args.quick:
        print(f"{NAME}: needs a CUDA device (without one only --quick runs, as a check of the script)")
        return 2
    print(f"# {NAME}: {meta['cuda'] or 'no CUDA (fake GPUs, figures mean nothing)'}, torch {meta['torch']}",
          flush=True)
    rows = []
    for k in (int(c) for c in args.concurrent.split(",")):
        row = common.run_child(__file__, {**shape, "path": args.path, "concurrent": k}, timeout_s=3600)
        print(f"{k} concurrent: {row.get('total_iters_per_s', row.get('error'))}", flush=True)
        rows.append(row)
    alone = next((r.get("total_iters_per_s") for r in rows if r.get("concurrent") == 1), None)
    for row in rows:
        if alone and row.get("total_iters_per_s"):
            row["throughput_vs_one"] = row["total_iters_per_s"] / alone
    columns = [("concurrent", "trials"), ("gpu_per_trial", "gpu each"), ("path", "path"), ("ipc", "IPC"),
               ("batch", "batch"), ("steps", "N"), ("finished", "finished"), ("s_per_iter_per_trial", "s/iter each"),
               ("total_iters_per_s", "iters/s total"), ("throughput_vs_one", "x one trial"),
               ("peak_gb_per_trial", "peak GB each"), ("overlapped", "overlapped"), ("errors", "errors")]
    best = max((r for r in rows if r.get("total_iters_per_s")), key=lambda r: r["total_iters_per_s"], default=None)
    summary = {"device": meta["cuda"] or "cpu (fake GPUs)",
               "best_concurrency": best["concurrent"] if best else None}
    common.report(NAME if args.path == "constant_memory" and args.ipc == 10 else f"{NAME}-{args.path}-ipc{args.ipc}",
                  args.quick, meta, rows, columns, summary)
    return 0


if __name__ == "__main__":
    common.entry(child, main)
