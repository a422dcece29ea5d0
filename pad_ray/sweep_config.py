"""The sweep file: a base run config, a search space, and how Ray Tune and MLflow run it.

Loading a sweep expands its finite grid into trial configs and validates every one of them, so that a
bad key stops the sweep before any work. The flags of an invocation live here too, shared by
`pad-ray sweep` and `python -m pad_ray.sweep`. Kept apart from the run schema in `config`, which knows
nothing of sweeps, and from the driver in `sweep`, which needs Ray: checking a sweep file imports
neither Ray nor MLflow.
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pad_ray.config import (PRESETS, ConfigError, RunConfig, Section, absolute, build_config, check_config,
                            describe_errors, read_with_overrides, with_absolute_paths)


# The four PAD knobs by their short names; any other dotted config key may be swept too.
SPACE_ALIASES = {"ipc": "distill.ipc", "alpha": "distill.alpha", "ir": "schedule.init_ratio",
                 "aee": "schedule.add_end_epoch"}
# The sweep driver's own space key when num_samples > 1: which repeat of a config a trial is. Repeat 0
# runs with the config's `seed`, each other repeat with a seed derived from it and its index.
REPEAT = "repeat"
FINITE_KINDS = ("grid", "choice")
SAMPLED_KINDS = ("uniform", "loguniform", "quniform", "randint")
OPTUNA_MAX_CONCURRENT = 4


class Axis(Section):
    """One swept key: `grid`/`choice` (finite) or a distribution; a YAML list means `grid`."""

    kind: Literal["grid", "choice", "uniform", "loguniform", "quniform", "randint"]
    values: tuple[Any, ...]

    @property
    def finite(self) -> bool:
        return self.kind in FINITE_KINDS

    @model_validator(mode="after")
    def _shape(self) -> Axis:
        if self.finite and not self.values:
            raise ValueError(f"{self.kind} needs at least one value")
        arity = {"uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3}.get(self.kind)
        if arity and len(self.values) != arity:
            raise ValueError(f"{self.kind} takes [{'low, high, q' if arity == 3 else 'low, high'}]")
        return self


class AshaConfig(Section):
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)  # evaluations a trial runs before it can be stopped
    max_t: int | None = Field(None, ge=1)  # evaluations at most; default: all of a trial's evaluations
    reduction_factor: float = Field(2.0, gt=1)
    # A trial competes only with trials that share its values of these space keys: an IPC 50 set
    # always scores above an IPC 1 set, so one pool would stop every small-IPC trial early.
    group_by: tuple[str, ...] = ("ipc",)
    # Tune's ASHA judges a trial against those that reached a rung before it, so timing decides close calls
    # and two runs of one sweep can stop different trials. true: judged in trial order (a trial that gets
    # ahead of an earlier one is paused at the rung until that one catches up or ends), the same every run.
    # A paused trial frees its resources for the next trial, but counts against max_concurrent_trials.
    repeatable: bool = False


class SearchConfig(Section):
    """How Tune picks trial configs: every grid point (distributions drawn num_samples times), num_samples
    random draws, or num_samples suggestions of Optuna's TPE, which learns from the finished trials."""

    kind: Literal["grid", "random", "optuna"] = "grid"
    seed: int | None = None  # default: the base run config's seed
    # optuna only: TPE suggests from what has finished, so running every trial at once would make it random.
    max_concurrent: int | None = Field(None, ge=1)

    @property
    def concurrency(self) -> int:
        return self.max_concurrent or OPTUNA_MAX_CONCURRENT


class TrialResources(Section):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class ControlsConfig(Section):
    """What each group's top trial is read against, under that trial's own final evaluation: random real
    subsets of its size (hard labels at lr_teacher; 0 draws: none) and its starting set (iteration 0)."""

    random_subsets: int = Field(3, ge=0)
    starting_set: bool = True


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    experiment: str | None = None  # default: the sweep's name


class SweepConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: dict[str, Any]
    space: dict[str, Axis]
    asha: AshaConfig = AshaConfig()
    search: SearchConfig = SearchConfig()
    trial_resources: TrialResources = TrialResources()
    max_concurrent_trials: int = Field(0, ge=0)  # 0: as many as the cluster fits
    num_samples: int = Field(1, ge=1)
    max_failures: int = Field(1, ge=0)  # retries of a crashed trial, from its last checkpoint
    # A finished trial's actor takes the next trial (same resources): no process start and no import of
    # torch per trial, which is most of a short trial's time (BENCHMARKS.md, section 4).
    reuse_actors: bool = True
    storage_path: str = "runs/sweeps"
    mlflow: MlflowConfig = MlflowConfig()
    controls: ControlsConfig = ControlsConfig()

    @property
    def group_by(self) -> tuple[str, ...]:
        """The group keys this space sweeps (a key it does not sweep groups nothing)."""
        return tuple(key for key in self.asha.group_by if key in self.space)

    def path_of(self, key: str) -> str:
        return SPACE_ALIASES.get(key, key)

    @property
    def total_trials(self) -> int:
        """The trials a whole run of the sweep makes: grid points x num_samples, or num_samples draws."""
        points = 1
        if self.search.kind == "grid":
            for axis in self.space.values():
                points *= len(axis.values) if axis.kind == "grid" else 1
        return points * self.num_samples

    @property
    def trial_keys(self) -> tuple[str, ...]:
        """The keys of a trial's params: the space's, and the repeat index where there are repeats."""
        return (*self.space, *((REPEAT,) if self.num_samples > 1 and self.search.kind == "grid" else ()))


