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
import importlib.util
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors import SafetensorError, safe_open

from moeut_dist import arch
from moeut_dist.arch import ModelConfig
from moeut_dist.checksums import CHECKSUMS_FILE, verify_checksums
from moeut_dist.config import ConfigError
from moeut_dist.data import ManifestMismatchError, Tokenizer, read_manifest, storage
from moeut_dist.data.mixture import Source
from moeut_dist.data.storage import RetryPolicy
from moeut_dist.dataclass_dict import DictConvertible, coerce
from moeut_dist.export import CONFIG_FILE, WEIGHTS_FILE, read_config
from moeut_dist.parallel.layout import ParallelConfig


def _model_fields(arch_name: str) -> dict[str, Any]:
    """The config fields (with their types) of the architecture `arch_name`."""
    return typing.get_type_hints(arch.get(arch_name).config_class)


@dataclass(frozen=True)
class ModelSection:
    """An architecture, one of its profiles, and any of its config's fields replacing the
    profile's.

    In YAML the fields sit next to `arch` and `profile`
    (`model: {arch: dense, profile: dense-44m, dropout: 0.1}`). `vocab_size` defaults to the
    tokenizer's.
    """

    arch: str = "moeut"  # a name in `moeut_dist.arch.ARCHITECTURES`: moeut, dense
    profile: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: Any, where: str = "model") -> ModelSection:
        if not isinstance(values, dict):
            raise ConfigError(f"model must be a mapping, got {values!r}")
        arch_name = coerce(str, values.get("arch", cls.arch), f"{where}.arch")
        hints = _model_fields(arch_name)
        overrides = {k: v for k, v in values.items() if k not in ("arch", "profile")}
        unknown = sorted(set(overrides) - set(hints))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {[f'{where}.{k}' for k in unknown]} for model.arch "
                f"{arch_name}; model keys are 'arch', 'profile' and the {arch_name} config "
                f"fields {sorted(hints)}"
            )
        overrides = {k: coerce(hints[k], v, f"{where}.{k}") for k, v in overrides.items()}
        profile = coerce(str, values.get("profile", cls.profile), f"{where}.profile")
        return cls(arch_name, profile, overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "profile": self.profile, **self.overrides}

    def build(self, tokenizer_vocab_size: int) -> ModelConfig:
        values = {"vocab_size": tokenizer_vocab_size, **self.overrides}
        if values["vocab_size"] < tokenizer_vocab_size:
            raise ConfigError(
                f"model.vocab_size {values['vocab_size']} is smaller than the tokenizer's "
                f"{tokenizer_vocab_size} pieces"
            )
        return arch.get(self.arch).profile(self.profile, **values)


@dataclass(frozen=True)
class SourceSection(DictConvertible):
    """One corpus of a mixture: its samples make up `weight / sum of weights` of each batch."""

    name: str = ""
    shard_dir: str = ""
    weight: float = 1.0


@dataclass(frozen=True)
class DataSection(DictConvertible):
    # Written by `moeut prep shards`: a path or URL (file://, http(s)://, s3://, pipe:CMD).
    shard_dir: str = ""
    # A mixture of several shard directories, instead of `shard_dir`; every source must be
    # built with `tokenizer` and `seq_len`. Only the weights may change when a run resumes.
    sources: list[SourceSection] = field(default_factory=list)
    tokenizer: str = ""  # the SentencePiece model the shards were built with
    seq_len: int = 1024
    global_batch_size: int = 64  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 16  # sequences per forward on one rank; the rest is accumulation
    num_workers: int = 1  # dataloader worker processes per rank
    skip_corrupt_shards: bool = False  # skip (and count) shards that cannot be read
    read_attempts: int = 5  # tries of a shard read that fails transiently (network errors)
    retry_backoff_seconds: float = 1.0  # wait after the first failure, doubling up to 30 s
    prefetch_shards: int = 1  # shards each loader worker reads ahead in the background; 0: none

    def shard_dirs(self) -> dict[str, str]:
        """Each shard directory by the name of its config key (`data.sources[web]`)."""
        if not self.sources:
            return {"data.shard_dir": self.shard_dir}
        return {f"data.sources[{s.name}]": s.shard_dir for s in self.sources}

    def mixture(self) -> list[Source]:
        return [Source(s.name, s.shard_dir, s.weight) for s in self.sources]

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.read_attempts, self.retry_backoff_seconds)


