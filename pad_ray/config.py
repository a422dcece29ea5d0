"""One typed, validated configuration for every stage, with presets per (dataset, IPC).

A run config is YAML: an optional `preset:` name, then any sections to override. The preset (a file
in pad_ray/presets/) is deep-merged under the file and the result is validated by the pydantic models
below. Every problem is one line naming the file and the key: `check_config` returns them all, and
`build_config` raises the first as a `ConfigError`. The sweep schema lives in `sweep_config`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config or input: printed as one line by the CLI, exit code 2. The message is the first
    problem found; `errors` lists every one (one line each) for `pad-ray validate`."""

    def __init__(self, message: str, errors: Sequence[str] = ()):
        super().__init__(message)
        self.errors = list(errors) or [message]


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
    # The split (train and test subsets, validation split) and the EL2N runs that order it: what the
    # store holds depends on it, so it is kept apart from the run's `seed`.
    seed: int = 0


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
    seed: int = 0  # initial weights and minibatches of every expert; part of the expert set's identity
    # torch.compile each expert's network (full batches; an epoch's last, smaller batch runs eagerly). On
    # the CPU a width-32 ConvNet on batches of 1,024 trains 1.5x faster after a one-off compile of about 25 s
    # per process (BENCHMARKS.md, section 2). How the experts run, not what they are: not part of the key.
    compile: bool = False


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
    # Initial syn_lr. A run config without it takes experts.lr: the released code trains the experts and
    # starts syn_lr from one lr_teacher, so that N synthetic steps begin at the experts' step size.
    lr_teacher: float = Field(0.01, gt=0)
    momentum_img: float = Field(0.5, ge=0, lt=1)
    momentum_lr: float = Field(0.5, ge=0, lt=1)
    momentum_y: float = Field(0.9, ge=0, lt=1)
    threshold: float = Field(1.0, gt=0)
    # Clip each outer gradient (images, labels, syn_lr) to this many times the running average of its own
    # norm (pad_ray/clipping.py): the rare exploding step of unrolled matching. None: the released code.
    clip_ratio: float | None = Field(None, gt=1)
    iterations: int = Field(10000, ge=0)
    eval_every: int = Field(500, ge=1)
    eval_nets: int = Field(1, ge=1)  # nets per evaluation during distillation (DATM uses 1)
    # Also evaluate the starting set (iteration 0), so that the best set on validation can be the start: the
    # released code's skip_first_eva False, its default, which six of its twelve configs keep.
    eval_start: bool = True
    pix_init: Literal["correct", "real", "noise"] = "correct"
    # pad_ray.matching.GRADIENT_PATHS; auto keeps as many trailing steps' graphs as memory_budget_gb holds.
    # The default: on every benchmarked row no slower than the better of the other two (BENCHMARKS.md, section 1).
    gradient: Literal["unrolled", "constant_memory", "auto"] = "auto"
    # For auto's kept graphs. None: what is free, less a margin (a sweep trial: its share of the node or GPU).
    memory_budget_gb: float | None = Field(None, gt=0)
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
    def last_sampled_epoch(self) -> int:
        """The latest expert epoch a run reads: its last possible start plus M (the object store holds up to it)."""
        return self.max_start_epoch + self.expert_epochs

    @property
    def expansion_end_iteration(self) -> int:
        """DATM's expansion_end_epoch, in outer iterations (docs/decisions.md, Presets)."""
        return self.interval * (self.max_start_epoch - self.current_max_start_epoch)


class EvalConfig(Section):
    num_nets: int = Field(5, ge=1)
    epochs: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    # The first listed is a sweep trial's headline final_test_accuracy; every one is reported.
    models: tuple[Literal[
        "convnet", "convnet_bn", "resnet18", "resnet18_bn", "vgg11", "alexnet", "lenet", "mlp"
    ], ...] = Field(("convnet",), min_length=1)
    dsa: bool = True


# DSA's augmentation families (pad_ray.augment draws them); here so that validating a config needs no torch.
DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_DSA_STRATEGY = "_".join(DSA_FAMILIES)  # the reference's: every family


def check_dsa_strategy(strategy: str) -> str:
    unknown = [f for f in strategy.split("_") if f not in DSA_FAMILIES]
    if unknown:
        raise ValueError(f"unknown family {unknown[0]!r}: families joined by '_', from {', '.join(DSA_FAMILIES)}")
    return strategy


class AugmentConfig(Section):
    """DSA's families for every stage whose `dsa` is on: experts, distillation and evaluation. All six by
    default, as the reference; digit presets drop flip, since a mirrored digit is not a digit (DC's MNIST
    recipe has no flip either)."""

    strategy: str = DEFAULT_DSA_STRATEGY

    @field_validator("strategy")
    @classmethod
    def _known_families(cls, strategy: str) -> str:
        return check_dsa_strategy(strategy)


