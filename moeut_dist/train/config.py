"""The training run's configuration: a tree of dataclasses from YAML plus `key=value` overrides.

Defaults are the paper's recipe (AdamW 2.5e-4, weight decay 0.01, clipping 0.25, cosine schedule
with 4000 warm-up steps down to 0.1×, 100k steps, batch 64). Everything that can be checked
without starting processes is checked by `load_config` and `check_run`: unknown keys are
rejected by name, values by type and range, the layout against the model and the world size, the
shards against the tokenizer and sequence length; an `init_from` model directory is checked
against the model (`check_init_from`) as soon as the run knows it does not resume a checkpoint,
before the model is built. A run fails there, not an hour in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import torch
import yaml
from safetensors import SafetensorError, safe_open

from moeut_dist import profiles
from moeut_dist.config import ConfigError, MoEUTConfig
from moeut_dist.data import ManifestMismatchError, Tokenizer, read_manifest
from moeut_dist.export import CONFIG_FILE, WEIGHTS_FILE, read_config
from moeut_dist.parallel.engine import OptimizerSettings
from moeut_dist.parallel.layout import ParallelConfig


def _coerce(expected: Any, value: Any, where: str) -> Any:
    """`value` as the annotated type `expected`, or a ConfigError naming `where`.

    YAML reads `2.5e-4` as a string (YAML 1.1 floats need a dot), so numeric strings are
    accepted for float fields; nothing else is converted.
    """
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _coerce(inner, value, where)
    if origin is Literal:
        if value not in typing.get_args(expected):
            raise ConfigError(f"{where} must be one of {list(typing.get_args(expected))}")
        return value
    if origin is tuple:
        items = typing.get_args(expected)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise ConfigError(f"{where} must be a list of {len(items)} values, got {value!r}")
        pairs = enumerate(zip(items, value, strict=True))
        return tuple(_coerce(t, v, f"{where}[{i}]") for i, (t, v) in pairs)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if expected is float and not isinstance(value, bool):
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if expected in (int, bool, str) and type(value) is expected:
        return value
    raise ConfigError(f"{where} must be {getattr(expected, '__name__', expected)}, got {value!r}")


def _from_dict(cls: type, values: Any, where: str) -> Any:
    """An instance of the dataclass `cls` from a mapping, nested sections included."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{where}{k}' for k in unknown]}; "
            f"{where or 'top-level '}keys are {sorted(known)}"
        )
    converted = {}
    for name, value in values.items():
        expected = hints[name]
        if expected is ModelSection:
            converted[name] = ModelSection.from_dict(value, f"{where}{name}.")
        elif dataclasses.is_dataclass(expected):
            converted[name] = _from_dict(expected, value, f"{where}{name}.")
        else:
            converted[name] = _coerce(expected, value, f"{where}{name}")
    return cls(**converted)


class _Section:
    @classmethod
    def from_dict(cls, values: Any, where: str = "") -> Self:
        return _from_dict(cls, values, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelSection:
    """A profile name plus any `MoEUTConfig` fields that replace the profile's.

    In YAML the fields sit next to `profile` (`model: {profile: moeut-44m, kernel: torch}`).
    `vocab_size` defaults to the tokenizer's.
    """

    profile: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: Any, where: str = "model.") -> ModelSection:
        if not isinstance(values, dict):
            raise ConfigError(f"model must be a mapping, got {values!r}")
        overrides = {k: v for k, v in values.items() if k != "profile"}
        hints = typing.get_type_hints(MoEUTConfig)
        unknown = sorted(set(overrides) - set(hints))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {[where + k for k in unknown]}; model keys are 'profile' and "
                f"the MoEUTConfig fields {sorted(hints)}"
            )
        overrides = {k: _coerce(hints[k], v, where + k) for k, v in overrides.items()}
        profile = _coerce(str, values.get("profile", cls.profile), where + "profile")
        return cls(profile, overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, **self.overrides}

    def build(self, tokenizer_vocab_size: int) -> MoEUTConfig:
        values = {"vocab_size": tokenizer_vocab_size, **self.overrides}
        if values["vocab_size"] < tokenizer_vocab_size:
            raise ConfigError(
                f"model.vocab_size {values['vocab_size']} is smaller than the tokenizer's "
                f"{tokenizer_vocab_size} pieces"
            )
        return profiles.get(self.profile, **values)


@dataclass(frozen=True)
class DataSection(_Section):
    shard_dir: str = ""  # written by `moeut prep shards`
    tokenizer: str = ""  # the SentencePiece model the shards were built with
    seq_len: int = 1024
    global_batch_size: int = 64  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 16  # sequences per forward on one rank; the rest is accumulation
    num_workers: int = 1  # dataloader worker processes per rank
    skip_corrupt_shards: bool = False


