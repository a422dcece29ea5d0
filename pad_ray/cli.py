"""`pad-ray`: PAD's stages on one machine, sweeps on Ray Tune, and the configs behind both.

    pad-ray scores   CONFIG    difficulty order (EL2N or an index file), cached in the store
    pad-ray experts  CONFIG    the expert trajectories the store lacks
    pad-ray distill  CONFIG    distillation (resumes from the run's checkpoint)
    pad-ray evaluate CONFIG    fresh nets on the distilled set: mean and std accuracy
    pad-ray run      CONFIG    all of the above
    pad-ray sweep    SWEEP     a Ray Tune sweep, as `python -m pad_ray.sweep SWEEP`
    pad-ray validate FILE      check a run config or a sweep file; list every error
    pad-ray presets            the presets a run config can start from (`preset: NAME`)
    pad-ray data     NAME      download a dataset into --root in the layout pad_ray reads
    pad-ray export   SOURCE    a run's distilled set as one safetensors file or a torchvision ImageFolder
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from pad_ray.config import (PRESET_DIR, PRESETS, ConfigError, RunConfig, check_config, load_config, parse_overrides,
                            preset_header, read_with_overrides, with_absolute_paths)
from pad_ray.errors import input_error, input_error_types
from pad_ray.sweep_config import ControlsConfig, add_sweep_flags, check_sweep, finite_grid, load_sweep

# torch, Ray and MLflow are imported inside the commands that use them, so that `--help`, `presets`,
# `validate` and every config error answer at once.

STAGES = ("scores", "experts", "distill", "evaluate", "run")
SOURCE_HELP = ("a distilled_best.safetensors, a run folder, a Tune trial folder, a sweep folder (its best trial), or "
               "an MLflow artifact URI (runs:/RUN_ID/distilled_best.safetensors)")
TRACKING_URI_HELP = "MLflow tracking URI for runs:/ sources (default: MLFLOW_TRACKING_URI)"


def run_stage(stage: str, cfg: RunConfig, out: Path | None, synthetic: str | None = None,
              tracking_uri: str | None = None, controls: bool = False) -> dict[str, Any]:
    import torch

    from pad_ray import files, local_stages
    from pad_ray.runtime import resolve_device
    from pad_ray.trajectories import TrajectoryStore

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = out or local_stages.run_dir(cfg)
    data = local_stages.load_data(cfg)
    if stage == "evaluate":
        source = synthetic or str(out / "synthetic_best.npz")
        if source.endswith(".npz"):
            chosen = local_stages.load_synthetic(Path(source), data)
        else:
            from pad_ray.distilled import for_evaluation

            chosen = for_evaluation(source, data, tracking_uri)
        return local_stages.final_evaluation(cfg, data, chosen, device)
    stored = _from_store(stage, cfg)
    if stored is not None:
        order, trajectories = stored
    elif cfg.resources.workers > 0:
        order, trajectories = _experts_on_ray(stage, cfg, data)
    else:
        order = local_stages.difficulty_order(cfg, data, device)
        trajectories = [] if stage == "scores" else local_stages.ensure_experts(cfg, data, order, device)
    if stage == "scores":
        return {"classes": len(order), "samples": sum(len(o) for o in order)}
    quality = TrajectoryStore(cfg.store_dir, cfg).quality(cfg.experts.num_experts)
    print(quality.line(), file=sys.stderr)
    if stage == "experts":
        return {"experts": len(trajectories), "store": str(Path(cfg.store_dir).resolve()),
                "accuracy": quality.summary(), "per_expert": quality.experts}
    distiller = local_stages.run_distillation(cfg, data, trajectories, device, out)
    result: dict[str, Any] = {"run_dir": str(out), "iterations": distiller.iteration,
                              "skipped": distiller.skipped, "best_val_accuracy": distiller.best.val,
                              "best_iteration": distiller.best.iteration}
    if stage == "run":
        result["evaluation"] = local_stages.final_evaluation(cfg, data, distiller.best_synthetic(), device)
        if controls:
            result["controls"] = _controls(cfg, data, trajectories, device, result["evaluation"])
        files.write_json(out / "results.json", result)
    return result


def _controls(cfg: RunConfig, data, trajectories: list, device, evaluation: dict) -> dict[str, dict[str, float]]:
    """The run's starting set and random real subsets (a sweep's default draws) under its final evaluation, and
    the best set's lead over each, as a sweep reports its top trials' (pad_ray.controls)."""
    from pad_ray import local_stages
    from pad_ray.evaluate import Scores

    best = evaluation[cfg.evaluate.models[0]]["test_mean"]
    scored = {}
    for kind, draws in (("start", 1), ("random", ControlsConfig().random_subsets)):
        tests = local_stages.control_tests(kind, cfg, data, trajectories, draws, device, progress=True)
        mean, std = Scores.summary(tests)
        scored[kind] = {"test_mean": mean, "test_std": std, "sets": draws, "lead": best - mean}
    return scored


def _from_store(stage: str, cfg: RunConfig) -> tuple[list, list] | None:
    """The order and experts the stage needs when the store holds them all, else None. Ray starts only for
    what is missing: a local Ray takes seconds and a cluster's processes, and a rerun of `pad-ray distill` on a
    complete store needs none. Each expert file is hashed once to check it and once to load it, as on the
    paths that train."""
    from pad_ray.trajectories import DifficultyCache, TrajectoryStore

    order = DifficultyCache(cfg.store_dir, cfg).load()
    if order is None:
        return None
    if stage == "scores":
        return order, []
    store = TrajectoryStore(cfg.store_dir, cfg)
    if store.missing(cfg.experts.num_experts):
        return None
    return order, [store.load(i) for i in range(cfg.experts.num_experts)]


def _experts_on_ray(stage: str, cfg: RunConfig, data) -> tuple[list, list]:
    """EL2N seeds as Ray tasks and experts on Ray Train (a local Ray, or the cluster of a Ray job), then off
    Ray: distillation runs in this process, and a local Ray's processes, Train's actors among them, made it
    1.09x slower on 2 cores (BENCHMARKS.md, section 6). The order and the experts are local copies."""
    import ray

    from pad_ray import ray_stages

    ray_stages.init_ray()
    try:
        order = ray_stages.difficulty_order(cfg, data)
        if stage == "scores":
            return order, []
        (store,) = ray_stages.generate_experts([ray_stages.ExpertSet(cfg, data, order)])
        return order, [store.load(i) for i in range(cfg.experts.num_experts)]
    finally:
        ray.shutdown()  # stops the local Ray this started; on a cluster it only disconnects


# -- the commands: each returns the exit code ----------------------------------------------------

def _stage(args: argparse.Namespace) -> int:
    cfg = with_absolute_paths(load_config(args.file, parse_overrides(args.overrides)))
    from pad_ray.distill import DivergenceError  # after the config: its errors need no torch

    try:
        result = run_stage(args.command, cfg, args.out, args.synthetic, args.tracking_uri, args.controls)
    except DivergenceError as exc:
        print(f"pad-ray: diverged: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.file, parse_overrides(args.overrides))  # a bad file stops before Ray starts
    from pad_ray.sweep import launch

    return launch(sweep, args, str(args.file))


def is_sweep(raw: Any) -> bool:
    """A sweep file has a base or a space; no run config has either."""
    return isinstance(raw, dict) and ("base" in raw or "space" in raw)


def validate(path: Path, overrides: list[str]) -> tuple[list[str], str]:
    """Every problem of a run config or sweep file, one line each, and what the file is."""
    source = str(path)
    try:
        raw = read_with_overrides(path, parse_overrides(overrides))
    except ConfigError as exc:  # unreadable: nothing more can be checked
        return [input_error(exc, path)], ""
    if not is_sweep(raw):
        cfg, problems = check_config(raw, source)
        return problems, "" if cfg is None else f"run config{f' (preset {cfg.preset})' if cfg.preset else ''}"
    sweep, problems = check_sweep(raw, source)
    if sweep is None:
        return problems, ""
    trials = {json.dumps(p, sort_keys=True) for p in finite_grid(sweep, 0) + finite_grid(sweep, 1)}
    return problems, f"sweep {sweep.name!r} and its {len(trials)} trial config(s)"


def _validate(args: argparse.Namespace) -> int:
    problems, what = validate(args.file, args.overrides)
    for line in problems:
        print(line)
    if problems:
        return 2
    # Datasets and stores are read by the commands that use them, so they are not checked here.
    print(f"{args.file}: OK: {what}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    width = max(map(len, PRESETS))
    for name in PRESETS:
        print(f"{name:<{width}}  {preset_header(name)}")
    print(f"\nUse one with `preset: NAME` in a run config (pad-ray run CONFIG), or --set preset=NAME.\n"
          f"The files: {PRESET_DIR}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from pad_ray.data import DATASETS, download

    if args.name not in DATASETS:
        raise ConfigError(f"data: unknown dataset {args.name!r}; allowed: {', '.join(DATASETS)}")
    print(f"{args.name}: {download(args.name, args.root)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pad_ray import export_target

    export_target.check(args.format, args.out)  # before torch: a refusal takes no import
    from pad_ray.distilled import export

    print(export(args.source, args.format, args.out, args.tracking_uri))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pad-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # No per-command help here: the table in the description already lists them.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command's argument name and summary come from that table, so the two cannot drift apart.
    table = {m[1]: (m[2], m[3]) for m in re.finditer(r"^    pad-ray (\w+) +([A-Z]*) +(.+)$", __doc__, re.M)}

    def command(name: str, handler, file_help: str | None, example: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, description=table[name][1])
        if file_help:
            sub.add_argument("file", type=Path, metavar=table[name][0], help=file_help)
            sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help=f"override one key, e.g. --set {example}")
        sub.set_defaults(handler=handler)
        return sub

    for stage in STAGES:
        sub = command(stage, _stage, "YAML run config (see: pad-ray presets)", "distill.iterations=20")
        sub.add_argument("--out", type=Path, help="run folder (default: output_dir/<preset>-<hash>)")
        if stage == "evaluate":
            sub.add_argument("--synthetic", metavar="SOURCE",
                             help=f"the distilled set to evaluate (default: the run's best): {SOURCE_HELP}")
            sub.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
        else:
            sub.set_defaults(synthetic=None, tracking_uri=None)
        if stage == "run":
            sub.add_argument("--controls", action="store_true",
                             help="also score the starting set and random real subsets under the final evaluation, "
                                  "and the best set's lead over each (results.json's controls)")
        else:
            sub.set_defaults(controls=False)
    add_sweep_flags(command("sweep", _sweep, "sweep YAML (see sweeps/)", "base.distill.iterations=20"))
    command("validate", _validate, "YAML run config or sweep file", "distill.alpha=0.3")
    command("presets", _presets, None).set_defaults(file=Path("pad-ray presets"))
    data = command("data", _data, None)
    data.add_argument("name", metavar="NAME", help="mnist, fashionmnist, kmnist, svhn, cifar10, cifar100, tinyimagenet")
    data.add_argument("--root", type=Path, required=True, help="data.root of the configs that will read it")
    data.set_defaults(file=Path("pad-ray data"))
    export = command("export", _export, None)
    export.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    # Checked by the command, not argparse: a bad value is then one line, as every other input error.
    export.add_argument("--format", default="safetensors", help="safetensors (default) or imagefolder")
    export.add_argument("--out", type=Path, required=True, help="folder to create (missing or empty)")
    export.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    export.set_defaults(file=Path("pad-ray export"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except input_error_types() as exc:
        print(f"pad-ray: error: {input_error(exc, args.file)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
