"""Time, peak memory and FLOPs of one outer distillation iteration: unrolled, constant-memory, auto,
and the authors' released code on the same rows in the same invocation.

    python3 benchmarks/distill_iteration.py [--quick | --paper | --narrow]
        [--paths unrolled,constant_memory,auto,auto:target] [--rows 0,2] [--rounds R] [--pad-root DIR]
        [--no-reference]

One iteration = `plan_steps` (minibatches and DSA draws) + the gradient path
(`pad_ray.matching.gradient_path`: unrolled, two-pass or auto) on the CIFAR-10 ConvNet
(width 128, depth 3, instance norm, 3x32x32, 10 classes), random synthetic images and soft labels,
DSA on, depth mask at alpha 0.25, and a random start/target pair of flat parameter vectors.
`--paper` measures the paper's CIFAR-10 settings instead: IPC 10 (batch_syn 100) and IPC 50
(batch_syn 500), both at N 80 (sized for a GPU; add `--merge` to keep the other rows' results).
`--narrow` runs IPC 1 and 10 at N 20 on a width-16 ConvNet, where per-op overhead, not arithmetic,
sets an iteration's time, as it does on a GPU: what each path's bookkeeping costs. The paths
(`--paths`, without budgets) alternate in one process, and each is given as a multiple of the first
(`distill_iteration-narrow.json`; the authors' harness has the width-128 net only, so no reference).
Each row runs in a fresh process: the peak is that configuration's own (max RSS on the CPU, max
reserved on CUDA, with max allocated beside it). Each path runs whole iterations before the timed ones
(two for auto, whose first call only measures a step). In the same process the plain forward+backward
of the same model on one batch of the same size is timed, and FLOPs of both are counted with
`torch.utils.flop_counter`, so the iteration's achieved throughput is given as a fraction of the plain
training step's.

FLOPs of an iteration are affine in N at a fixed batch (every step does the same convolutions and
matmuls; DSA's ops are not counted by the flop counter), so they are counted exactly on 1- and
2-step iterations and extrapolated; rows with a small N also count the whole iteration as a check.
An auto iteration's FLOPs are those of its kept steps at the unrolled per-step count plus its
recomputed steps at the two-pass count, both counted the same way in its process.

Paths: `auto` runs with its default budget (free memory, less a margin); `auto:GB` with
`memory_budget_gb` GB; `auto:target` with what a row's peak target (TARGET_PEAK_GB) leaves beyond the
constant-memory path's peak on the same row in this invocation. Every child sets glibc to keep freed
memory in the heap, as `Distiller` does on the CPU, so each path is measured as a run uses it.

The reference: for every row the harness in ../shared/tools/reference-pad-step/ has a configuration for,
it runs in its own child process in this invocation (the authors' code from --pad-root, default
$PAD_ROOT, else the harness's own default), as does its plain forward+backward; a row it has none for
(N 80, which does not fit its memory) is compared with its time extrapolated linearly in N from the two
largest N it has at the same IPC and batch, run in this invocation for that. Rows are compared only
with reference figures from the same invocation. Where the authors' code cannot run, the
reason is recorded and no ratio is given. `--rounds R` measures each row R times, the reference first in
each round and every path against the reference of its own round; a path's reported row is its round with
the median ratio, and every round's times and ratios are kept beside it (`rounds`, `time_vs_ref_range`), with
the ratio of the median times (`median_time_vs_median_ref`). On a VM whose speed drifts between processes, one
round's ratio says little, and where the two summaries disagree the drift is larger than the difference measured.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "distill_iteration"

HARNESS = common.REPO.parent / "shared" / "tools" / "reference-pad-step" / "reference_pad_step.py"
REFERENCE_PLAIN = "reference_fwd_bwd_bs100"
# Peak targets of the issue (GB) for the rows that have one; `auto:target` budgets from them.
TARGET_PEAK_GB = {(10, 100, 20): 4.0, (10, 100, 80): 3.0}

FULL_ROWS = [  # (ipc, batch_syn, N, timed iterations)
    (1, 10, 20, 5), (10, 100, 10, 2), (10, 100, 20, 2), (50, 100, 20, 2), (10, 100, 40, 1), (10, 100, 80, 1)]
PAPER_ROWS = [(10, 100, 80, 2), (50, 500, 80, 2)]  # cifar10-ipc10 and -ipc50 presets
QUICK_ROWS = [(1, 10, 4, 2), (2, 20, 2, 2), (2, 20, 4, 2), (2, 20, 8, 1)]
FULL_MODEL = {"classes": 10, "channels": 3, "size": 32, "width": 128, "depth": 3}
QUICK_MODEL = {"classes": 10, "channels": 3, "size": 32, "width": 16, "depth": 3}
NARROW_ROWS = [(1, 10, 20, 30), (10, 100, 20, 10)]
PATHS = ("unrolled", "constant_memory", "auto")


def _problem(p: dict):
    """The row's model, synthetic set and start/target pair, and an iteration of a gradient path on them."""
    import torch

    from pad_ray.augment import DSA
    from pad_ray.matching import plan_steps
    from pad_ray.models import ConvNet, FlatParams
    from pad_ray.runtime import keep_freed_memory_in_heap

    dev = common.device()
    threads = common.set_threads(p["threads"]) if dev.type == "cpu" else None
    if dev.type == "cpu":
        keep_freed_memory_in_heap()
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

    def new_plan(steps: int):
        return plan_steps(n, batch, steps, (size, size), dsa, gen)

    def iteration(steps: int, gradients, plan=None):
        return gradients(net, images, labels, syn_lr, start, target, plan or new_plan(steps), dsa, p["alpha"],
                         p["selection"])

    return dev, threads, net, images[:batch], labels[:batch], iteration, new_plan