@dataclass(frozen=True)
class OptimSection(_Section, OptimizerSettings):
    def __post_init__(self) -> None:
        beta1, beta2 = self.betas
        requirements = [
            ("lr", math.isfinite(self.lr) and self.lr >= 0, "a finite number ≥ 0"),
            ("betas", 0 <= beta1 < 1 and 0 <= beta2 < 1, "two numbers in [0, 1)"),
            ("eps", math.isfinite(self.eps) and self.eps > 0, "a finite number > 0"),
            (
                "weight_decay",
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                "a finite number ≥ 0",
            ),
            (
                "grad_clip",
                math.isfinite(self.grad_clip) and self.grad_clip >= 0,
                "a finite number ≥ 0 (0: no clipping)",
            ),
        ]
        for name, met, requirement in requirements:
            if not met:
                raise ConfigError(f"optim.{name} must be {requirement}, got {getattr(self, name)}")


@dataclass(frozen=True)
class ScheduleSection(_Section):
    steps: int = 100_000  # optimizer steps of the whole run (the cosine's length)
    warmup_steps: int = 4000
    min_lr_ratio: float = 0.1  # the cosine ends at min_lr_ratio × lr


@dataclass(frozen=True)
class CheckpointSection(_Section):
    every: int = 1000  # steps; the last step is always saved
    keep: int = 3  # complete checkpoints kept, newest first
    resume: str = "auto"  # "auto": the latest complete one if any; "never"; or a step directory


@dataclass(frozen=True)
class EvalSection(_Section):
    every: int = 1000  # steps between validation passes; 0 disables them
    batches: int = 50  # micro-batches per rank per pass (fewer if the split is smaller)


@dataclass(frozen=True)
class LoggingSection(_Section):
    every: int = 10  # steps per metrics record
    tensorboard: bool = True
    progress_bar: bool = True  # on rank 0
    expert_usage: bool = True  # per-layer selection entropy and share of tokens per expert
    # Dense bf16 peak of one accelerator (H100/H200 SXM: 989e12) for MFU; None: MFU not logged.
    peak_flops_per_device: float | None = None


@dataclass(frozen=True)
class TrainConfig(_Section):
    out_dir: str = "runs/default"  # checkpoints/, metrics.jsonl, tensorboard/, config.yaml
    seed: int = 0  # model initialisation, data order, and every RNG
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    # Weights and activations: "bf16" (fp32 master weights and optimizer state in ZeRO's
    # partitions), "fp32", or "auto" (bf16 on CUDA, fp32 elsewhere).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Non-finite losses tolerated in a row (each skips its step) before the run stops.
    max_consecutive_nonfinite: int = 3
    # End this session with a checkpoint after this many steps (time-limited allocations); a
    # later run with `checkpoint.resume: auto` continues where it stopped.
    stop_after_steps: int | None = None
    # A model directory (`save_pretrained`, `export_shards`) whose weights start the run, from
    # any layout it was trained in; its config.json must describe `model`. Only the weights
    # carry over: optimizer state, step count and schedule start afresh. A checkpoint to resume
    # wins over it (that run was started from `init_from` already).
    init_from: str | None = None

    def __post_init__(self) -> None:
        positive = {
            "data.seq_len": self.data.seq_len,
            "data.global_batch_size": self.data.global_batch_size,
            "data.micro_batch_size": self.data.micro_batch_size,
            "schedule.steps": self.schedule.steps,
            "checkpoint.every": self.checkpoint.every,
            "checkpoint.keep": self.checkpoint.keep,
            "eval.batches": self.eval.batches,
            "logging.every": self.logging.every,
            "max_consecutive_nonfinite": self.max_consecutive_nonfinite,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in 0..2**32 - 1, got {self.seed}")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError(f"stop_after_steps must be positive, got {self.stop_after_steps}")
        if not 0 <= self.schedule.warmup_steps <= self.schedule.steps:
            raise ConfigError("schedule.warmup_steps must be in 0..schedule.steps")
        if not 0.0 <= self.schedule.min_lr_ratio <= 1.0:
            raise ConfigError("schedule.min_lr_ratio must be in [0, 1]")
        if self.eval.every < 0 or self.data.num_workers < 0:
            raise ConfigError("eval.every and data.num_workers must not be negative")
        if not self.data.shard_dir or not self.data.tokenizer:
            raise ConfigError("data.shard_dir and data.tokenizer are required")

    @property
    def bf16(self) -> bool:
        """Whether the run trains in bf16 (`precision`, with "auto" resolved on this machine)."""
        if self.precision == "auto":
            return torch.cuda.is_available()
        return self.precision == "bf16"

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["model"] = self.model.to_dict()
        values["optim"]["betas"] = list(self.optim.betas)
        return values

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)


