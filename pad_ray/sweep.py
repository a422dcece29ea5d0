"""`python -m pad_ray.sweep SWEEP.yaml`, also `pad-ray sweep SWEEP.yaml`: PAD distillation trials over
IPC, alpha, IR and AEE on Ray Tune.

The driver validates the whole sweep, makes the expert sets the space needs (Ray Train, reusing the
store), puts their trajectories in the object store, and runs one Tune function trial per sampled
config (`search:` grid, random or Optuna's TPE) with ASHA on validation accuracy. Trials checkpoint at
every evaluation; a crashed trial is retried from its last checkpoint, a diverged one fails with its
reason while the others go on. MLflow gets one parent run per sweep and a child run per trial; the end
brings a results table, the best config and plots.

Running the same file again resumes an interrupted sweep (finished trials are not rerun). An edited file
is refused before any work (exit 2) unless --resume (continue the sweep as first started, ignoring the
edits) or --fresh (move the old sweep folder aside to <name>.replaced-<time> and start a new sweep).
An interrupted sweep (Ctrl-C, SIGTERM) saves its state, marks its MLflow parent run KILLED, writes its
results so far with partial=true, and exits 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pad_ray.config import parse_overrides
from pad_ray.errors import input_error, input_error_types
from pad_ray.sweep_config import SweepConfig, add_sweep_flags, load_sweep

INTERRUPTED = 130  # the exit status of a sweep stopped before all its trials ended, as shells give Ctrl-C


# torch, Ray and MLflow are imported only once the sweep file has passed (pad_ray.tune_sweep, the
# driver; pad_ray.plan, the dry run): a typo in the file is answered at once, not after seconds of imports.
def launch(sweep: SweepConfig, args: argparse.Namespace, source: str) -> int:
    """What both sweep commands do with a loaded sweep: plan it (--dry-run) or run it."""
    if args.dry_run:
        from pad_ray import plan

        print(plan.describe(sweep, source))
        return 0
    from pad_ray.tune_sweep import run_sweep

    return run_sweep(sweep, args.rerun).exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pad_ray.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="sweep YAML (see sweeps/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one sweep key, e.g. --set base.distill.iterations=20")
    add_sweep_flags(parser)
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, parse_overrides(args.overrides))
        return launch(sweep, args, str(args.sweep))
    except input_error_types() as exc:
        print(f"pad_ray.sweep: error: {input_error(exc, args.sweep)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pad_ray.sweep: interrupted; run the same command again to resume", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
