"""Expert training throughput: a bare torch loop vs one Ray Train worker, one vs two workers, eager vs compiled.

    python3 benchmarks/experts.py [--quick] [--shape mnist]

Random data of CIFAR-10 shape, the distillation ConvNet (width 128, depth 3), SGD, DSA, every
training image in every epoch (IR 1), one torch thread per worker; `--shape mnist` instead gives the
`mnist-ipc10` experts' shape (1x28x28 images, width 32, batches of 1,024). Rows, each in a fresh process:

* `bare`: `pad_ray.experts.ExpertRun.run_epoch` in a plain loop (no Ray, no checkpoints).
* `ray_train x1`, `ray_train x2`: `pad_ray.ray_stages.generate_experts` on a local
  `ray.init(num_cpus=2)` with 1 worker training 1 expert, 2 workers training 2 experts.
* `compiled`: the same with `experts.compile` (torch.compile); the first epoch includes the compile.

Images/s are given two ways: end to end (the whole `generate_experts` call, worker start-up
included) and steady state (from the end of each expert's first epoch to the end of its last,
read from the per-epoch checkpoint files the workers write into the store, so nothing in pad_ray
is instrumented).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "experts"
SHAPES = {"cifar": {"channels": 3, "size": 32, "per_class": 100, "width": 128, "epochs": 5, "batch": 256},
          "mnist": {"channels": 1, "size": 28, "per_class": 1000, "width": 32, "epochs": 3, "batch": 1024}}
QUICK = {"channels": 3, "size": 32, "per_class": 10, "width": 16, "epochs": 3, "batch": 32}
ROWS = [("bare", 1, False), ("bare", 1, True), ("ray_train", 1, False), ("ray_train", 2, False),
        ("ray_train", 2, True)]


def _config(p: dict, root: str, workers: int, use_gpu: bool):
    from pad_ray.config import build_config

    return build_config({
        "seed": 0, "device": "auto", "output_dir": f"{root}/runs", "store_dir": f"{root}/store",
        "data": {"dataset": "cifar10" if p["channels"] == 3 else "mnist", "zca": False},
        "model": {"width": p["width"], "depth": 3},
        "schedule": {"init_ratio": 1.0, "add_end_epoch": 0, "remove": []},
        "experts": {"num_experts": workers, "epochs": p["epochs"], "optimizer": "sgd",
                    "batch_size": p["batch"], "lr": 0.01, "dsa": True, "compile": p["compile"]},
        "distill": {"ipc": 1, "alpha": 0.0, "syn_steps": 1, "expert_epochs": 1, "min_start_epoch": 0,
                    "current_max_start_epoch": 1, "max_start_epoch": 1, "batch_syn": 10, "lr_img": 1.0,
                    "lr_lr": 1e-5, "lr_y": 1.0},
        "resources": {"workers": workers, "cpus_per_worker": 1, "use_gpu": use_gpu, "max_failures": 0},
    }, "benchmark")


def _data(p: dict):
    import torch

    from pad_ray.data import Dataset, Split

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(p["per_class"])
    channels, size = p["channels"], p["size"]
    train = Split(torch.randn(len(labels), channels, size, size, generator=gen), labels, torch.arange(len(labels)))
    # The Ray rows measure each expert on val (every epoch) and test, as the real stage does: a tenth of the
    # images each, about MNIST's share, so that the bare row's loop is not compared with ten times its work.
    tenth = Split(train.images[::10], labels[::10], train.index[::10])
    order = [torch.nonzero(labels == c).flatten() for c in range(10)]
    return Dataset("cifar10" if channels == 3 else "mnist", train, tenth, tenth, 10, [str(c) for c in range(10)],
                   None, (0.0,) * channels, (1.0,) * channels), order


def _images_per_expert(cfg, order) -> list[int]:
    from pad_ray.schedule import scheduled_indices

    return [len(scheduled_indices(e, order, cfg.schedule)) for e in range(cfg.experts.epochs)]


class _EpochWatcher(threading.Thread):
    """Records when each expert's per-epoch checkpoint (and its final trajectory) appears or changes."""

    def __init__(self, store, count: int):
        super().__init__(daemon=True)
        self.store, self.count, self.stop = store, count, threading.Event()
        self.events: dict[int, list[float]] = {i: [] for i in range(count)}

    def run(self) -> None:
        seen: dict[str, int] = {}
        while not self.stop.is_set():
            for i in range(self.count):
                for kind, path in (("partial", self.store.partial_path(i)), ("final", self.store._paths(i)[0])):
                    try:
                        mtime = os.stat(path).st_mtime_ns
                    except OSError:
                        continue
                    key = f"{kind}{i}"
                    if seen.get(key) != mtime:
                        seen[key] = mtime
                        self.events[i].append(mtime / 1e9)
            time.sleep(0.01)


