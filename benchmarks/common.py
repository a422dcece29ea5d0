"""Shared plumbing for the benchmarks: fresh child processes, peak memory, machine facts, tables, JSON.

Every benchmark script is both the parent (it lists the configurations, starts one child process per
configuration, prints a table and writes `benchmarks/results/<name>[-cuda][-quick].json`) and the child
(`--child '<json>'`: measure one configuration, print one `RESULT {...}` line). A fresh process per
row makes the peak resident set size (or CUDA's max reserved memory) a per-configuration figure.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
QUIET_FLAG = Path("/tmp/quiet")
GB = 1e9

if str(REPO) not in sys.path:  # run as `python3 benchmarks/x.py` without installing
    sys.path.insert(0, str(REPO))


# -- child side -------------------------------------------------------------------------------

def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None) -> int:
    """Torch intra-op threads for this process (default: every core this process may use)."""
    import torch

    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def sync(dev) -> None:
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def peak_memory_bytes(dev) -> int:
    """Peak of this process: on a GPU what CUDA's caching allocator reserved (as pad_ray reports it,
    see runtime.peak_memory_mb), else the max resident set size (Linux: KiB)."""
    if dev.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_reserved(dev))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], Any], dev, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn, synchronising the device around each."""
    times = []
    for _ in range(repeats):
        sync(dev)
        began = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - began)
    return times


def emit(result: dict[str, Any]) -> None:
    """The child's answer: one line that the parent looks for."""
    print("RESULT " + json.dumps(result), flush=True)


def child_payload(argv: Sequence[str]) -> dict[str, Any] | None:
    if len(argv) >= 3 and argv[1] == "--child":
        return json.loads(argv[2])
    return None


# -- parent side ------------------------------------------------------------------------------

def run_child(script: Path | str, payload: dict[str, Any], timeout_s: float = 900,
              env: dict[str, str] | None = None, attempts: int = 1, show_stderr: bool = False) -> dict[str, Any]:
    """Run `script --child payload` in a fresh interpreter; its RESULT line, or an error record.
    With attempts > 1 a failed child is started again (transient failures of a local Ray start).
    show_stderr: the child's stderr (its progress bars) goes to this terminal instead of the error record."""
    for attempt in range(attempts):
        result = _run_child_once(script, payload, timeout_s, env, show_stderr)
        if "error" not in result:
            return {**result, "attempts": attempt + 1}
        print(f"  child failed (attempt {attempt + 1}/{attempts}): {result['error'][-300:]}", flush=True)
    return result


def _run_child_once(script: Path | str, payload: dict[str, Any], timeout_s: float,
                    env: dict[str, str] | None, show_stderr: bool) -> dict[str, Any]:
    began = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), "--child", json.dumps(payload)],
                              stdout=subprocess.PIPE, stderr=None if show_stderr else subprocess.PIPE,
                              text=True, timeout=timeout_s, cwd=REPO, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {**payload, "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result.setdefault("child_wall_s", time.perf_counter() - began)
            return result
    tail = [line for line in (proc.stdout + "\n" + (proc.stderr or "")).splitlines() if line.strip()][-12:]
    return {**payload, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """What the figures came from."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = mem_available = None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        mem_total = int(info["MemTotal"].split()[0]) * 1024
        mem_available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    facts = {
        "hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)), "memory_gb": round((mem_total or 0) / GB, 1),
        "memory_available_gb": round((mem_available or 0) / GB, 1), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads_default": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": load_average(), "quiet_flag": QUIET_FLAG.exists(),
        "environment": {k: os.environ[k] for k in ALLOCATOR_ENV_KEYS if k in os.environ},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import ray

        facts["ray"] = ray.__version__
    except ImportError:
        pass
    return facts


# Allocator settings a child can run under (environment variables read at process start).
# glibc hands every block above 32 MiB to mmap and unmaps it on free, so each large activation
# tensor costs fresh page faults and kernel zeroing; "glibc-heap" keeps them in the heap instead.
ALLOCATORS = {
    "default": {},
    "glibc-heap": {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
}
ALLOCATOR_ENV_KEYS = ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD", "MALLOC_ARENA_MAX",
                      "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")


def allocator_env(name: str) -> dict[str, str]:
    if name not in ALLOCATORS:
        raise SystemExit(f"unknown allocator {name!r}; choose from {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name]


def memory_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _results_path(name: str, quick: bool) -> Path:
    import torch

    # A GPU machine's figures go beside the CPU ones (`<name>-cuda.json`), never over them.
    device = "-cuda" if torch.cuda.is_available() else ""
    return RESULTS / f"{name}{device}{'-quick' if quick else ''}.json"


def write_results(name: str, quick: bool, meta: dict[str, Any], rows: list[dict[str, Any]],
                  summary: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = _results_path(name, quick)
    meta = {**meta, "load_average_at_end": load_average()}
    path.write_text(json.dumps({"benchmark": name, "quick": quick, "machine": meta, "rows": rows,
                                "summary": summary or {}}, indent=2) + "\n")
    return path


def read_results(name: str, quick: bool) -> dict[str, Any] | None:
    path = _results_path(name, quick)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    text = str(value)
    return text if len(text) <= 70 else text[:67] + "..."


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table of `rows` with (key, header) columns."""
    cells = [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(header), *(len(c[i]) for c in cells)) if cells else len(header)
              for i, (_, header) in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    out = [line([h for _, h in columns]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(value: float | None, limit: float, *, at_most: bool = True) -> str:
    if value is None or value != value:
        return "n/a"
    ok = value <= limit if at_most else value >= limit
    return "met" if ok else "missed"


def parse_args(description: str, argv: Sequence[str] | None = None):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a fast check of the script")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    parser.add_argument("--allocator", default="default", choices=list(ALLOCATORS),
                        help="allocator environment of the measuring processes (see common.ALLOCATORS)")
    return parser


def report(name: str, quick: bool, meta: dict[str, Any], rows: list[dict[str, Any]],
           columns: list[tuple[str, str]], summary: dict[str, Any]) -> None:
    """Print the table and the summary, and write the JSON."""
    print()
    print(table(rows, columns))
    print()
    for key, value in summary.items():
        print(f"{key}: {fmt(value)}")
    print(f"\nwrote {write_results(name, quick, meta, rows, summary)}")


def entry(child: Callable[[dict[str, Any]], dict[str, Any]], main: Callable[[], int]) -> None:
    """A benchmark script is either the parent (`main`) or one measured configuration (`child`)."""
    payload = child_payload(sys.argv)
    if payload is not None:
        emit(child(payload))
    else:
        sys.exit(main())