@dataclass(frozen=True)
class OptimSection(DictConvertible):
    """AdamW as in the paper's recipe (the learning-rate schedule is `ScheduleSection`)."""

    lr: float = 2.5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 0.25  # the global gradient norm's bound; 0: no clipping

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
class ScheduleSection(DictConvertible):
    """Linear warm-up, then `cosine` (down to `min_lr_ratio` at the last step, the paper's) or
    `wsd`: warm-up, stable at the full rate, and a final decay of `decay_steps` steps to
    `min_lr_ratio` in the shape `decay_shape`."""

    kind: Literal["cosine", "wsd"] = "cosine"
    steps: int = 100_000  # optimizer steps of the whole run
    warmup_steps: int = 4000
    min_lr_ratio: float = 0.1  # the rate of the last step, × lr
    decay_steps: int = 0  # wsd only: the decay's length, ending at the last step
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"  # wsd only; sqrt: 1 − √progress

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"schedule.steps must be positive, got {self.steps}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError("schedule.warmup_steps must be in 0..schedule.steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("schedule.min_lr_ratio must be in [0, 1]")
        if self.kind == "cosine" and self.decay_steps:
            raise ConfigError("schedule.decay_steps is the wsd decay's length; set kind: wsd")
        if not 0 <= self.decay_steps <= self.steps - self.warmup_steps:
            raise ConfigError(
                f"schedule.decay_steps must be in 0..steps − warmup_steps "
                f"({self.steps - self.warmup_steps}), got {self.decay_steps}"
            )


@dataclass(frozen=True)
class CheckpointSection(DictConvertible):
    every: int = 1000  # steps; the last step is always saved
    keep: int = 3  # complete checkpoints kept, newest first
    # "auto": the latest complete one if any, stopping if a file of it is corrupt;
    # "latest-intact": the same, falling back to the newest intact one; "never"; or a step
    # directory.
    resume: str = "auto"


@dataclass(frozen=True)
class EvalSection(DictConvertible):
    every: int = 1000  # steps between validation passes; 0 disables them
    batches: int = 50  # micro-batches per rank per pass (fewer if the split is smaller)


@dataclass(frozen=True)
class WandbSection(DictConvertible):
    project: str = "moeut"
    entity: str | None = None  # team or user; None: the account's default
    name: str | None = None  # the run's display name; None: out_dir's name
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass(frozen=True)
class LoggingSection(DictConvertible):
    every: int = 10  # steps per metrics record
    tensorboard: bool = True
    progress_bar: bool = True  # on rank 0: a bar on a terminal, plain lines elsewhere
    progress_every_steps: int = 100  # without a terminal: a progress line this often …
    progress_every_seconds: float = 60.0  # … or after this many seconds, whichever comes first
    expert_usage: bool = True  # per-layer selection entropy and share of tokens per expert
    # Dense peak FLOP/s of one accelerator for MFU; None: looked up from the GPU's name and the
    # precision (`moeut_dist.train.peak_flops`), MFU left out on CPUs and unknown devices.
    peak_flops_per_device: float | None = None
    wandb: WandbSection | None = None  # Weights & Biases (extra `[wandb]`); None: not used


@dataclass(frozen=True)
class ProfilingSection(DictConvertible):
    """torch.profiler Chrome traces of `steps` steps from `start_step` on the listed ranks, in
    `<out_dir>/profiles/`; `memory`: also a CUDA memory snapshot (pickle, for
    pytorch.org/memory_viz)."""

    start_step: int = 10  # the first profiled step (1-based, as logged)
    steps: int = 0  # 0: no profiling
    ranks: tuple[int, ...] = (0,)
    memory: bool = False


