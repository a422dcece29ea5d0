"""One typed, validated configuration for every stage, with presets per (dataset, IPC).

A run config is YAML: an optional `preset:` name, then any sections to override. The preset is
deep-merged under the file and the result is validated by the pydantic models below; every
failure becomes a one-line `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad config or input: printed as one line by the CLI, exit code 2."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    # pad_ray.data.DATASETS, spelled out so that config.py does not import torch (a test keeps them equal).
    dataset: Literal["mnist", "fashionmnist", "kmnist", "svhn", "cifar10", "cifar100", "tinyimagenet"]
    root: str = "../shared/data"
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    zca: bool = True
    # Small CPU runs take a per-class subset of train and a random subset of test.
    train_per_class: int | None = Field(None, ge=2)
    test_size: int | None = Field(None, ge=1)


class ModelConfig(Section):
    name: Literal["convnet"] = "convnet"
    width: int = Field(128, ge=1)
    depth: int = Field(3, ge=1, le=6)
    norm: Literal["instancenorm", "batchnorm", "none"] = "instancenorm"


class DifficultyConfig(Section):
    """EL2N: K short runs of the agent model, scores averaged; or an external index file."""

    seeds: int = Field(5, ge=1)
    epochs: int = Field(10, ge=1)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(256, ge=1)
    index_file: str | None = None


class RemovalStep(Section):
    after_epoch: int = Field(ge=0)
    easiest_fraction: float = Field(ge=0.0, lt=1.0)


class ScheduleConfig(Section):
    init_ratio: float = Field(0.75, gt=0.0, le=1.0)  # IR
    add_end_epoch: int = Field(20, ge=0)  # AEE
    remove: tuple[RemovalStep, ...] = (
        RemovalStep(after_epoch=40, easiest_fraction=0.1),
        RemovalStep(after_epoch=60, easiest_fraction=0.2),
    )

    @model_validator(mode="after")
    def _ordered(self) -> ScheduleConfig:
        epochs = [r.after_epoch for r in self.remove]
        if epochs != sorted(set(epochs)):
            raise ValueError("remove: after_epoch values must be strictly increasing")
        fractions = [r.easiest_fraction for r in self.remove]
        if fractions != sorted(fractions):
            raise ValueError("remove: easiest_fraction must not decrease")
        return self


class ExpertConfig(Section):
    num_experts: int = Field(100, ge=1)
    epochs: int = Field(100, ge=1)
    optimizer: Literal["sgd", "gsam"] = "gsam"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1)
    rho: float = Field(0.01, ge=0)
    gsam_alpha: float = Field(0.3, ge=0)
    adaptive: bool = True
    dsa: bool = True


class DistillConfig(Section):
    ipc: int = Field(ge=1)
    alpha: float = Field(ge=0.0, lt=1.0)
    selection: Literal["depth", "loss", "none"] = "depth"
    syn_steps: int = Field(ge=1)  # N
    expert_epochs: int = Field(ge=1)  # M
    min_start_epoch: int = Field(ge=0)  # T-
    current_max_start_epoch: int = Field(ge=1)  # T
    max_start_epoch: int = Field(ge=1)  # T+
    interval: int = Field(100, ge=1)  # outer iterations per +1 of the start-epoch upper bound
    batch_syn: int = Field(ge=1)
    lr_img: float = Field(gt=0)
    lr_lr: float = Field(gt=0)
    lr_y: float = Field(gt=0)
    lr_teacher: float = Field(0.01, gt=0)  # initial syn_lr
    momentum_img: float = Field(0.5, ge=0, lt=1)
    momentum_lr: float = Field(0.5, ge=0, lt=1)
    momentum_y: float = Field(0.9, ge=0, lt=1)
    threshold: float = Field(1.0, gt=0)
    iterations: int = Field(10000, ge=0)
    eval_every: int = Field(500, ge=1)
    eval_nets: int = Field(1, ge=1)  # nets per evaluation during distillation (DATM uses 1)
    pix_init: Literal["correct", "real", "noise"] = "correct"
    gradient: Literal["unrolled", "constant_memory"] = "unrolled"
    dsa: bool = True

    @model_validator(mode="after")
    def _window(self) -> DistillConfig:
        if not self.min_start_epoch < self.current_max_start_epoch <= self.max_start_epoch:
            raise ValueError(
                "need min_start_epoch < current_max_start_epoch <= max_start_epoch, got "
                f"{self.min_start_epoch}, {self.current_max_start_epoch}, {self.max_start_epoch}"
            )
        return self

    @property
    def evaluations(self) -> int:
        """How many times a run evaluates (and a sweep trial reports): every eval_every, and at the end."""
        return -(-self.iterations // self.eval_every)

    @property
    def expansion_end_iteration(self) -> int:
        """DATM's expansion_end_epoch, in outer iterations (Part A §2)."""
        return self.interval * (self.max_start_epoch - self.current_max_start_epoch)


