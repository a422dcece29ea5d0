"""Time, peak memory and FLOPs of one outer distillation iteration, unrolled vs constant-memory.

    python3 benchmarks/distill_iteration.py [--quick | --paper] [--paths unrolled,constant_memory] [--rows 0,2]

One iteration = `plan_steps` (minibatches and DSA draws) + the gradient path
(`pad_ray.matching.unrolled_gradients` or `two_pass_gradients`) on the CIFAR-10 ConvNet
(width 128, depth 3, instance norm, 3x32x32, 10 classes), random synthetic images and soft labels,
DSA on, depth mask at alpha 0.25, and a random start/target pair of flat parameter vectors.
`--paper` measures the paper's CIFAR-10 settings instead: IPC 10 (batch_syn 100) and IPC 50
(batch_syn 500), both at N 80 (sized for a GPU; add `--merge` to keep the other rows' results).
Each row runs in a fresh process: the peak is that configuration's own (max RSS on the CPU, max
reserved on CUDA, with max allocated beside it). In the same process the plain forward+backward of the same model on one batch
of the same size is timed, and FLOPs of both are counted with `torch.utils.flop_counter`, so the
iteration's achieved throughput is given as a fraction of the plain training step's.

FLOPs of an iteration are affine in N at a fixed batch (every step does the same convolutions and
matmuls; DSA's ops are not counted by the flop counter), so they are counted exactly on 1- and
2-step iterations and extrapolated; rows with a small N also count the whole iteration as a check.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "distill_iteration"

# Reference (authors' released implementation, 2 cores, torch 2.15 CPU, 2 threads): s/iter, peak GB.
REFERENCE = {(1, 10, 20): (1.95, 1.66), (10, 100, 10): (16.7, 4.21), (10, 100, 20): (28.4, 7.46),
             (10, 100, 40): (58.4, 13.7), (50, 100, 20): (27.5, 7.49)}
REFERENCE_FWD_BWD_S = 0.41  # plain forward+backward on 100 images (72 GFLOP/s)

FULL_ROWS = [  # (ipc, batch_syn, N, timed iterations)
    (1, 10, 20, 5), (10, 100, 10, 2), (10, 100, 20, 2), (50, 100, 20, 2), (10, 100, 40, 1), (10, 100, 80, 1)]
PAPER_ROWS = [(10, 100, 80, 2), (50, 500, 80, 2)]  # cifar10-ipc10 and -ipc50 presets
QUICK_ROWS = [(1, 10, 4, 2), (2, 20, 2, 2), (2, 20, 4, 2), (2, 20, 8, 1)]
FULL_MODEL = {"classes": 10, "channels": 3, "size": 32, "width": 128, "depth": 3}
QUICK_MODEL = {"classes": 10, "channels": 3, "size": 32, "width": 16, "depth": 3}
PATHS = ("unrolled", "constant_memory")


def child(p: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pad_ray.augment import DSA
    from pad_ray.matching import GRADIENT_PATHS, plan_steps, soft_cross_entropy
    from pad_ray.models import ConvNet, FlatParams

    dev = common.device()
    threads = common.set_threads(p["threads"]) if dev.type == "cpu" else None
    classes, channels, size = p["classes"], p["channels"], p["size"]
    torch.manual_seed(0)
    net = FlatParams(ConvNet(channels, classes, size, p["width"], p["depth"]).to(dev))
    n = p["ipc"] * classes
    batch = min(p["batch"], n)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, channels, size, size, generator=gen).to(dev)
    labels = torch.randn(n, classes, generator=gen).to(dev)
    syn_lr = torch.tensor(0.01, device=dev)
    start = net.flatten()
    target = start + 0.01 * torch.randn(start.shape, generator=gen).to(dev)
    dsa = DSA() if p["dsa"] else None
    gradients = GRADIENT_PATHS[p["path"]]

    def iteration(steps: int):
        plan = plan_steps(n, batch, steps, (size, size), dsa, gen)
        return gradients(net, images, labels, syn_lr, start, target, plan, dsa, p["alpha"], p["selection"])

    # The plain training step of the same model and batch: forward + backward into .grad.
    model, x, y = net.module, images[:batch], labels[:batch]

    def plain_step():
        model.zero_grad(set_to_none=True)
        soft_cross_entropy(model(x), y).backward()

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    # The iteration's FLOPs first: a gradient path may set process-wide state (the constant-memory path
    # keeps freed memory in the heap), and the plain step should be timed under the same conditions.
    one, two = count(lambda: iteration(1)), count(lambda: iteration(2))
    per_step, fixed = two - one, 2 * one - two
    flops = fixed + per_step * p["steps"]
    flops_check = count(lambda: iteration(p["steps"])) if p["count_full"] else None

    plain_flops = count(plain_step)
    common.timed(plain_step, dev, 1)
    plain_s = common.median(common.timed(plain_step, dev, p["plain_repeats"]))
    model.zero_grad(set_to_none=True)

    warmup_steps = p["steps"] if p["warmup"] == "full" else min(p["steps"], int(p["warmup"]))
    warm = common.timed(lambda: iteration(warmup_steps), dev, 1)[0]
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = common.timed(lambda: iteration(p["steps"]), dev, p["repeats"])
    after = resource.getrusage(resource.RUSAGE_SELF)
    seconds = common.median(times)
    plain_rate = plain_flops / plain_s
    rate = flops / seconds
    result = {
        **p, "device": str(dev), "threads": threads, "flat_params": net.size,
        "warmup_steps": warmup_steps, "warmup_s": warm, "times_s": times, "s_per_iter": seconds,
        "s_per_step": seconds / p["steps"], "peak_bytes": common.peak_memory_bytes(dev),
        "peak_gb": common.peak_memory_bytes(dev) / common.GB,
        "flops_per_iter": flops, "flops_per_step": per_step, "flops_fixed": fixed, "flops_check": flops_check,
        "plain_fwd_bwd_s": plain_s, "plain_fwd_bwd_flops": plain_flops, "plain_gflops_per_s": plain_rate / 1e9,
        "gflops_per_s": rate / 1e9, "fraction_of_plain": rate / plain_rate,
        "step_cost_in_plain_steps": (seconds / p["steps"]) / plain_s,
        # Per timed iteration: page faults and CPU seconds (less sensitive to other load than wall time).
        "minor_faults_per_iter": (after.ru_minflt - before.ru_minflt) / p["repeats"],
        "user_cpu_s_per_iter": (after.ru_utime - before.ru_utime) / p["repeats"],
        "sys_cpu_s_per_iter": (after.ru_stime - before.ru_stime) / p["repeats"],
    }
    if dev.type == "cuda":
        result["device_memory_total"] = torch.cuda.get_device_properties(dev).total_memory
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    return result


def _predicted_peak(rows: list[dict], path: str, ipc: int, batch: int, steps: int) -> float | None:
    """Linear fit of peak memory in N from the measured rows of the same path, IPC and batch."""
    known = sorted((r["steps"], r["peak_bytes"]) for r in rows
                   if r.get("path") == path and r.get("ipc") == ipc and r.get("batch") == batch
                   and "peak_bytes" in r)
    if len(known) < 2:
        return None
    (n0, m0), (n1, m1) = known[-2], known[-1]
    return m1 + (m1 - m0) / (n1 - n0) * (steps - n1)


def main(argv: list[str] | None = None) -> int:
    parser = common.parse_args(__doc__.splitlines()[0])
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--rows", default=None, help="indices into the row list (default: all)")
    parser.add_argument("--paper", action="store_true", help="the paper's IPC 10 / 50 rows at N 80 (for a GPU)")
    parser.add_argument("--merge", action="store_true",
                        help="keep rows of earlier results that this invocation does not measure")
    args = parser.parse_args(argv)
    rows_spec = QUICK_ROWS if args.quick else PAPER_ROWS if args.paper else FULL_ROWS
    if args.rows:
        rows_spec = [rows_spec[int(i)] for i in args.rows.split(",")]
    model = QUICK_MODEL if args.quick else FULL_MODEL
    meta = common.machine()
    print(f"# {NAME} on {meta['cpu']} ({meta['usable_cores']} cores), torch {meta['torch']}, "
          f"cuda: {meta['cuda']}, load {meta['load_average_at_start']}", flush=True)

    results: list[dict] = []
    for path in args.paths.split(","):
        for ipc, batch, steps, repeats in rows_spec:
            payload = {**model, "allocator": args.allocator, "path": path, "ipc": ipc, "batch": batch,
                       "steps": steps, "repeats": repeats,
                       "warmup": "full" if steps <= 10 or ipc == 1 else 2, "alpha": 0.25, "selection": "depth",
                       "dsa": True, "threads": args.threads, "plain_repeats": 5,
                       "count_full": steps <= 20 and ipc == 1 or args.quick}
            predicted = _predicted_peak(results, path, ipc, batch, steps)
            limit = common.memory_available_bytes() * 0.85
            gpu_total = next((r.get("device_memory_total") for r in results if r.get("device_memory_total")), None)
            if gpu_total:
                limit = 0.9 * gpu_total
            if predicted is not None and predicted > limit:
                row = {**payload, "skipped": f"predicted peak {predicted / common.GB:.1f} GB exceeds "
                                             f"{limit / common.GB:.1f} GB available",
                       "predicted_peak_gb": predicted / common.GB}
                print(f"{path} ipc {ipc} N {steps}: skipped ({row['skipped']})", flush=True)
                results.append(row)
                continue
            row = common.run_child(__file__, payload, timeout_s=1800, env=common.allocator_env(args.allocator))
            ref = REFERENCE.get((ipc, batch, steps)) if not args.quick else None
            if ref and "s_per_iter" in row:
                row["ref_s_per_iter"], row["ref_peak_gb"] = ref
                row["time_vs_ref"] = row["s_per_iter"] / ref[0]
                row["memory_vs_ref"] = row["peak_gb"] / ref[1]
            results.append(row)
            if "error" in row:
                print(f"{path} ipc {ipc} N {steps}: ERROR {row['error']}", flush=True)
            else:
                print(f"{path} ipc {ipc} batch {batch} N {steps}: {row['s_per_iter']:.3f} s/iter, "
                      f"peak {row['peak_gb']:.2f} GB, {row['fraction_of_plain']:.0%} of plain fwd+bwd "
                      f"({row['gflops_per_s']:.1f} vs {row['plain_gflops_per_s']:.1f} GFLOP/s)", flush=True)

    if args.merge:
        earlier = common.read_results(NAME if args.allocator == "default" else f"{NAME}-{args.allocator}",
                                      args.quick)
        if earlier:
            measured = {(r.get("path"), r.get("ipc"), r.get("batch"), r.get("steps")) for r in results}
            results = [r for r in earlier["rows"]
                       if (r.get("path"), r.get("ipc"), r.get("batch"), r.get("steps")) not in measured] + results
            meta["merged_with_run_of"] = earlier["machine"].get("date_utc")

    summary = summarize(results, args.quick)
    columns = [("path", "path"), ("ipc", "IPC"), ("batch", "batch"), ("steps", "N"), ("s_per_iter", "s/iter"),
               ("ref_s_per_iter", "ref s/iter"), ("time_vs_ref", "x ref"), ("peak_gb", "peak GB"),
               ("ref_peak_gb", "ref GB"), ("memory_vs_ref", "mem x ref"), ("gflops_per_s", "GFLOP/s"),
               ("fraction_of_plain", "of plain"), ("sys_cpu_s_per_iter", "sys CPU s"), ("skipped", "note")]
    print()
    print(common.table(sorted(results, key=_order), columns))
    print()
    for key, value in summary.items():
        print(f"{key}: {common.fmt(value) if not isinstance(value, dict) else value}")
    name = NAME if args.allocator == "default" else f"{NAME}-{args.allocator}"
    out = common.write_results(name, args.quick, meta, sorted(results, key=_order), summary)
    print(f"\nwrote {out}")
    return 0


def _order(row: dict) -> tuple:
    return (PATHS.index(row.get("path", "unrolled")), row.get("ipc", 0), row.get("steps", 0))


def summarize(rows: list[dict], quick: bool) -> dict:
    def find(path, ipc, batch, steps):
        return next((r for r in rows if (r.get("path"), r.get("ipc"), r.get("batch"), r.get("steps"))
                     == (path, ipc, batch, steps) and "s_per_iter" in r), None)

    out: dict = {}
    unrolled = [r for r in rows if r.get("path") == "unrolled" and "s_per_iter" in r]
    with_ref = [r for r in unrolled if "time_vs_ref" in r]
    if with_ref:
        out["unrolled_worst_time_vs_ref"] = max(r["time_vs_ref"] for r in with_ref)
        out["unrolled_worst_memory_vs_ref"] = max(r["memory_vs_ref"] for r in with_ref)
    if unrolled:
        out["unrolled_min_fraction_of_plain"] = min(r["fraction_of_plain"] for r in unrolled)
    ipc, batch = (2, 20) if quick else (10, 100)
    lo, hi = (2, 8) if quick else (10, 80)
    small, large = find("constant_memory", ipc, batch, lo), find("constant_memory", ipc, batch, hi)
    if small and large:
        out[f"constant_memory_peak_growth_N{lo}_to_N{hi}"] = large["peak_gb"] / small["peak_gb"]
        out[f"constant_memory_peak_gb_N{hi}"] = large["peak_gb"]
    ratios = {}
    for r in rows:
        if r.get("path") == "constant_memory" and "s_per_iter" in r:
            u = find("unrolled", r["ipc"], r["batch"], r["steps"])
            if u:
                ratios[f"ipc{r['ipc']}_N{r['steps']}"] = round(r["s_per_iter"] / u["s_per_iter"], 3)
    if ratios:
        out["constant_memory_time_vs_unrolled"] = ratios
        out["constant_memory_worst_time_vs_unrolled"] = max(ratios.values())
    return out


if __name__ == "__main__":
    common.entry(child, main)
