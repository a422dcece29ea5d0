"""Run every benchmark in turn (each writes its own JSON into benchmarks/results/).

    python3 benchmarks/run_all.py [--quick] [--allocator NAME]

Order matters a little: object_store reads the iteration times that distill_iteration wrote.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("distill_iteration", "object_store", "experts", "sweep_overhead", "evaluation")


def main(argv: list[str]) -> int:
    failed = []
    for name in SCRIPTS:
        extra = [a for a in argv if a == "--quick"]
        if name in ("distill_iteration", "evaluation") and "--allocator" in argv:
            extra += argv[argv.index("--allocator"):argv.index("--allocator") + 2]
        began = time.perf_counter()
        print(f"=== {name} {' '.join(extra)}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *extra])
        print(f"=== {name}: exit {code} after {time.perf_counter() - began:.0f} s\n", flush=True)
        if code:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