def child(p: dict) -> dict:
    if p.get("interleave"):
        return interleaved(p)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pad_ray.matching import gradient_path, soft_cross_entropy

    dev, threads, net, x, y, run, _ = _problem(p)
    # One function for every call, so that auto's budget keeps what it measured across iterations.
    measured = gradient_path(p["path"], p.get("budget_gb"))
    kept: list[int] = []  # per call of `measured`: inner steps whose graphs it held

    def iteration(steps: int, gradients=measured):
        matched = run(steps, gradients)
        if gradients is measured:
            kept.append(matched.kept)

    # The plain training step of the same model and batch: forward + backward into .grad.
    model = net.module

    def plain_step():
        model.zero_grad(set_to_none=True)
        soft_cross_entropy(model(x), y).backward()

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    def affine(path: str) -> tuple[int, int]:
        """(fixed, per step) FLOPs of a path, from its 1- and 2-step iterations."""
        one, two = (count(lambda: iteration(k, gradient_path(path))) for k in (1, 2))
        return 2 * one - two, two - one

    ends = {path: affine(path) for path in (("unrolled", "constant_memory") if p["path"] == "auto"
                                            else (p["path"],))}

    def flops_of(kept_steps: int) -> float:
        if p["path"] != "auto" or kept_steps == p["steps"]:
            fixed, per_step = ends["unrolled" if p["path"] == "auto" else p["path"]]
            return fixed + per_step * p["steps"]
        # A kept step costs a full unrolled step: with a recomputed head, a gradient flows into the first.
        fixed, two_pass_step = ends["constant_memory"]
        return fixed + two_pass_step * (p["steps"] - kept_steps) + ends["unrolled"][1] * kept_steps

    flops_check = count(lambda: iteration(p["steps"])) if p["count_full"] else None

    plain_flops = count(plain_step)
    common.timed(plain_step, dev, 1)
    plain_s = common.median(common.timed(plain_step, dev, p["plain_repeats"]))
    model.zero_grad(set_to_none=True)

    # Whole iterations first, at every N, until the heap has its steady size, as in every iteration of a run
    # after its first ones: one, and for auto two, since its first call keeps one step only, to measure it.
    # A shorter warm-up left the timed N 80 iteration faulting in 12.6 GB of new heap (29 s of system CPU).
    warm = common.timed(lambda: iteration(p["steps"]), dev, 2 if p["path"] == "auto" else 1)
    before = resource.getrusage(resource.RUSAGE_SELF)
    kept.clear()
    times = common.timed(lambda: iteration(p["steps"]), dev, p["repeats"])
    after = resource.getrusage(resource.RUSAGE_SELF)
    seconds = common.median(times)
    flops = common.median([flops_of(k) for k in kept])
    plain_rate = plain_flops / plain_s
    rate = flops / seconds
    result = {
        **p, "device": str(dev), "threads": threads, "flat_params": net.size, "kept_steps": kept,
        "warmup_s": warm, "times_s": times, "s_per_iter": seconds,
        "s_per_step": seconds / p["steps"], "peak_bytes": common.peak_memory_bytes(dev),
        "peak_gb": common.peak_memory_bytes(dev) / common.GB,
        "flops_per_iter": flops, "flops_per_step": flops / p["steps"], "flops_check": flops_check,
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


def interleaved(p: dict) -> dict:
    """`--narrow`'s child: the paths' iterations alternate on the same plans in one process, so that what
    differs from one process to the next (a quarter of an iteration's time here) drops out of their
    ratio. Only time is measured: the peak would be the largest path's."""
    from pad_ray.matching import gradient_path

    dev, threads, _, _, _, run, new_plan = _problem(p)
    paths = {name: gradient_path(name) for name in p["interleave"]}
    for gradients in paths.values():
        common.timed(lambda: run(p["steps"], gradients), dev, 2)  # auto's first call only measures a step
    times: dict[str, list[float]] = {name: [] for name in paths}
    kept: dict[str, list[int]] = {name: [] for name in paths}
    names = list(paths)
    for round_ in range(p["repeats"]):
        plan = new_plan(p["steps"])
        # Each round starts with the next path, so that no path always runs right after the same one.
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            gradients = paths[name]
            times[name] += common.timed(lambda: kept[name].append(run(p["steps"], gradients, plan).kept), dev, 1)
    first = names[0]
    return {**p, "device": str(dev), "threads": threads, "times_s": times, "kept_steps": kept,
            "s_per_iter": {name: common.median(t) for name, t in times.items()},
            # Per round, then the median: each round's paths ran on the same plan a moment apart.
            f"vs_{first}": {name: common.median([a / b for a, b in zip(t, times[first])])
                            for name, t in times.items()}}


def narrow(args) -> int:
    names = [label for label, _, budget in _paths(args.paths) if budget is None]
    rows_spec = [NARROW_ROWS[int(i)] for i in args.rows.split(",")] if args.rows else NARROW_ROWS
    meta = common.machine()
    print(f"# {NAME} --narrow on {meta['cpu']} ({meta['usable_cores']} cores), torch {meta['torch']}, "
          f"cuda: {meta['cuda']}, load {meta['load_average_at_start']}", flush=True)
    rows: list[dict] = []
    for ipc, batch, steps, repeats in rows_spec:
        payload = {**QUICK_MODEL, "interleave": names, "ipc": ipc, "batch": batch, "steps": steps,
                   "repeats": repeats, "alpha": 0.25, "selection": "depth", "dsa": True, "threads": args.threads}
        result = common.run_child(__file__, payload, timeout_s=1800)
        if "error" in result:
            print(f"ipc {ipc} N {steps}: ERROR {result['error']}", flush=True)
            rows.append(result)
            continue
        for name in names:
            rows.append({"label": name, "ipc": ipc, "batch": batch, "steps": steps, "repeats": repeats,
                         "kept": common.median(result["kept_steps"][name]),
                         "s_per_iter": result["s_per_iter"][name], f"vs_{names[0]}": result[f"vs_{names[0]}"][name],
                         "times_s": result["times_s"][name]})
    columns = [("label", "path"), ("ipc", "IPC"), ("batch", "batch"), ("steps", "N"), ("kept", "kept"),
               ("repeats", "rounds"), ("s_per_iter", "s/iter"), (f"vs_{names[0]}", f"x {names[0]}")]
    summary = {f"{r['label']} ipc{r['ipc']} N{r['steps']}": round(r[f"vs_{names[0]}"], 3)
               for r in rows if f"vs_{names[0]}" in r}
    common.report(f"{NAME}-narrow", False, {**meta, "model": QUICK_MODEL}, rows, columns,
                  {f"time_vs_{names[0]}": summary})
    return 0


def _predicted_peak(rows: list[dict], label: str, ipc: int, batch: int, steps: int) -> float | None:
    """Linear fit of peak memory in N from the measured rows of the same path, IPC and batch (the largest
    peak of each N, which several rounds measure more than once)."""
    peaks: dict[int, int] = {}
    for r in rows:
        if r.get("label") == label and r.get("ipc") == ipc and r.get("batch") == batch and "peak_bytes" in r:
            peaks[r["steps"]] = max(peaks.get(r["steps"], 0), r["peak_bytes"])
    if len(peaks) < 2:
        return None
    (n0, m0), (n1, m1) = sorted(peaks.items())[-2:]
    return m1 + (m1 - m0) / (n1 - n0) * (steps - n1)


# -- the reference: the authors' code through the shared harness, one child process per configuration --

def _reference_name(ipc: int, batch: int, steps: int) -> str:
    return f"ipc{ipc}_bs{batch}_n{steps}"


def _pad_root(args) -> Path:
    """Where the harness reads the authors' code: --pad-root, else $PAD_ROOT, else its own default."""
    return Path(args.pad_root or os.environ.get("PAD_ROOT") or HARNESS.parent / ".work" / "pad-official")


def reference_unavailable(args) -> str | None:
    """Why the harness cannot run the authors' code here, or None when it can."""
    if not HARNESS.is_file():
        return f"no harness at {HARNESS}"
    root = _pad_root(args)
    if not (root / "reparam_module.py").is_file():
        return (f"the authors' code (NUS-HPC-AI-Lab/PAD, commit 2a4bc91, as a plain export) is not at {root}: "
                "pass --pad-root or set PAD_ROOT (see the harness's README)")
    return None


def run_reference(name: str, args, repeats: int) -> dict:
    """One configuration of the harness in a fresh process: its RESULT line, or an error record."""
    cmd = [sys.executable, str(HARNESS), "--child", name, "--pad-root", str(_pad_root(args)),
           "--threads", str(args.threads or len(os.sched_getaffinity(0))),
           "--warmup", "1", "--iters", str(repeats), "--selection", "depth"]
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": "timed out after 3600 s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "child_wall_s": time.perf_counter() - began}
    tail = [line for line in (proc.stdout + "\n" + proc.stderr).splitlines() if line.strip()][-6:]
    return {"name": name, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def reference_time(refs: dict, ipc: int, batch: int, steps: int) -> tuple[float, float | None, bool] | None:
    """(seconds, peak GB or None, extrapolated) of the reference at a row, measured in this invocation;
    a row it has no configuration for is extrapolated linearly in N from two measured ones of the same
    IPC and batch (the reference's per-step cost), with no peak."""
    measured = refs.get((ipc, batch, steps))
    if measured and "median_s" in measured:
        return measured["median_s"], measured["peak_rss_mb"] * 2**20 / common.GB, False
    known = sorted((n, r["median_s"]) for (i, b, n), r in refs.items() if (i, b) == (ipc, batch) and "median_s" in r)
    if len(known) < 2:
        return None
    (n0, t0), (n1, t1) = known[-2], known[-1]
    return t1 + (t1 - t0) / (n1 - n0) * (steps - n1), None, True


def _paths(spec: str) -> list[tuple[str, str, str | None]]:
    """`--paths` entries as (label, gradient, budget): auto:GB or auto:target give auto a budget."""
    out = []
    for label in spec.split(","):
        gradient, _, budget = label.partition(":")
        if gradient not in PATHS or (budget and gradient != "auto"):
            raise SystemExit(f"--paths: {label!r} is not one of {', '.join(PATHS)}, auto:GB, auto:target")
        out.append((label, gradient, budget or None))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = common.parse_args(__doc__.splitlines()[0])
    parser.add_argument("--paths", default="unrolled,constant_memory,auto,auto:target")
    parser.add_argument("--rows", default=None, help="indices into the row list (default: all)")
    parser.add_argument("--paper", action="store_true", help="the paper's IPC 10 / 50 rows at N 80 (for a GPU)")
    parser.add_argument("--narrow", action="store_true", help="IPC 1 / 10 at N 20 on a width-16 net: per-op overhead")
    parser.add_argument("--pad-root", default=None, help="export of the authors' code for the reference harness")
    parser.add_argument("--no-reference", action="store_true", help="do not run the authors' code")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each row this many times, each path against the reference run just before it; "
                             "report the round with the median ratio")
    parser.add_argument("--merge", action="store_true",
                        help="keep rows of earlier results that this invocation does not measure")
    args = parser.parse_args(argv)
    if args.narrow:
        return narrow(args)
    rows_spec = QUICK_ROWS if args.quick else PAPER_ROWS if args.paper else FULL_ROWS
    if args.rows:
        rows_spec = [rows_spec[int(i)] for i in args.rows.split(",")]
    paths = _paths(args.paths)
    model = QUICK_MODEL if args.quick else FULL_MODEL
    name = NAME if args.allocator == "default" else f"{NAME}-{args.allocator}"
    meta = common.machine()
    # The harness has the full CIFAR-10 ConvNet only: --quick's narrow model has no reference.
    meta["reference_unavailable"] = ("not run (--no-reference)" if args.no_reference else
                                     "no reference for --quick's model" if args.quick else
                                     reference_unavailable(args))
    print(f"# {NAME} on {meta['cpu']} ({meta['usable_cores']} cores), torch {meta['torch']}, "
          f"cuda: {meta['cuda']}, load {meta['load_average_at_start']}", flush=True)
    if meta["reference_unavailable"]:
        print(f"# reference: {meta['reference_unavailable']}; no ratios to it", flush=True)

    results: list[dict] = []
    refs: dict[tuple, dict] = {}
    if not meta["reference_unavailable"]:
        meta["reference_plain"] = run_reference(REFERENCE_PLAIN, args, 0)
    for ipc, batch, steps, repeats in rows_spec:
        by_label: dict[str, list[dict]] = {}
        for round_ in range(args.rounds):
            for ref_steps in ([] if meta["reference_unavailable"] else _reference_steps(ipc, batch, steps)):
                key = (round_, ipc, batch, ref_steps)
                if key not in refs:
                    refs[key] = run_reference(_reference_name(ipc, batch, ref_steps), args, repeats)
                    print(f"reference ipc {ipc} N {ref_steps}{_round_note(round_, args.rounds)}: " +
                          (refs[key].get("error") or f"{refs[key]['median_s']:.3f} s/iter"), flush=True)
            round_refs = {k[1:]: v for k, v in refs.items() if k[0] == round_}
            for label, gradient, budget in paths:
                earlier = results + [r for rows in by_label.values() for r in rows]
                row = measure(args, model, label, gradient, budget, (ipc, batch, steps, repeats), earlier, round_refs)
                row["round"] = round_
                by_label.setdefault(label, []).append(row)
        results += [_median_round(rows) for rows in by_label.values()]
    meta["reference_rows"] = [{"round": key[0], "row": list(key[1:]), **value} for key, value in refs.items()]

    if args.merge:
        earlier = common.read_results(name, args.quick)
        if earlier:
            measured = {(r.get("label"), r.get("ipc"), r.get("batch"), r.get("steps")) for r in results}
            results = [r for r in earlier["rows"]
                       if (r.get("label"), r.get("ipc"), r.get("batch"), r.get("steps")) not in measured] + results
            meta["merged_with_run_of"] = earlier["machine"].get("date_utc")

    summary = summarize(results)
    columns = [("label", "path"), ("ipc", "IPC"), ("batch", "batch"), ("steps", "N"), ("kept_steps", "kept"),
               ("s_per_iter", "s/iter"), ("ref_s_per_iter", "ref s/iter"), ("time_vs_ref", "x ref"),
               ("peak_gb", "peak GB"), ("ref_peak_gb", "ref GB"), ("gflops_per_s", "GFLOP/s"),
               ("fraction_of_plain", "of plain"), ("sys_cpu_s_per_iter", "sys CPU s"), ("skipped", "note")]
    print()
    print(common.table(sorted(results, key=_order), columns))
    print()
    for key, value in summary.items():
        print(f"{key}: {common.fmt(value) if not isinstance(value, dict) else value}")
    out = common.write_results(name, args.quick, meta, sorted(results, key=_order), summary)
    print(f"\nwrote {out}")
    return 0