class EvalConfig(Section):
    num_nets: int = Field(5, ge=1)
    epochs: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    models: tuple[Literal[
        "convnet", "convnet_bn", "resnet18", "resnet18_bn", "vgg11", "alexnet", "lenet", "mlp"
    ], ...] = ("convnet",)
    dsa: bool = True


class ResourcesConfig(Section):
    """How the Ray stages use a cluster. `workers: 0` runs experts and EL2N seeds in this process."""

    workers: int = Field(2, ge=0)  # Ray Train workers for experts, parallel EL2N seeds
    cpus_per_worker: int = Field(1, ge=1)  # also the torch threads of each worker
    use_gpu: Literal["auto"] | bool = "auto"  # one GPU per worker; auto = when the cluster has GPUs
    max_failures: int = Field(3, ge=0)  # worker-group restarts before expert generation fails


class RunConfig(Section):
    preset: str | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs"
    store_dir: str = "runs/store"  # content-addressed difficulty orders and expert trajectories
    data: DataConfig
    model: ModelConfig = ModelConfig()
    difficulty: DifficultyConfig = DifficultyConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    experts: ExpertConfig = ExpertConfig()
    distill: DistillConfig
    evaluate: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _fits_experts(self) -> RunConfig:
        epochs = self.experts.epochs
        if self.schedule.add_end_epoch > epochs:
            raise ValueError(
                f"schedule.add_end_epoch: {self.schedule.add_end_epoch} is beyond experts.epochs ({epochs})"
            )
        late = [r.after_epoch for r in self.schedule.remove if r.after_epoch >= epochs]
        if late:
            raise ValueError(
                f"schedule.remove: after_epoch {late[0]} never happens with experts.epochs={epochs}"
            )
        need = self.distill.max_start_epoch + self.distill.expert_epochs
        if need > epochs:
            raise ValueError(
                f"distill.max_start_epoch + distill.expert_epochs = {need} exceeds experts.epochs ({epochs})"
            )
        return self


# --------------------------------------------------------------------------------------------
# Presets: one YAML file per name in pad_ray/presets/, so a user can open, copy and diff them.
# --------------------------------------------------------------------------------------------

PRESET_DIR = Path(__file__).with_name("presets")


@functools.cache
def _preset_files() -> dict[str, Path]:
    # Numbers compared as numbers, so that a listing reads cifar10-ipc1, -ipc10, -ipc50, ..., -ipc1000.
    def natural(path: Path) -> list[Any]:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]
    return {path.stem: path for path in sorted(PRESET_DIR.glob("*.yaml"), key=natural)}


@functools.cache
def _preset_text(name: str) -> str:
    return _preset_files()[name].read_text()


@functools.cache
def _parsed_preset(name: str) -> dict[str, Any]:
    data = yaml.safe_load(_preset_text(name))
    if not isinstance(data, dict):
        raise ConfigError(f"{_preset_files()[name]}: expected a mapping of sections at the top level")
    return data


