"""`pad-ray`: run PAD's stages on one machine from one YAML config.

    pad-ray scores   CONFIG    difficulty order (EL2N or an index file), cached in the store
    pad-ray experts  CONFIG    the expert trajectories the store lacks
    pad-ray distill  CONFIG    distillation (resumes from the run's checkpoint)
    pad-ray evaluate CONFIG    fresh nets on the distilled set: mean and std accuracy
    pad-ray run      CONFIG    all of the above
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from pad_ray import files
from pad_ray.config import PRESETS, ConfigError, RunConfig, load_config, with_absolute_paths
from pad_ray.data import DataError
from pad_ray.distill import DivergenceError
from pad_ray.runtime import resolve_device

STAGES = ("scores", "experts", "distill", "evaluate", "run")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set distill.iterations=20` -> {"distill": {"iterations": 20}} (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. distill.iterations=20")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return tree


def input_error(exc: Exception, source: Path) -> str:
    """One line naming the file and the key, also for errors found after the config was read."""
    message = str(exc).splitlines()[0]
    if isinstance(exc, DataError):
        message = f"data.root: {message}"
    if isinstance(exc, files.IntegrityError) or message.startswith(str(source)):
        return message
    return f"{source}: {message}"


def run_stage(stage: str, cfg: RunConfig, out: Path | None, synthetic_path: Path | None) -> dict[str, Any]:
    # Imported here so that `pad-ray --help` and config errors stay fast.
    import torch

    from pad_ray import stages
    from pad_ray.trajectories import TrajectoryStore

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = out or stages.run_dir(cfg)
    data = stages.load_data(cfg)
    if stage == "evaluate":
        synthetic = stages.load_synthetic(synthetic_path or out / "synthetic_best.npz")
        return stages.final_evaluation(cfg, data, synthetic, device)
    if cfg.resources.workers > 0:
        order, trajectories = _experts_on_ray(stage, cfg, data)
    else:
        order = stages.difficulty_order(cfg, data, device)
        trajectories = [] if stage == "scores" else stages.ensure_experts(cfg, data, order, device)
    if stage == "scores":
        return {"classes": len(order), "samples": sum(len(o) for o in order)}
    quality = TrajectoryStore(cfg.store_dir, cfg).quality(cfg.experts.num_experts)
    print(quality.line(), file=sys.stderr)
    if stage == "experts":
        return {"experts": len(trajectories), "store": str(Path(cfg.store_dir).resolve()),
                "accuracy": quality.summary(), "per_expert": quality.experts}
    distiller = stages.run_distillation(cfg, data, trajectories, device, out)
    result: dict[str, Any] = {"run_dir": str(out), "iterations": distiller.iteration,
                              "skipped": distiller.skipped, "best_val_accuracy": distiller.best["val"],
                              "best_iteration": distiller.best["iteration"]}
    if stage == "run":
        result["evaluation"] = stages.final_evaluation(cfg, data, distiller.best_synthetic(), device)
        files.write_json(out / "results.json", result)
    return result


def _experts_on_ray(stage: str, cfg: RunConfig, data) -> tuple[list, list]:
    """EL2N seeds as Ray tasks and experts on Ray Train (a local Ray, or the cluster of a Ray job)."""
    import ray

    from pad_ray import distributed

    ray.init(log_to_driver=True)
    order = distributed.difficulty_order(cfg, data)
    if stage == "scores":
        return order, []
    store = distributed.generate_experts(cfg, data, order)
    return order, [store.load(i) for i in range(cfg.experts.num_experts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pad-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("config", type=Path, help=f"YAML run config (presets: {', '.join(PRESETS)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set distill.iterations=20")
    parser.add_argument("--out", type=Path, help="run folder (default: output_dir/<preset>-<hash>)")
    parser.add_argument("--synthetic", type=Path, help="distilled set to evaluate (default: the run's best)")
    args = parser.parse_args(argv)
    try:
        cfg = with_absolute_paths(load_config(args.config, parse_overrides(args.overrides)))
        result = run_stage(args.stage, cfg, args.out, args.synthetic)
    except (ConfigError, DataError, files.IntegrityError) as exc:
        print(f"pad-ray: error: {input_error(exc, args.config)}", file=sys.stderr)
        return 2
    except DivergenceError as exc:
        print(f"pad-ray: diverged: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