def _round_note(round_: int, rounds: int) -> str:
    return f" (round {round_ + 1} of {rounds})" if rounds > 1 else ""


def measure(args, model: dict, label: str, gradient: str, budget: str | None, row_spec: tuple,
            earlier: list[dict], refs: dict) -> dict:
    """One path on one row in a fresh child process, with its ratios to the reference of the same round
    (`earlier`: the rows measured before it, for a budget from the constant-memory peak and a predicted peak)."""
    ipc, batch, steps, repeats = row_spec
    payload = {**model, "allocator": args.allocator, "label": label, "path": gradient, "ipc": ipc,
               "batch": batch, "steps": steps, "repeats": repeats,
               "alpha": 0.25, "selection": "depth",
               "dsa": True, "threads": args.threads, "plain_repeats": 5,
               "count_full": steps <= 20 and ipc == 1 or args.quick}
    skipped = None
    if budget == "target":
        constant = next((r for r in earlier if r.get("label") == "constant_memory" and "peak_gb" in r
                         and (r["ipc"], r["batch"], r["steps"]) == (ipc, batch, steps)), None)
        if (ipc, batch, steps) not in TARGET_PEAK_GB or constant is None:
            skipped = "no peak target, or no constant-memory peak on this row in this invocation"
        else:
            payload["budget_gb"] = TARGET_PEAK_GB[(ipc, batch, steps)] - constant["peak_gb"]
    elif budget is not None:
        payload["budget_gb"] = float(budget)
    predicted = _predicted_peak(earlier, label, ipc, batch, steps)
    limit = common.memory_available_bytes() * 0.85
    gpu_total = next((r.get("device_memory_total") for r in earlier if r.get("device_memory_total")), None)
    if gpu_total:
        limit = 0.9 * gpu_total
    if predicted is not None and predicted > limit:
        skipped = f"predicted peak {predicted / common.GB:.1f} GB exceeds {limit / common.GB:.1f} GB available"
    if skipped:
        print(f"{label} ipc {ipc} N {steps}: skipped ({skipped})", flush=True)
        return {**payload, "skipped": skipped}
    row = common.run_child(__file__, payload, timeout_s=1800, env=common.allocator_env(args.allocator))
    ref = reference_time(refs, ipc, batch, steps)
    if ref and "s_per_iter" in row:
        row["ref_s_per_iter"], row["ref_peak_gb"], row["ref_extrapolated"] = ref
        row["time_vs_ref"] = row["s_per_iter"] / ref[0]
        if ref[1]:
            row["memory_vs_ref"] = row["peak_gb"] / ref[1]
    if "error" in row:
        print(f"{label} ipc {ipc} N {steps}: ERROR {row['error']}", flush=True)
    else:
        print(f"{label} ipc {ipc} batch {batch} N {steps}: {row['s_per_iter']:.3f} s/iter"
              + (f" ({row['time_vs_ref']:.3f}x the reference)" if "time_vs_ref" in row else "")
              + f", kept {row['kept_steps']}, peak {row['peak_gb']:.2f} GB, "
              f"{row['fraction_of_plain']:.0%} of plain fwd+bwd "
              f"({row['gflops_per_s']:.1f} vs {row['plain_gflops_per_s']:.1f} GFLOP/s), "
              f"load {common.load_average()}", flush=True)
    return row