def child(p: dict) -> dict:
    import torch

    from pad_ray.runtime import derive_seed

    data, order = _data(p)
    with tempfile.TemporaryDirectory() as root:
        if p["mode"] == "bare":
            from pad_ray.experts import ExpertRun

            dev = common.device()
            torch.set_num_threads(1)
            cfg = _config(p, root, 1, False)
            train = data.train
            if dev.type == "cuda":
                from pad_ray.data import Split

                train = Split(train.images.to(dev), train.labels.to(dev), train.index)
            per_epoch = _images_per_expert(cfg, order)
            began = time.perf_counter()
            run = ExpertRun(train, order, 10, cfg.model, cfg.experts, cfg.schedule,
                            derive_seed(cfg.seed, "expert", 0), dev)
            ends = []
            while run.epoch < cfg.experts.epochs:
                run.run_epoch()
                common.sync(dev)
                ends.append(time.perf_counter())
            total_s = ends[-1] - began
            steady_s = ends[-1] - ends[0]
            return {**p, "device": str(dev), "experts": 1, "images": sum(per_epoch), "wall_s": total_s,
                    "images_per_s": sum(per_epoch) / total_s, "steady_images_per_s": sum(per_epoch[1:]) / steady_s,
                    "epoch_ends_s": [e - began for e in ends]}

        import ray

        from pad_ray import ray_stages
        from pad_ray.trajectories import TrajectoryStore

        workers = p["workers"]
        began = time.perf_counter()
        # The workers' environment of pad_ray's own drivers (ray_stages.init_ray): one malloc arena (section 2).
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": ray_stages.WORKER_ENV})
        init_s = time.perf_counter() - began
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            cfg = _config(p, root, workers, gpus >= workers)
            store = TrajectoryStore(cfg.store_dir, cfg)
            watcher = _EpochWatcher(store, workers)
            watcher.start()
            wall_began = time.time()
            began = time.perf_counter()
            ray_stages.generate_experts([ray_stages.ExpertSet(cfg, data, order)])
            fit_s = time.perf_counter() - began
            time.sleep(0.05)
            watcher.stop.set()
            watcher.join()
        finally:
            ray.shutdown()
        per_epoch = _images_per_expert(cfg, order)
        steady = []
        for i, events in watcher.events.items():
            if len(events) >= 2:  # first epoch's checkpoint ... final trajectory
                steady.append(sum(per_epoch[1:]) / (events[-1] - events[0]))
        images = workers * sum(per_epoch)
        return {**p, "device": "cuda" if gpus >= workers else "cpu", "experts": workers, "images": images,
                "ray_init_s": init_s, "wall_s": fit_s, "images_per_s": images / fit_s,
                "images_per_s_per_worker": images / fit_s / workers,
                "steady_images_per_s": sum(steady) if len(steady) == workers else None,
                "steady_images_per_s_per_worker": (sum(steady) / workers) if len(steady) == workers else None,
                "first_epoch_end_after_s": (min(e[0] for e in watcher.events.values() if e) - wall_began)
                if any(watcher.events.values()) else None,
                "epoch_events_s": {i: [round(t - wall_began, 3) for t in e] for i, e in watcher.events.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = common.parse_args(__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cifar", help="data and network sizes")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else SHAPES[args.shape]
    meta = common.machine()
    print(f"# {NAME} on {meta['cpu']} ({meta['usable_cores']} cores), load {meta['load_average_at_start']}",
          flush=True)
    rows = []
    for mode, workers, compiled in ROWS:
        row = common.run_child(__file__, {**sizes, "mode": mode, "workers": workers, "compile": compiled},
                               timeout_s=1200, attempts=2)
        row["name"] = (mode if mode == "bare" else f"ray_train x{workers}") + (", compiled" if compiled else "")
        rows.append(row)
        print(row["name"], {k: row.get(k) for k in ("wall_s", "images_per_s", "steady_images_per_s", "error")},
              flush=True)

    def measured(mode: str, workers: int, compiled: bool) -> dict | None:
        return next((r for r in rows if (r.get("mode"), r.get("workers"), r.get("compile")) == (mode, workers, compiled)
                     and "images_per_s" in r), None)

    bare, one, two = measured("bare", 1, False), measured("ray_train", 1, False), measured("ray_train", 2, False)
    summary = {}
    for eager, compiled, name in ((bare, measured("bare", 1, True), "bare"),
                                  (two, measured("ray_train", 2, True), "two_workers")):
        if eager and compiled:
            summary[f"compiled_vs_eager_{name}_end_to_end"] = compiled["images_per_s"] / eager["images_per_s"]
            if eager.get("steady_images_per_s") and compiled.get("steady_images_per_s"):
                summary[f"compiled_vs_eager_{name}_steady"] = (compiled["steady_images_per_s"]
                                                             / eager["steady_images_per_s"])
    if bare and one:
        summary["ray_worker_vs_bare_end_to_end"] = one["images_per_s"] / bare["images_per_s"]
        if one.get("steady_images_per_s"):
            summary["ray_worker_vs_bare_steady"] = one["steady_images_per_s"] / bare["steady_images_per_s"]
    if one and two:
        summary["two_vs_one_worker_end_to_end"] = two["images_per_s"] / one["images_per_s"]
        if one.get("steady_images_per_s") and two.get("steady_images_per_s"):
            summary["two_vs_one_worker_steady"] = two["steady_images_per_s"] / one["steady_images_per_s"]
    columns = [("name", "run"), ("experts", "experts"), ("images", "images"), ("ray_init_s", "ray.init s"),
               ("wall_s", "train s"), ("images_per_s", "img/s end-to-end"),
               ("steady_images_per_s", "img/s steady"), ("first_epoch_end_after_s", "1st epoch end s"),
               ("error", "error")]
    common.report(NAME if args.shape == "cifar" else f"{NAME}-{args.shape}", args.quick, meta, rows, columns, summary)
    return 0


if __name__ == "__main__":
    common.entry(child, main)
