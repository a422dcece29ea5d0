"""What torch's threads cost when processes share the cores: the same training steps, alone and side by side.

    python3 benchmarks/thread_contention.py [--quick]

Each process trains the smoke preset's ConvNet (width 32, MNIST's 28x28, batches of 128) for a fixed number of
SGD steps. Rows: 1 or 2 such processes at once, each with 1 or 2 torch threads, under GNU OpenMP's default wait
policy (threads spin a while before they sleep) or OMP_WAIT_POLICY=PASSIVE (they sleep at once). Reported per row:
the slowest process's wall time and the CPU time of all of them, against the same steps on one thread alone. The
test suite runs two tests at once on 2 cores, so its processes are in the "2 at once" rows (BENCHMARKS.md, section 8).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "thread_contention"
ROWS = [(1, 1, "default"), (1, 2, "default"), (1, 2, "PASSIVE"),
        (2, 1, "default"), (2, 2, "default"), (2, 2, "PASSIVE")]  # (processes, threads each, wait policy)


def child(p: dict) -> dict:
    import torch

    from pad_ray.config import ModelConfig
    from pad_ray.models import seeded_model

    torch.set_num_threads(p["threads"])
    net = seeded_model(ModelConfig(width=32), channels=1, num_classes=10, image_size=28, seed=0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=generator), torch.randint(0, 10, (128,), generator=generator)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()

    step()  # first-call set-up out of the timing
    began, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(p["steps"]):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": time.perf_counter() - began,
            "cpu_s": after.ru_utime - used.ru_utime + after.ru_stime - used.ru_stime}


def measure(processes: int, threads: int, policy: str, steps: int) -> dict:
    env = {"OMP_WAIT_POLICY": policy} if policy != "default" else {}
    with ThreadPoolExecutor(processes) as pool:
        runs = list(pool.map(lambda _: common.run_child(__file__, {"threads": threads, "steps": steps}, env=env),
                             range(processes)))
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        return {"processes": processes, "threads": threads, "policy": policy, "error": failed[0]}
    return {"processes": processes, "threads": threads, "policy": policy,
            "wall_s": max(r["wall_s"] for r in runs), "cpu_s": sum(r["cpu_s"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])  # the rows set the threads themselves
    parser.add_argument("--quick", action="store_true", help="10 steps per process: a check of this script")
    args = parser.parse_args(argv)
    steps = 10 if args.quick else 100
    meta = common.machine()
    print(f"# {NAME} on {meta['cpu']} ({meta['usable_cores']} cores), load {meta['load_average_at_start']}, "
          f"{steps} steps per process", flush=True)
    rows = []
    for processes, threads, policy in ROWS:
        rows.append(measure(processes, threads, policy, steps))
        print(rows[-1], flush=True)
    alone = rows[0]
    for row in rows:
        if "error" not in row and "error" not in alone:
            row["cpu_per_work"] = row["cpu_s"] / (alone["cpu_s"] * row["processes"])  # 1.0: no CPU lost
            row["wall_vs_one_thread_alone"] = row["wall_s"] / alone["wall_s"]
    by = {(r["processes"], r["threads"], r["policy"]): r for r in rows}
    summary = {key: by[spec].get("cpu_per_work") for key, spec in (
        ("two_2thread_processes_cpu_per_work", (2, 2, "default")),
        ("two_2thread_processes_passive_cpu_per_work", (2, 2, "PASSIVE")),
        ("two_1thread_processes_cpu_per_work", (2, 1, "default")))}
    common.report(NAME, args.quick, meta, rows,
                  [("processes", "processes"), ("threads", "threads each"), ("policy", "OMP_WAIT_POLICY"),
                   ("wall_s", "wall s (slowest)"), ("cpu_s", "CPU s (all)"),
                   ("wall_vs_one_thread_alone", "wall / 1 thread alone"), ("cpu_per_work", "CPU / work"),
                   ("error", "error")], summary)
    return 0


if __name__ == "__main__":
    common.entry(child, main)