def _median_round(rows: list[dict]) -> dict:
    """A path's row over its rounds: the round with the median ratio to the reference (the upper one of an
    even count; by s/iter where there is no reference), with every round's figures beside it. Each round
    divides by the reference run just before it, so a machine that drifts between rounds moves both."""
    timed = [r for r in rows if "s_per_iter" in r]
    if len(rows) == 1 or not timed:
        return rows[0]
    ranked = sorted(timed, key=lambda r: r.get("time_vs_ref", r["s_per_iter"]))
    chosen = dict(ranked[len(ranked) // 2])
    chosen["rounds"] = [{k: r.get(k) for k in ("round", "s_per_iter", "ref_s_per_iter", "time_vs_ref", "peak_gb")}
                        for r in timed]
    if all("time_vs_ref" in r for r in timed):
        chosen["time_vs_ref_range"] = [ranked[0]["time_vs_ref"], ranked[-1]["time_vs_ref"]]
        # The other summary of the same rounds: where the two disagree, the machine drifted by more than the
        # margin a target leaves.
        chosen["median_time_vs_median_ref"] = (common.median([r["s_per_iter"] for r in timed])
                                               / common.median([r["ref_s_per_iter"] for r in timed]))
    return chosen


def _reference_steps(ipc: int, batch: int, steps: int) -> list[int]:
    """The N of the harness configurations a row is compared with: its own, or, where the harness has none
    (N 80 does not fit its memory), the two largest N of the same IPC and batch to extrapolate from."""
    configs = _harness_configs()
    if _reference_name(ipc, batch, steps) in configs:
        return [steps]
    prefix = _reference_name(ipc, batch, 0)[:-1]
    return sorted(int(name[len(prefix):]) for name in configs if name.startswith(prefix))[-2:]


def _harness_configs() -> set[str]:
    """The configuration names the harness defines (its CONFIGS table; importing it runs nothing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_pad_step", HARNESS)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    return set(harness.CONFIGS)


def _order(row: dict) -> tuple:
    return (row.get("ipc", 0), row.get("steps", 0), row.get("label", ""))


def summarize(rows: list[dict]) -> dict:
    """Same-invocation comparisons: each path against the reference and the plain step, and auto
    against the better of its two ends."""
    measured = [r for r in rows if "s_per_iter" in r]
    out: dict = {}
    with_ref = {f"{r['label']} ipc{r['ipc']} N{r['steps']}": round(r["time_vs_ref"], 3)
                for r in measured if "time_vs_ref" in r}
    if with_ref:
        out["time_vs_reference"] = with_ref
    out["min_fraction_of_plain"] = {label: round(min(r["fraction_of_plain"] for r in measured
                                                     if r["label"] == label), 3)
                                    for label in dict.fromkeys(r["label"] for r in measured)}
    auto_vs_best, ends_missing = {}, {}
    for r in measured:
        if r["label"] != "auto":
            continue
        ends = {e["label"]: e["s_per_iter"] for e in measured if e["label"] in ("unrolled", "constant_memory")
                and (e["ipc"], e["batch"], e["steps"]) == (r["ipc"], r["batch"], r["steps"])}
        row = f"ipc{r['ipc']} N{r['steps']}"
        if ends:
            auto_vs_best[row] = round(r["s_per_iter"] / min(ends.values()), 3)
        if len(ends) < 2:  # an end that did not fit (unrolled at N 80) or was not asked for: against the other
            ends_missing[row] = sorted({"unrolled", "constant_memory"} - set(ends))
    if auto_vs_best:
        out["auto_time_vs_better_end"] = auto_vs_best
    if ends_missing:
        out["auto_ends_not_measured"] = ends_missing
    return out


if __name__ == "__main__":
    common.entry(child, main)