def preset_header(name: str) -> str:
    """The first comment line of a preset file: what the preset is."""
    lines = _preset_text(name).splitlines()
    return lines[0].removeprefix("#").strip() if lines and lines[0].startswith("#") else ""


class _Presets(Mapping[str, dict[str, Any]]):
    """Preset name -> its raw sections, read from the package's files on first use. Each lookup
    returns a fresh copy, so a caller that edits one cannot change the next run's preset."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in _preset_files():
            raise KeyError(name)
        return copy.deepcopy(_parsed_preset(name))

    def __iter__(self) -> Iterator[str]:
        return iter(_preset_files())

    def __len__(self) -> int:
        return len(_preset_files())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _preset_files()


PRESETS: Mapping[str, dict[str, Any]] = _Presets()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    """One line for the first pydantic error: the dotted key, what is wrong, a suggestion if misspelt."""
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.5)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(sorted(allowed))}"
        return f"{key}: unknown key{suggestion}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("value_error", "assertion_error") and not loc:
        return msg
    given = error.get("input")
    shown = f" (got {given!r})" if not isinstance(given, (dict, list)) else ""
    return f"{key}: {msg}{shown}"


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        if part.isdigit():
            continue
        annotation = model.model_fields[part].annotation
        inner = getattr(annotation, "__args__", (annotation,))
        model = next(a for a in inner if isinstance(a, type) and issubclass(a, BaseModel))
    return list(model.model_fields)


def build_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Apply the preset named in `raw` (if any) under `raw`, then validate."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    preset = raw.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            hint = difflib.get_close_matches(str(preset), PRESETS, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(PRESETS)}"
            raise ConfigError(f"{source}: preset: unknown preset {preset!r}{extra}")
        raw = deep_merge(PRESETS[preset], raw)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        # A misspelt key also shows up as its correct twin "missing": report the misspelling.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise ConfigError(f"{source}: {_describe(errors[0], RunConfig)}") from None


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(value: Any) -> Any:
    """`${VAR}` and `${VAR:-default}` in string values, from the environment: the same file serves a
    laptop and a cluster job whose working directory is a copy."""
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) if m.group(2) is not None else m.group(0)),
                        value)
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    return {} if data is None else expand_env(data)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    raw = read_yaml(path)
    if overrides:
        raw = deep_merge(raw, overrides) if isinstance(raw, dict) else raw
    return build_config(raw, str(path))


# --------------------------------------------------------------------------------------------
# Sweeps: a base run config, a search space, and how Tune and MLflow run it
# --------------------------------------------------------------------------------------------

# The four PAD knobs by their short names; any other dotted config key may be swept too.
SPACE_ALIASES = {"ipc": "distill.ipc", "alpha": "distill.alpha", "ir": "schedule.init_ratio",
                 "aee": "schedule.add_end_epoch"}
FINITE_KINDS = ("grid", "choice")
SAMPLED_KINDS = ("uniform", "loguniform", "quniform", "randint")


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


class TrialResources(Section):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    experiment: str | None = None  # default: the sweep's name


class SweepConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: dict[str, Any]
    space: dict[str, Axis]
    asha: AshaConfig = AshaConfig()
    trial_resources: TrialResources = TrialResources()
    max_concurrent_trials: int = Field(0, ge=0)  # 0: as many as the cluster fits
    num_samples: int = Field(1, ge=1)
    max_failures: int = Field(1, ge=0)  # retries of a crashed trial, from its last checkpoint
    storage_path: str = "runs/sweeps"
    mlflow: MlflowConfig = MlflowConfig()

    def path_of(self, key: str) -> str:
        return SPACE_ALIASES.get(key, key)


def _parse_axis(key: str, spec: Any) -> dict[str, Any]:
    if isinstance(spec, list):
        return {"kind": "grid", "values": spec}
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, values), = spec.items()
        return {"kind": kind, "values": values if isinstance(values, list) else [values]}
    raise ConfigError(f"space.{key}: expected a list of values or one of "
                      f"{{{', '.join(FINITE_KINDS + SAMPLED_KINDS)}: [...]}}")


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def trial_raw(sweep: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The raw run config of one trial: the base, with IPC choosing its paper preset where the base
    uses one (`cifar10-ipc10` -> `cifar10-ipc50`), then the sampled values."""
    raw = copy.deepcopy(sweep.base)
    preset = raw.get("preset") or ""
    if "ipc" in params and preset in PRESETS and "-ipc" in preset:
        candidate = f"{preset.rsplit('-ipc', 1)[0]}-ipc{params['ipc']}"
        if candidate in PRESETS:
            raw["preset"] = candidate
    for key, value in params.items():
        _set_dotted(raw, sweep.path_of(key), value)
    return raw


