"""Trajectory hand-off through the Ray object store, as a share of one distillation iteration.

    python3 benchmarks/object_store.py [--quick]

The driver stores `experts` trajectories of the CIFAR-10 ConvNet (P = 320,010) in a
`TrajectoryStore` and puts their distillation windows (`put_trajectories`, the cifar10-ipc10
preset: rows 0..22 plus the final row) into the object store of a local `ray.init(num_cpus=2)`.
A Ray task, i.e. another process as a Tune trial is, then does what a trial does:
`ray.get` of all the refs once (zero-copy), and per outer iteration the two snapshot copies of
`Distiller.step` (`pad_ray.distill._snapshot` of rows s and s + M, random s). Shares are given
against the measured iteration times in `results/distill_iteration.json` (else the reference).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "object_store"
FULL = {"experts": 10, "epochs": 30, "snapshots": 400, "width": 128}
QUICK = {"experts": 3, "epochs": 30, "snapshots": 50, "width": 16}


def child(p: dict) -> dict:
    import numpy as np
    import ray
    import torch

    from pad_ray import ray_stages
    from pad_ray.config import build_config
    from pad_ray.models import ConvNet, FlatParams
    from pad_ray.trajectories import TrajectoryStore

    size = FlatParams(ConvNet(3, 10, 32, p["width"], 3)).size
    with tempfile.TemporaryDirectory() as root:
        cfg = build_config({"preset": "cifar10-ipc10", "data": {"root": root}, "output_dir": root,
                            "store_dir": f"{root}/store", "schedule": {"remove": []},
                            "model": {"width": p["width"]},
                            "experts": {"epochs": p["epochs"], "num_experts": p["experts"]}}, "benchmark")
        store = TrajectoryStore(cfg.store_dir, cfg)
        rng = np.random.default_rng(0)
        for i in range(p["experts"]):
            store.save(i, rng.standard_normal((p["epochs"] + 1, size), dtype=np.float32))
        last_epoch = cfg.distill.last_sampled_epoch
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            began = time.perf_counter()
            refs = ray_stages.put_trajectories(store, p["experts"], last_epoch)
            put_s = time.perf_counter() - began
            window_bytes = sum(ray_stages.distillation_window(store.load(i), last_epoch).nbytes
                               for i in range(p["experts"]))

            @ray.remote(num_cpus=1)
            def trial_side(refs, snapshots: int, expert_epochs: int, max_start: int) -> dict:
                from pad_ray.distill import _snapshot

                torch.set_num_threads(1)
                dev = torch.device("cpu")
                began = time.perf_counter()
                trajectories = ray.get(refs)
                get_s = time.perf_counter() - began
                gen = torch.Generator().manual_seed(0)
                times = []
                for k in range(snapshots):
                    expert = k % len(trajectories)
                    start_epoch = int(torch.randint(0, max_start, (1,), generator=gen))
                    t0 = time.perf_counter()
                    start = _snapshot(trajectories[expert], start_epoch, dev)
                    target = _snapshot(trajectories[expert], start_epoch + expert_epochs, dev)
                    times.append(time.perf_counter() - t0)
                    assert start.shape == target.shape
                first_pass = times[:len(trajectories)]
                return {"get_s": get_s, "zero_copy": not trajectories[0].flags.writeable,
                        "snapshot_pair_s_median": sorted(times)[len(times) // 2],
                        "snapshot_pair_s_mean": sum(times) / len(times),
                        "snapshot_pair_s_first_touch": sum(first_pass) / len(first_pass),
                        "snapshot_pair_s_max": max(times)}

            d = cfg.distill
            measured = ray.get(trial_side.remote(refs, p["snapshots"], d.expert_epochs, d.max_start_epoch))
        finally:
            ray.shutdown()
    return {**p, "flat_params": size, "window_rows": last_epoch + 2, "window_mb_total": window_bytes / 1e6,
            "put_s": put_s, **measured}


def _iteration_times(quick: bool) -> dict[str, float]:
    found = common.read_results("distill_iteration", quick)
    times = {}
    if found:
        for row in found["rows"]:
            if "s_per_iter" in row:
                times[f"{row['path']} ipc{row['ipc']} N{row['steps']}"] = row["s_per_iter"]
    if not times:
        times = {"reference ipc1 N20": 1.95, "reference ipc10 N20": 28.4}
    return times


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0]).parse_args(argv)
    meta = common.machine()
    print(f"# {NAME} on {meta['cpu']} ({meta['usable_cores']} cores), load {meta['load_average_at_start']}",
          flush=True)
    row = common.run_child(__file__, QUICK if args.quick else FULL, timeout_s=900, attempts=2)
    if "error" in row:
        print("ERROR", row["error"])
        common.write_results(NAME, args.quick, meta, [row])
        return 1
    iterations = _iteration_times(args.quick)
    rows = []
    for name, seconds in sorted(iterations.items(), key=lambda kv: kv[1]):
        rows.append({"iteration": name, "s_per_iter": seconds,
                     "snapshot_share": row["snapshot_pair_s_mean"] / seconds,
                     "snapshot_first_touch_share": row["snapshot_pair_s_first_touch"] / seconds,
                     "get_once_share": row["get_s"] / seconds})
    summary = {"ray_get_all_windows_s": row["get_s"], "put_trajectories_s": row["put_s"],
               "windows_mb": row["window_mb_total"], "zero_copy": row["zero_copy"],
               "snapshot_pair_ms_mean": row["snapshot_pair_s_mean"] * 1e3,
               "snapshot_pair_ms_first_touch": row["snapshot_pair_s_first_touch"] * 1e3,
               "worst_per_iteration_share": max(r["snapshot_first_touch_share"] for r in rows),
               "worst_get_once_share": max(r["get_once_share"] for r in rows)}
    print()
    print(common.table(rows, [("iteration", "iteration"), ("s_per_iter", "s/iter"),
                              ("snapshot_share", "2 snapshots / iter"),
                              ("snapshot_first_touch_share", "first touch / iter"),
                              ("get_once_share", "ray.get once / iter")]))
    print()
    for key, value in summary.items():
        print(f"{key}: {common.fmt(value)}")
    print(f"\nwrote {common.write_results(NAME, args.quick, meta, [row] + rows, summary)}")
    return 0


if __name__ == "__main__":
    common.entry(child, main)
