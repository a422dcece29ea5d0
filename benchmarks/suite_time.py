"""The test suite's time: the README's test command, with each test's wall time and what it kept busy.

    python3 benchmarks/suite_time.py [--quick] [--top N] [-- PYTEST_ARGS...]

Runs `python3 -m pytest -q` in the repo (arguments after `--` go to pytest: `-n 0` for one worker, `-k sweep`)
with this file as a pytest plugin. Around every test the plugin reads the machine's busy time from
/proc/stat, so the figures are the whole machine's: run it on a quiet one. Under pytest-xdist a test's busy
core-seconds include whatever the other workers ran meanwhile; with `-n 0` each is that test's own cost.
Rows: the slowest tests by wall time. Summary: the suite's wall time, busy core-seconds and the share of the
cores kept busy. `--quick` runs tests/test_config.py alone, as a check of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "suite_time"
OUT_ENV = "PAD_RAY_SUITE_TIME_OUT"  # where each pytest process appends its tests' rows (JSON lines)


def busy_core_seconds() -> float:
    """CPU time the whole machine has spent busy (user, nice, system, irq, softirq) since boot."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in stat.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


# -- the plugin, loaded into pytest (and into every xdist worker) with `-p suite_time` ------------------

_rows: list[dict] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    busy, start = busy_core_seconds(), time.monotonic()
    outcome = yield
    _rows.append({"test": item.nodeid, "wall_s": time.monotonic() - start, "busy_core_s": busy_core_seconds() - busy,
                  "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")})
    return outcome


def pytest_sessionfinish(session):
    if _rows and os.environ.get(OUT_ENV):
        with open(os.environ[OUT_ENV], "a") as out:
            out.writelines(json.dumps(row) + "\n" for row in _rows)


# -- the benchmark ---------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tests/test_config.py only: a check of this script")
    parser.add_argument("--top", type=int, default=20, help="rows: this many of the slowest tests")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: arguments for pytest")
    args = parser.parse_args()
    pytest_args = [a for a in args.pytest_args if a != "--"] + (["tests/test_config.py"] if args.quick else [])
    with tempfile.TemporaryDirectory() as folder:
        rows_file = Path(folder) / "tests.jsonl"
        env = {**os.environ, OUT_ENV: str(rows_file),
               "PYTHONPATH": os.pathsep.join(p for p in (str(common.HERE), os.environ.get("PYTHONPATH")) if p)}
        busy, start = busy_core_seconds(), time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", NAME, *pytest_args], cwd=common.REPO,
                              env=env)
        wall, busy = time.monotonic() - start, busy_core_seconds() - busy
        tests = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    tests.sort(key=lambda row: -row["wall_s"])
    cores = len(os.sched_getaffinity(0))
    summary = {"pytest_args": " ".join(pytest_args), "pytest_exit_status": done.returncode, "tests": len(tests),
               "wall_s": wall, "wall_min": wall / 60, "busy_core_s": busy, "cores": cores,
               "cores_busy_share": busy / (wall * cores)}
    common.report(NAME, args.quick, common.machine(), tests[:args.top],
                  [("test", "test"), ("wall_s", "wall s"), ("busy_core_s", "busy core-s"), ("worker", "worker")],
                  summary)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