@dataclass(frozen=True)
class TrainConfig(DictConvertible):
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
    profiling: ProfilingSection = field(default_factory=ProfilingSection)
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
            "checkpoint.every": self.checkpoint.every,
            "checkpoint.keep": self.checkpoint.keep,
            "eval.batches": self.eval.batches,
            "logging.every": self.logging.every,
            "logging.progress_every_steps": self.logging.progress_every_steps,
            "profiling.start_step": self.profiling.start_step,
            "max_consecutive_nonfinite": self.max_consecutive_nonfinite,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in 0..2**32 - 1, got {self.seed}")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError(f"stop_after_steps must be positive, got {self.stop_after_steps}")
        non_negative = (self.eval.every, self.data.num_workers, self.data.prefetch_shards)
        if min(*non_negative, self.profiling.steps) < 0:
            raise ConfigError(
                "eval.every, data.num_workers, data.prefetch_shards and profiling.steps must not "
                "be negative"
            )
        if not self.logging.progress_every_seconds > 0:
            raise ConfigError("logging.progress_every_seconds must be positive")
        if self.data.read_attempts < 1 or not self.data.retry_backoff_seconds >= 0:
            raise ConfigError("data.read_attempts must be positive, retry_backoff_seconds ≥ 0")
        if not (self.data.shard_dir or self.data.sources) or not self.data.tokenizer:
            raise ConfigError("data.shard_dir (or data.sources) and data.tokenizer are required")
        if self.out_path.exists() and not self.out_path.is_dir():
            raise ConfigError(f"out_dir: {self.out_dir} exists and is not a directory")
        self._check_sources()

    def _check_sources(self) -> None:
        sources = self.data.sources
        if not sources:
            return
        if self.data.shard_dir:
            raise ConfigError("give data.shard_dir or data.sources, not both")
        names = [source.name for source in sources]
        if "" in names or len(set(names)) != len(names):
            raise ConfigError(f"data.sources need distinct, non-empty names; got {names}")
        for source in sources:
            if not source.shard_dir:
                raise ConfigError(f"data.sources[{source.name}].shard_dir is required")
            if not (math.isfinite(source.weight) and source.weight > 0):
                raise ConfigError(
                    f"data.sources[{source.name}].weight must be a finite number > 0, "
                    f"got {source.weight}"
                )

    @property
    def bf16(self) -> bool:
        """Whether the run trains in bf16 (`precision`, with "auto" resolved on this machine)."""
        if self.precision == "auto":
            return torch.cuda.is_available()
        return self.precision == "bf16"

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)


def _annotation(path: list[str]) -> Any:
    """The annotated type of the config field a dotted path names; None if there is none."""
    section: Any = TrainConfig
    for part in path:
        # An optional section (`logging.wandb`) names its keys like any other.
        optional = [a for a in typing.get_args(section) if dataclasses.is_dataclass(a)]
        section = optional[0] if optional else section
        if section is ModelSection:
            # Any architecture's field: the type only decides how the text is parsed.
            hints = {"arch": str, "profile": str}
            for name in arch.ARCHITECTURES:
                hints |= _model_fields(name)
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

    model: ModelConfig
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


def check_init_from(directory: str, model: ModelConfig) -> None:
    """`directory` is a model directory of the same model, or a ConfigError naming the
    architecture or the first differing config field."""
    path = Path(directory)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / required).is_file():
            raise ConfigError(f"init_from: {path} has no {required}; not a model directory")
    try:
        if (path / CHECKSUMS_FILE).exists():  # the weights too: each rank reads slices of them
            verify_checksums(path)
        saved = read_config(path)
    except ValueError as error:
        raise ConfigError(f"init_from: {error}") from error
    try:
        with safe_open(path / WEIGHTS_FILE, framework="pt"):
            pass  # opening checks the header against the file's size
    except SafetensorError as error:
        raise ConfigError(f"init_from: {path / WEIGHTS_FILE} is damaged ({error})") from error
    ours_arch, theirs_arch = arch.of(model).name, arch.of(saved).name
    if ours_arch != theirs_arch:
        raise ConfigError(
            f"init_from: {path} holds a {theirs_arch} model, the run's model is {ours_arch}"
        )
    compared = [f.name for f in dataclasses.fields(model) if f.name not in _TRAINING_ONLY_FIELDS]
    for name in compared:
        ours, theirs = getattr(model, name), getattr(saved, name)
        if ours != theirs:
            raise ConfigError(
                f"init_from: {path} holds a model with {name} = {theirs!r}, the run's model has "
                f"{name} = {ours!r}"
            )