class ResourcesConfig(Section):
    """How the Ray stages use a cluster. `workers: 0` runs experts and EL2N seeds in this process."""

    workers: int = Field(2, ge=0)  # Ray Train workers for experts, parallel EL2N seeds
    cpus_per_worker: int = Field(1, ge=1)  # also the torch threads of each worker
    use_gpu: Literal["auto"] | bool = "auto"  # one GPU per worker; auto = when the cluster has GPUs
    max_failures: int = Field(3, ge=0)  # worker-group restarts before expert generation fails


class RunConfig(Section):
    preset: str | None = None
    # Distillation and evaluation only: runs that differ in `seed` share their split and experts
    # (data.seed, experts.seed).
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
    augment: AugmentConfig = AugmentConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="before")
    @classmethod
    def _teacher_lr_from_experts(cls, raw: Any) -> Any:
        distill, experts = (raw.get("distill"), raw.get("experts")) if isinstance(raw, dict) else (None, None)
        if not isinstance(distill, dict) or "lr_teacher" in distill:
            return raw
        lr = experts.get("lr") if isinstance(experts, dict) else getattr(experts, "lr", None)
        return raw if lr is None else {**raw, "distill": {**distill, "lr_teacher": lr}}

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


def _suggestion(model: type[BaseModel], loc: list[str]) -> str | None:
    """The allowed key closest to a misspelt one, if any is close."""
    hint = difflib.get_close_matches(loc[-1], _fields_at(model, loc[:-1]), n=1, cutoff=0.5)
    return hint[0] if hint else None


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    """One line for one pydantic error: the dotted key, what is wrong, a suggestion if misspelt."""
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        hint = _suggestion(model, loc)
        allowed = ", ".join(sorted(_fields_at(model, loc[:-1])))
        return f"{key}: unknown key; " + (f"did you mean '{hint}'?" if hint else f"allowed: {allowed}")
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
        if part.isdigit() or part not in model.model_fields:
            continue  # a list index or a key of a plain dict: the model stays the same
        annotation = model.model_fields[part].annotation
        inner = getattr(annotation, "__args__", (annotation,))
        model = next(a for a in inner if isinstance(a, type) and issubclass(a, BaseModel))
    return list(model.model_fields)


def describe_errors(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """Every pydantic error as one line, unknown keys first (the likeliest cause of the rest)."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    # A misspelt required key also shows up as its correct twin "missing": report the misspelling only.
    twins = set()
    for error in errors:
        if error["type"] == "extra_forbidden":
            loc = [str(p) for p in error["loc"]]
            hint = _suggestion(model, loc)
            if hint:
                twins.add((*loc[:-1], hint))
    lines: list[str] = []
    for error in errors:
        if error["type"] == "missing" and tuple(str(p) for p in error["loc"]) in twins:
            continue
        line = _describe(error, model)
        if line not in lines:
            lines.append(line)
    return lines


def _unknown_preset(preset: Any) -> str:
    hint = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
    extra = f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(PRESETS)}"
    return f"preset: unknown preset {preset!r}{extra}"


def check_config(raw: Any, source: str = "config") -> tuple[RunConfig | None, list[str]]:
    """Apply the preset named in `raw` (if any) under `raw` and validate: the config, or every problem
    found as one line `source: key: message`."""
    if not isinstance(raw, dict):
        return None, [f"{source}: expected a mapping of sections at the top level"]
    preset = raw.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            # Without its preset the rest would only report the sections the preset would have given.
            return None, [f"{source}: {_unknown_preset(preset)}"]
        raw = deep_merge(PRESETS[preset], raw)
    try:
        return RunConfig.model_validate(raw), []
    except ValidationError as exc:
        return None, [f"{source}: {line}" for line in describe_errors(exc, RunConfig)]


def build_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Apply the preset named in `raw` (if any) under `raw`, then validate; raise the first problem
    (`ConfigError.errors` holds them all)."""
    cfg, problems = check_config(raw, source)
    if cfg is None:
        raise ConfigError(problems[0], problems)
    return cfg


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
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file (byte 0x{raw[exc.start]:02x} at offset {exc.start} "
                          "is not UTF-8)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a control character such as NUL: binary, not YAML
        raise ConfigError(f"{path}: not a YAML text file (character #x{exc.character:04x} at offset "
                          f"{exc.position})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    return {} if data is None else expand_env(data)


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


def read_with_overrides(path: str | Path, overrides: dict[str, Any] | None = None) -> Any:
    """A YAML file with `--set` overrides merged in (a file that is no mapping is left for the schema
    to reject, naming the file)."""
    raw = read_yaml(path)
    return deep_merge(raw, overrides) if overrides and isinstance(raw, dict) else raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    return build_config(read_with_overrides(path, overrides), str(path))


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
