"""Quality: what a distilled set is worth against its controls, under one evaluation protocol.

    python3 benchmarks/quality.py --dataset mnist --ipc 1 10 50 [--rows ...] [--set KEY=VALUE ...]

For each IPC the run config is the preset `<family>-ipc<N>` (family defaults to the dataset) with the
`--set` overrides, and every row is scored by the same final evaluation (`--nets` fresh nets, at
least 5, mean +- std of test accuracy on the real test split):

  random       `--draws` random real subsets of IPC images per class, hard labels, lr_teacher
  start        the distillation's starting set (iteration 0: chosen real images, expert soft labels)
  pad          PAD as configured (the preset); when validation picks the starting set, the `start` row's scores
  alpha0       no parameter selection (alpha 0)
  no_schedule  experts on all the data from the start (IR 1, no removal), alpha as configured
  datm         both filters off (IR 1, no removal, alpha 0): DATM
  ceiling      nets trained on the whole training split with the experts' recipe (the no-schedule
               experts themselves: their final test accuracy)

Experts are shared across rows and IPCs through the store (`--store`), so each expert set trains
once. Each (IPC, row) runs in a fresh child process; the JSON lands in
`benchmarks/results/quality-<dataset>.json` (or `--name`).

Every set a row scores is also written to `--sets` as `<name>-ipc<N>-<row>.npz` (the format of
`pad-ray evaluate --synthetic`), and a distilled row's last set as `...-last.npz` (validation may
have kept an earlier one). `--sets-from NAME` scores the sets an earlier run wrote under NAME
(`--last`: the last ones) instead of building them again, so a distillation of hours can be
rescored under another protocol (`--set evaluate.epochs=1000`) in the time of its evaluation.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ROWS = ("random", "start", "pad", "alpha0", "no_schedule", "datm", "ceiling")
NO_SCHEDULE = {"schedule": {"init_ratio": 1.0, "add_end_epoch": 0, "remove": []}}
# --quick: the same rows and protocol (nets, draws) on tiny data and runs, to check the script in a minute.
QUICK = {"data": {"train_per_class": 30, "test_size": 500}, "difficulty": {"seeds": 1, "epochs": 1},
         "experts": {"num_experts": 2, "epochs": 3},
         "schedule": {"add_end_epoch": 1, "remove": [{"after_epoch": 2, "easiest_fraction": 0.1}]},
         "distill": {"iterations": 4, "eval_every": 2, "max_start_epoch": 2, "current_max_start_epoch": 1,
                     "syn_steps": 4, "expert_epochs": 1},
         "evaluate": {"epochs": 5}}
ROW_OVERRIDES = {
    "random": {}, "start": {}, "pad": {}, "alpha0": {"distill": {"alpha": 0.0}},
    "no_schedule": NO_SCHEDULE, "datm": {**NO_SCHEDULE, "distill": {"alpha": 0.0}}, "ceiling": NO_SCHEDULE,
}


def run_config(p: dict):
    from pad_ray.config import build_config, deep_merge

    # A family's presets run on any dataset of the same shape (mnist presets on Fashion-MNIST, KMNIST).
    raw = {"preset": f"{p['family']}-ipc{p['ipc']}", "data": {"root": p["root"], "dataset": p["dataset"]},
           "store_dir": p["store"],
           "output_dir": p["store"], "device": "auto", "resources": {"workers": 0},
           "evaluate": {"num_nets": p["nets"]}}
    for layer in (QUICK if p["quick"] else {}, p["overrides"], ROW_OVERRIDES[p["row"]]):
        raw = deep_merge(raw, layer)
    return build_config(raw, f"quality row {p['row']}")


_HISTORY = ("iteration", "val_accuracy", "test_accuracy", "skipped", "clipped", "syn_lr",
            "start_val_accuracy", "start_test_accuracy")


def child(p: dict) -> dict:
    from pad_ray import local_stages
    from pad_ray.distill import distill
    from pad_ray.evaluate import Scores
    from pad_ray.runtime import resolve_device
    from pad_ray.trajectories import TrajectoryStore

    threads = common.set_threads(p.get("threads"))
    cfg = run_config(p)
    dev = resolve_device(cfg.device)
    began = time.perf_counter()
    data = local_stages.load_data(cfg)
    order = local_stages.difficulty_order(cfg, data, dev)
    trajectories = local_stages.ensure_experts(cfg, data, order, dev)
    quality = TrajectoryStore(cfg.store_dir, cfg).quality(cfg.experts.num_experts)
    row = {**{k: p[k] for k in ("ipc", "row")}, "threads": threads, "device": str(dev),
           "expert_test_accuracy": quality.summary()["test_accuracy"], "prepare_s": time.perf_counter() - began}

    began = time.perf_counter()
    if p["row"] == "ceiling":
        tests = [q["test_accuracy"] for q in quality.experts]
        row.update(test=tests, nets=len(tests))
    elif p["row"] == "random":
        tests = []
        for subset in local_stages.control_sets("random", cfg, data, trajectories, p["draws"], dev):
            tests += local_stages.final_evaluation(cfg, data, subset, dev)[cfg.model.name]["test"]
        row.update(test=tests, nets=len(tests), draws=p["draws"])
    else:
        if p["sets_from"]:
            source = _set_path(p, p["sets_from"], last=p["last"])
            synthetic = local_stages.load_synthetic(source, data)
            row.update(set_from=str(source))
        elif p["row"] == "start":
            (synthetic,) = local_stages.control_sets("start", cfg, data, trajectories, 1, dev)
        else:
            # The run's own evaluations (`eval_nets` nets): what validation chose the best set from.
            history = []
            distiller = distill(cfg, data, trajectories, dev, on_eval=lambda _, m: history.append(
                {k: m[k] for k in _HISTORY if k in m}))
            synthetic = distiller.best_synthetic()
            # Validation on `eval_nets` nets may keep an earlier set than the last; keep the last too, to rescore.
            row.update(last_set=_save_set(p, distiller.synthetic(), last=True), iterations=distiller.iteration,
                       skipped=distiller.skipped, clipped=distiller.clipped, distill_s=distiller.elapsed,
                       best_iteration=distiller.best.iteration, evaluations=history)
        if row.get("best_iteration") == 0 and p.get("start_test"):
            # Validation chose the starting set itself, which the `start` row of this IPC already scored with
            # the same nets and seeds (the final evaluation's seed is the run's, not the row's).
            tests = p["start_test"]
            row.update(test_from="start")
        else:
            tests = local_stages.final_evaluation(cfg, data, synthetic, dev)[cfg.model.name]["test"]
        row.update(test=tests, nets=len(tests), set=_save_set(p, synthetic))
    mean, std = Scores.summary(row["test"])
    row.update(test_mean=100 * mean, test_std=100 * std, row_s=time.perf_counter() - began)
    return row


def _set_path(p: dict, name: str, last: bool = False) -> Path:
    return Path(p["sets"]) / f"{name}-ipc{p['ipc']}-{p['row']}{'-last' if last else ''}.npz"


def _save_set(p: dict, synthetic, last: bool = False) -> str:
    from pad_ray.local_stages import save_synthetic

    path = _set_path(p, p["name"], last)
    save_synthetic(path, synthetic)
    return str(path)


def main() -> int:
    parser = common.parse_args(__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--family", help="preset family (presets <family>-ipc<N>); default: the dataset")
    parser.add_argument("--root", default=str(common.REPO.parent / "shared" / "data"), help="data.root")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--nets", type=int, default=5, help="evaluation nets per row (at least 5)")
    parser.add_argument("--draws", type=int, default=3, help="random subsets (at least 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override for every row, e.g. --set distill.iterations=500")
    parser.add_argument("--store", default=str(common.REPO / "runs" / "quality-store"),
                        help="expert store shared by the rows (and by later runs)")
    parser.add_argument("--name", help="results file name (default: quality-<dataset>)")
    parser.add_argument("--sets", default=str(common.REPO / "runs" / "quality-sets"),
                        help="folder the scored sets are written to, as <name>-ipc<N>-<row>.npz")
    parser.add_argument("--sets-from", metavar="NAME",
                        help="score the sets an earlier run NAME wrote to --sets instead of building them")
    parser.add_argument("--last", action="store_true",
                        help="with --sets-from: score each distilled row's last set, not the one validation kept")
    args = parser.parse_args()
    if args.nets < 5 or args.draws < 3:
        parser.error("the protocol needs --nets >= 5 and --draws >= 3")
    if args.sets_from and {"random", "ceiling"} & set(args.rows):
        parser.error("--sets-from rescores built sets: rows random and ceiling have none (drop them from --rows)")
    if args.last and (not args.sets_from or "start" in args.rows):
        parser.error("--last needs --sets-from and distilled rows only (the start row has no last set)")

    from pad_ray.config import parse_overrides

    overrides = parse_overrides(args.overrides)
    family = args.family or args.dataset
    name = args.name or f"quality-{args.dataset}"
    meta = {**common.machine(), "dataset": args.dataset, "family": family, "overrides": overrides,
            "nets": args.nets, "draws": args.draws}
    rows = []
    for ipc in args.ipc:
        for row in args.rows:
            payload = {"family": family, "dataset": args.dataset, "ipc": ipc, "row": row,
                       "root": str(Path(args.root).resolve()), "overrides": copy.deepcopy(overrides),
                       "nets": args.nets, "draws": args.draws, "store": str(Path(args.store).resolve()),
                       "threads": args.threads, "quick": args.quick, "name": name,
                       "sets": str(Path(args.sets).resolve()), "sets_from": args.sets_from, "last": args.last}
            start = next((r for r in rows if (r["ipc"], r["row"]) == (ipc, "start") and "test" in r), None)
            if row == "pad" and start and not args.sets_from:
                payload["start_test"] = start["test"]
            print(f"IPC {ipc} {row} ...", flush=True)
            # A row takes minutes to an hour: its progress bars (EL2N, experts, distillation) show here.
            result = common.run_child(__file__, payload, timeout_s=6 * 3600, show_stderr=True)
            print(f"  {common.fmt(result.get('test_mean'))} +- {common.fmt(result.get('test_std'))}"
                  f" ({common.fmt(result.get('child_wall_s'))} s){' ' + result['error'] if 'error' in result else ''}",
                  flush=True)
            rows.append(result)
            # Rows take up to an hour each: what is done is on disk if the rest is interrupted.
            common.write_results(name, args.quick, {**meta, "complete": False}, rows, _margins(rows))
    columns = [("ipc", "IPC"), ("row", "row"), ("test_mean", "test acc %"), ("test_std", "std"), ("nets", "nets"),
               ("expert_test_accuracy", "expert acc"), ("iterations", "iters"), ("skipped", "skipped"),
               ("clipped", "clipped"), ("distill_s", "distill s"), ("child_wall_s", "wall s")]
    common.report(name, args.quick, {**meta, "complete": True}, rows, columns, _margins(rows))
    return 0


def _margins(rows: list[dict]) -> dict:
    """PAD's lead over random subsets and over its own starting set, per IPC (in points)."""
    summary = {}
    by = {(r["ipc"], r["row"]): r.get("test_mean") for r in rows}
    for ipc in sorted({r["ipc"] for r in rows}):
        pad = by.get((ipc, "pad"))
        for control in ("random", "start"):
            if pad is not None and by.get((ipc, control)) is not None:
                summary[f"ipc{ipc} pad - {control}"] = pad - by[(ipc, control)]
    return summary


if __name__ == "__main__":
    common.entry(child, main)