def _annotation(path: list[str]) -> Any:
    """The annotated type of the config field a dotted path names; None if there is none."""
    section: Any = TrainConfig
    for part in path:
        if section is ModelSection:
            hints = {"profile": str, **typing.get_type_hints(MoEUTConfig)}
        elif dataclasses.is_dataclass(section):
            hints = typing.get_type_hints(section)
        else:
            return None
        section = hints.get(part)
    return section


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], value). A text field (a path, a name) takes the text as
    it is, so `out_dir=runs/exp #2` keeps its `#`; `null` or `~` clear an optional one. Other
    values are parsed as JSON, else as YAML, else kept as text."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    path = key.split(".")
    annotation = _annotation(path)
    if annotation is str:
        return path, raw
    if annotation == str | None:
        return path, None if raw in ("null", "~") else raw
    try:
        return path, json.loads(raw)
    except json.JSONDecodeError:
        try:
            return path, yaml.safe_load(raw)
        except yaml.YAMLError:
            return path, raw


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `values` with every `key=value` override applied (sections created as needed)."""
    # A deep copy; YAML's dates and times become their text (`out_dir: 2024-05-01` is a name).
    values = json.loads(json.dumps(values, default=str))
    for text in overrides:
        path, value = parse_override(text)
        section = values
        for part in path[:-1]:
            section = section.setdefault(part, {})
            if not isinstance(section, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        section[path[-1]] = value
    return values


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The config of `path` (YAML; None: the defaults) with `key=value` overrides applied."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    return TrainConfig.from_dict(apply_overrides(values, list(overrides)))


@dataclass(frozen=True)
class RunPlan:
    """What a validated config means on this world: the model and the batch arithmetic."""

    model: MoEUTConfig
    data_parallel: int
    grad_accumulation: int


# How the model is computed or trained, not what it is: a model directory trained with other
# values of these starts a run all the same.
_TRAINING_ONLY_FIELDS = frozenset(
    {
        "kernel",
        "compile",
        "dropout",
        "expert_dropout",
        "att_expert_dropout",
        "entropy_reg",
        "att_entropy_reg",
    }
)


def check_init_from(directory: str, model: MoEUTConfig) -> None:
    """`directory` is a model directory of the same model, or a ConfigError naming the first
    differing `MoEUTConfig` field."""
    path = Path(directory)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / required).is_file():
            raise ConfigError(f"init_from: {path} has no {required}; not a model directory")
    try:
        saved = read_config(path)
    except ValueError as error:
        raise ConfigError(f"init_from: {error}") from error
    try:
        with safe_open(path / WEIGHTS_FILE, framework="pt"):
            pass  # opening checks the header against the file's size
    except SafetensorError as error:
        raise ConfigError(f"init_from: {path / WEIGHTS_FILE} is damaged ({error})") from error
    compared = [
        f.name for f in dataclasses.fields(MoEUTConfig) if f.name not in _TRAINING_ONLY_FIELDS
    ]
    for name in compared:
        ours, theirs = getattr(model, name), getattr(saved, name)
        if ours != theirs:
            raise ConfigError(
                f"init_from: {path} holds a model with {name} = {theirs!r}, the run's model has "
                f"{name} = {ours!r}"
            )


def check_run(config: TrainConfig, world_size: int) -> RunPlan:
    """Check everything a run needs before it starts, naming what is wrong."""
    data = config.data
    if not Path(data.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer: {data.tokenizer} does not exist")
    try:
        manifest = read_manifest(data.shard_dir)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"data.shard_dir: {error}") from error
    try:
        tokenizer = Tokenizer(data.tokenizer)
    except ValueError as error:
        raise ConfigError(f"data.tokenizer: {error}") from error
    try:
        manifest.check_compatible(seq_len=data.seq_len, tokenizer_sha256=tokenizer.sha256)
    except ManifestMismatchError as error:
        raise ConfigError(f"data: {error}") from error
    missing = [
        shard.name
        for split in manifest.splits.values()
        for shard in split.shards
        if not (Path(data.shard_dir) / shard.name).is_file()
    ]
    if missing:
        raise ConfigError(f"data.shard_dir: shard(s) listed in the manifest are missing: {missing}")

    model = config.model.build(tokenizer.vocab_size)
    config.parallel.validate(model, world_size)
    data_parallel = config.parallel.data(world_size)
    per_step = data.micro_batch_size * data_parallel
    if data.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size {data.global_batch_size} is not a multiple of "
            f"micro_batch_size {data.micro_batch_size} × data-parallel size {data_parallel}"
        )
    if "train" not in manifest.splits:
        raise ConfigError(f"data.shard_dir: the shards have no 'train' split ({data.shard_dir})")
    slots = data_parallel * max(data.num_workers, 1)
    if manifest.split("train").samples < slots:
        raise ConfigError(
            f"the train split has {manifest.split('train').samples} samples, fewer than the "
            f"{slots} data-parallel ranks × workers reading it"
        )
    if config.eval.every:
        if "val" not in manifest.splits:
            raise ConfigError("eval.every > 0 but the shards have no 'val' split; set eval.every=0")
        # Every rank must get a full micro-batch (the smallest share is val // ranks samples),
        # else validation could never run.
        val_samples = manifest.split("val").samples
        if val_samples // data_parallel < data.micro_batch_size:
            raise ConfigError(
                f"the val split has {val_samples} samples, less than one micro-batch "
                f"({data.micro_batch_size}) for each of the {data_parallel} data-parallel ranks; "
                "set eval.every=0 or build the shards with a larger val_fraction"
            )
    return RunPlan(model, data_parallel, data.global_batch_size // per_step)