def _parse_axis(spec: Any) -> dict[str, Any] | None:
    """An axis in the schema's form, or None when `spec` is neither a list nor `{kind: values}`."""
    if isinstance(spec, list):
        return {"kind": "grid", "values": spec}
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, values), = spec.items()
        return {"kind": kind, "values": values if isinstance(values, list) else [values]}
    return None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def trial_raw(sweep: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The raw run config of one trial: the base, with IPC choosing its preset of the same family where
    the base uses one (`cifar10-ipc10` -> `cifar10-ipc50`, `cifar10-ipc10-released` ->
    `cifar10-ipc50-released`), then the sampled values."""
    raw = copy.deepcopy(sweep.base)
    preset = raw.get("preset") or ""
    family = re.fullmatch(r"(.+-ipc)\d+(.*)", preset)
    if "ipc" in params and preset in PRESETS and family:
        candidate = f"{family[1]}{params['ipc']}{family[2]}"
        if candidate in PRESETS:
            raw["preset"] = candidate
    for key, value in params.items():
        _set_dotted(raw, sweep.path_of(key), value)
    return raw


def trial_config(sweep: SweepConfig, params: dict[str, Any], source: str = "sweep") -> RunConfig:
    """The run config of one trial. Repeats share everything but the distillation seed, so they share
    their split and experts (data.seed, experts.seed) and still differ."""
    params = dict(params)
    repeat = int(params.pop(REPEAT, 0))
    cfg = build_config(trial_raw(sweep, params), source)
    if not repeat:
        return cfg
    from pad_ray.runtime import derive_seed  # imports torch, which checking a sweep file does not need

    return cfg.model_copy(update={"seed": derive_seed(cfg.seed, REPEAT, repeat)})


def finite_grid(sweep: SweepConfig, bound: int = 0) -> list[dict[str, Any]]:
    """Every combination of the finite axes, distributions set to their lower (bound=0) or upper bound."""
    combos: list[dict[str, Any]] = [{}]
    for key, axis in sweep.space.items():
        values = axis.values if axis.finite else axis.values[bound:bound + 1]
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def with_absolute_base(sweep: SweepConfig) -> SweepConfig:
    """Pin the base's paths to absolute ones here: trials run in other directories and processes."""
    cfg = with_absolute_paths(trial_config(sweep, finite_grid(sweep)[0]))
    base = {**sweep.base, "output_dir": cfg.output_dir, "store_dir": cfg.store_dir,
            "data": {**sweep.base.get("data", {}), "root": cfg.data.root}}
    if cfg.difficulty.index_file:
        base["difficulty"] = {**sweep.base.get("difficulty", {}), "index_file": cfg.difficulty.index_file}
    return sweep.model_copy(update={"base": base, "storage_path": absolute(sweep.storage_path)})


def check_sweep(raw: Any, source: str = "sweep") -> tuple[SweepConfig | None, list[str]]:
    """Validate a raw sweep and every trial config of its finite grid: the sweep, or every problem
    found, one line each (`source: key: message`), in the order the sweep would meet them."""
    if not isinstance(raw, dict):
        return None, [f"{source}: expected a mapping at the top level"]
    problems: list[str] = []
    space = raw.get("space")
    if isinstance(space, dict):
        parsed = {}
        for key, spec in space.items():
            axis = _parse_axis(spec)
            if axis is None:
                problems.append(f"{source}: space.{key}: expected a list of values or one of "
                                f"{{{', '.join(FINITE_KINDS + SAMPLED_KINDS)}: [...]}}")
            else:
                parsed[key] = axis
        # The rest is still checked without the unreadable axes.
        raw = {**raw, "space": parsed}
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        problems += [f"{source}: {line}" for line in describe_errors(exc, SweepConfig)]
        # No trials can be expanded without a valid sweep, but the base can still be checked alone.
        if isinstance(raw.get("base"), dict):
            problems += check_config(raw["base"], f"{source}: base")[1]
        return None, problems
    problems += [f"{source}: {line}" for line in _space_problems(sweep, axes_dropped=bool(problems))]
    problems += _trial_problems(sweep, source)
    return (None, problems) if problems else (sweep, [])


def _space_problems(sweep: SweepConfig, axes_dropped: bool) -> list[str]:
    if not sweep.space:
        return [] if axes_dropped else ["space: give at least one key to sweep (ipc, alpha, ir, aee, ...)"]
    problems = []
    for key, axis in sweep.space.items():
        path = sweep.path_of(key)
        section = path.split(".")[0]
        if key == REPEAT:
            problems.append(f"space.{key}: repeats are num_samples (each repeat gets its own seed), not a space key")
        elif section == "data" and path != "data.seed":
            problems.append(f"space.{key}: a sweep runs on one dataset; set data keys in base (only data.seed "
                            "may be swept)")
        elif not axis.finite and section not in ("distill", "evaluate", "seed"):
            problems.append(f"space.{key}: {axis.kind} is a distribution, but {path} selects an expert set, "
                            "so it must be a finite list of values (grid or choice)")
        elif not axis.finite and key in sweep.asha.group_by:
            problems.append(f"space.{key}: {axis.kind} is a distribution, but asha.group_by names it, so it "
                            "must be a finite list of values (grid or choice)")
    for key in sweep.asha.group_by:
        if key not in sweep.space and key != "ipc":  # the default groups by IPC only where IPC is swept
            problems.append(f"asha.group_by: {key!r} is not a key of space; allowed: {', '.join(sweep.space)}")
    return problems + _search_problems(sweep)


def _search_problems(sweep: SweepConfig) -> list[str]:
    kind = sweep.search.kind
    problems = []
    if sweep.search.max_concurrent is not None and kind != "optuna":
        problems.append(f"search.max_concurrent: only search.kind optuna takes it; {kind} runs "
                        "max_concurrent_trials at once")
    if sweep.asha.repeatable and kind == "optuna":
        problems.append("asha.repeatable: search.kind optuna suggests trials from the scores that have arrived, "
                        "so its trials differ between runs whatever the rungs do; use grid or random, or drop it")
    if kind != "grid":
        # A list means a grid everywhere; sampling it would silently change what the file says.
        problems += [f"space.{key}: a list is a grid, which search.kind {kind} cannot sample; write "
                     f"{{choice: {list(axis.values)}}} or use search.kind grid"
                     for key, axis in sweep.space.items() if axis.kind == "grid"]
    return problems


def _trial_problems(sweep: SweepConfig, source: str) -> list[str]:
    """Each distinct problem of the trial configs once, naming the first trial that has it: a bad
    base would otherwise repeat in every trial."""
    problems: list[str] = []
    seen: set[str] = set()
    too_short: set[int] = set()
    for params in finite_grid(sweep, 0) + finite_grid(sweep, 1):
        cfg, lines = check_config(trial_raw(sweep, params), "sweep")
        for line in (line.removeprefix("sweep: ") for line in lines):
            if line not in seen:
                seen.add(line)
                problems.append(f"{source}: trial {params}: {line}")
        if cfg is None:
            continue
        evaluations = sweep.asha.max_t or cfg.distill.evaluations
        if sweep.asha.grace_period > evaluations and evaluations not in too_short:
            too_short.add(evaluations)
            problems.append(f"{source}: asha.grace_period: {sweep.asha.grace_period} is more than the "
                            f"{evaluations} evaluations of trial {params} (asha.max_t or distill.iterations / "
                            "distill.eval_every)")
    return problems


def evaluations_by_group(sweep: SweepConfig) -> dict[tuple, int]:
    """ASHA's max_t of each group: asha.max_t, or the most evaluations a trial of the group makes."""
    from pad_ray.scheduling import group_key

    most: dict[tuple, int] = {}
    for params in finite_grid(sweep, 0) + finite_grid(sweep, 1):
        key = group_key(params, sweep.group_by)
        most[key] = max(most.get(key, 0), sweep.asha.max_t or trial_config(sweep, params).distill.evaluations)
    return most


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a sweep file, including every trial config its finite grid produces; raise
    the first problem (`ConfigError.errors` holds them all)."""
    sweep, problems = check_sweep(read_with_overrides(path, overrides), str(path))
    if sweep is None:
        raise ConfigError(problems[0], problems)
    return sweep


def add_sweep_flags(parser: argparse.ArgumentParser) -> None:
    """--dry-run and --fresh / --resume, for `pad-ray sweep` and `python -m pad_ray.sweep` alike."""
    parser.add_argument("--dry-run", action="store_true",
                        help="print the trials, the expert sets (cached / to train, and their cost), the object-store "
                             "bytes and each trial's memory on both gradient paths; train, start and write nothing")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fresh", dest="rerun", action="store_const", const="fresh",
                       help="start a new sweep: an earlier sweep of this name is moved aside to "
                            "<storage_path>/<name>.replaced-<time> (nothing is deleted)")
    group.add_argument("--resume", dest="rerun", action="store_const", const="resume",
                       help="continue the earlier sweep of this name as it was started, although the file "
                            "changed since (the changes are ignored)")