def _check_shards(
    where: str, shard_dir: str, tokenizer: Tokenizer, config: TrainConfig, data_parallel: int
) -> None:
    """The shard directory `shard_dir` (the config key `where`) is complete, built for the run's
    tokenizer and seq_len, and holds enough samples for training and validation."""
    data = config.data
    try:
        storage.check_location(shard_dir)
        manifest = read_manifest(shard_dir)
    except (OSError, ValueError) as error:  # OSError: missing, or the store cannot be read
        raise ConfigError(f"{where}: {error}") from error
    try:
        manifest.check_compatible(seq_len=data.seq_len, tokenizer_sha256=tokenizer.sha256)
    except ManifestMismatchError as error:
        raise ConfigError(f"{where}: {error}") from error
    # Locally, a missing shard is found now; elsewhere looking costs a request per shard, so
    # it is found, named, when read.
    missing = [
        shard.name
        for split in manifest.splits.values()
        for shard in split.shards
        if storage.is_local(shard_dir)
        and not (storage.local_path(shard_dir) / shard.name).is_file()
    ]
    if missing:
        raise ConfigError(f"{where}: shard(s) listed in the manifest are missing: {missing}")
    if "train" not in manifest.splits:
        raise ConfigError(f"{where}: the shards have no 'train' split ({shard_dir})")
    slots = data_parallel * max(data.num_workers, 1)
    if manifest.split("train").samples < slots:
        raise ConfigError(
            f"{where}: the train split has {manifest.split('train').samples} samples, fewer "
            f"than the {slots} data-parallel ranks × workers reading it"
        )
    if config.eval.every:
        if "val" not in manifest.splits:
            raise ConfigError(
                f"{where}: eval.every > 0 but the shards have no 'val' split; set eval.every=0"
            )
        # Every rank must get a full micro-batch (the smallest share is val // ranks samples),
        # else validation could never run.
        val_samples = manifest.split("val").samples
        if val_samples // data_parallel < data.micro_batch_size:
            raise ConfigError(
                f"{where}: the val split has {val_samples} samples, less than one micro-batch "
                f"({data.micro_batch_size}) for each of the {data_parallel} data-parallel ranks; "
                "set eval.every=0 or build the shards with a larger val_fraction"
            )


def check_run(config: TrainConfig, world_size: int) -> RunPlan:
    """Check everything a run needs before it starts, naming what is wrong."""
    data = config.data
    if config.logging.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb needs wandb: pip install 'moeut-dist[wandb]'")
    if not Path(data.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer: {data.tokenizer} does not exist")
    try:
        tokenizer = Tokenizer(data.tokenizer)
    except ValueError as error:
        raise ConfigError(f"data.tokenizer: {error}") from error
    model = config.model.build(tokenizer.vocab_size)
    config.parallel.validate(model, world_size)
    data_parallel = config.parallel.data(world_size)
    per_step = data.micro_batch_size * data_parallel
    if data.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size {data.global_batch_size} is not a multiple of "
            f"micro_batch_size {data.micro_batch_size} × data-parallel size {data_parallel}"
        )
    for where, shard_dir in data.shard_dirs().items():
        _check_shards(where, shard_dir, tokenizer, config, data_parallel)
    return RunPlan(model, data_parallel, data.global_batch_size // per_step)