def trial_config(sweep: SweepConfig, params: dict[str, Any], source: str = "sweep") -> RunConfig:
    return build_config(trial_raw(sweep, params), source)


def finite_grid(sweep: SweepConfig, bound: int = 0) -> list[dict[str, Any]]:
    """Every combination of the finite axes, distributions set to their lower (bound=0) or upper bound."""
    combos: list[dict[str, Any]] = [{}]
    for key, axis in sweep.space.items():
        values = axis.values if axis.finite else axis.values[bound:bound + 1]
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a sweep file, including every trial config its finite grid produces."""
    source = str(path)
    raw = read_yaml(path)
    if overrides:
        raw = deep_merge(raw, overrides)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    space = raw.get("space")
    if isinstance(space, dict):
        raw = {**raw, "space": {k: _parse_axis_in(source, k, v) for k, v in space.items()}}
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise ConfigError(f"{source}: {_describe(errors[0], SweepConfig)}") from None
    _check_space(sweep, source)
    for params in finite_grid(sweep, 0) + finite_grid(sweep, 1):
        try:
            cfg = trial_config(sweep, params)
        except ConfigError as exc:
            raise ConfigError(f"{source}: trial {params}: {str(exc).removeprefix('sweep: ')}") from None
        evaluations = sweep.asha.max_t or cfg.distill.evaluations
        if sweep.asha.grace_period > evaluations:
            raise ConfigError(f"{source}: asha.grace_period: {sweep.asha.grace_period} is more than the "
                              f"{evaluations} evaluations of trial {params} (asha.max_t or distill.iterations / "
                              "distill.eval_every)")
    return sweep


def _parse_axis_in(source: str, key: str, spec: Any) -> dict[str, Any]:
    try:
        return _parse_axis(key, spec)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _check_space(sweep: SweepConfig, source: str) -> None:
    if not sweep.space:
        raise ConfigError(f"{source}: space: give at least one key to sweep (ipc, alpha, ir, aee, ...)")
    for key, axis in sweep.space.items():
        path = sweep.path_of(key)
        section = path.split(".")[0]
        if section == "data":
            raise ConfigError(f"{source}: space.{key}: a sweep runs on one dataset; set data keys in base")
        if not axis.finite and section not in ("distill", "evaluate"):
            raise ConfigError(f"{source}: space.{key}: {axis.kind} is a distribution, but {path} selects an "
                              "expert set, so it must be a finite list of values (grid or choice)")


def absolute(location: str) -> str:
    """A local path made absolute against this process's directory; URIs (s3://, gs://) as they are."""
    return location if "://" in location else str(Path(location).resolve())


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Resolve relative paths here: Ray workers and trials run in other directories."""
    data = cfg.data.model_copy(update={"root": absolute(cfg.data.root)})
    index_file = cfg.difficulty.index_file and absolute(cfg.difficulty.index_file)
    return cfg.model_copy(update={
        "data": data, "difficulty": cfg.difficulty.model_copy(update={"index_file": index_file}),
        "output_dir": absolute(cfg.output_dir), "store_dir": absolute(cfg.store_dir),
    })


def to_dict(config: BaseModel) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config (tuples become lists)."""
    return config.model_dump(mode="json")
