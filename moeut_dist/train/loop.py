"""The training loop: one code path from one CPU process to many GPU nodes.

Every run goes through the parallel engine (megatron-core groups + DeepSpeed ZeRO), world size 1
included, so what single-process tests check is what multi-node runs execute. A step is
`grad_accumulation` micro-batches of `micro_batch_size` sequences on each data-parallel rank;
the learning rate of a step is a pure function of its index, so a resumed run continues the
schedule exactly. A step whose loss is not finite is skipped (DeepSpeed finds the non-finite
gradient norm and drops the update, in bf16 too) and counted; too many in a row stop the run.
A run starts from the `init_from` model directory's weights (exactly, fp32 master copy included)
unless it resumes a checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moeut_dist import arch
from moeut_dist.config import ConfigError
from moeut_dist.data import TokenLoader
from moeut_dist.data.mixture import MixtureLoader
from moeut_dist.export import WEIGHTS_FILE
from moeut_dist.host_memory import keep_freed_memory
from moeut_dist.logs import stdout_on_rank0_only
from moeut_dist.model import perplexity
from moeut_dist.parallel.build import build_model, parallel_lm_loss
from moeut_dist.parallel.collectives import data_parallel_mean
from moeut_dist.parallel.engine import create_engine, load_initial_weights
from moeut_dist.parallel.layout import init_distributed, initialize
from moeut_dist.progress import Progress
from moeut_dist.train.checkpoint import CheckpointError, CheckpointManager, TrainerState
from moeut_dist.train.config import RunPlan, TrainConfig, check_init_from, check_run
from moeut_dist.train.metrics import MetricsWriter, RoutingMonitor
from moeut_dist.train.peak_flops import peak_flops
from moeut_dist.train.profiling import StepProfiler
from moeut_dist.train.schedule import lr_multiplier

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


def world_size_from_environment() -> int:
    """The world size a launcher (torchrun, deepspeed, srun wrapper) announced; 1 without one."""
    if "RANK" not in os.environ:
        if os.environ.get("WORLD_SIZE", "1") != "1":
            # Left over from elsewhere: this process would train alone on a plan made for more.
            raise ConfigError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but RANK is not; start the run "
                "with a launcher (torchrun, deepspeed, srun) or unset WORLD_SIZE"
            )
        return 1
    return int(os.environ["WORLD_SIZE"])


@contextlib.contextmanager
def distributed_session() -> Iterator[None]:
    """torch.distributed for this run, from the launcher's environment; a plain process gets the
    environment of a one-process launch for the session (DeepSpeed reads it too). Torn down
    afterwards, also on errors."""
    standalone = {}
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        standalone = dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        os.environ.update(standalone)
    try:
        init_distributed()
        yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if deepspeed.comm.is_initialized():  # also drops DeepSpeed's groups of this world
            deepspeed.comm.destroy_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group()
        for name in standalone:
            del os.environ[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(
    config: TrainConfig, split: str, epochs: int | None, shard_dir: str | None = None
) -> TokenLoader:
    """The loader of one split of `shard_dir` (default: `data.shard_dir`) for this rank."""
    data = config.data
    return TokenLoader(
        shard_dir or data.shard_dir,
        seq_len=data.seq_len,
        tokenizer=data.tokenizer,
        batch_size=data.micro_batch_size,
        split=split,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_world_size=parallel_state.get_data_parallel_world_size(),
        num_workers=data.num_workers if split == "train" else 0,
        seed=config.seed,
        epochs=epochs,
        skip_corrupt=data.skip_corrupt_shards,
        retry=data.retry_policy(),
        prefetch_shards=data.prefetch_shards,
    )


def make_train_loader(config: TrainConfig, plan: RunPlan) -> TokenLoader | MixtureLoader:
    """This rank's training batches: from `data.shard_dir`, or mixed from `data.sources`."""
    data = config.data
    if not data.sources:
        return make_loader(config, "train", epochs=None)
    return MixtureLoader(
        data.mixture(),
        seq_len=data.seq_len,
        tokenizer=data.tokenizer,
        batch_size=data.micro_batch_size,
        samples_per_step=data.micro_batch_size * plan.grad_accumulation,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_world_size=parallel_state.get_data_parallel_world_size(),
        num_workers=data.num_workers,
        seed=config.seed,
        skip_corrupt=data.skip_corrupt_shards,
        retry=data.retry_policy(),
        prefetch_shards=data.prefetch_shards,
    )


def validation_sets(config: TrainConfig) -> dict[str, ValidationBatches]:
    """The validation batches of `data.shard_dir` (named ""), or of each source."""
    if not config.data.sources:
        return {"": ValidationBatches(config)}
    return {s.name: ValidationBatches(config, s.shard_dir) for s in config.data.sources}


def validation_record(
    engine,
    config: TrainConfig,
    validation: dict[str, ValidationBatches],
    monitor: RoutingMonitor | None,
) -> dict | None:
    """Validation loss and perplexity; for a mixture, of each source (`loss/NAME`) and their
    weighted mean (`loss`). None if some rank has no full batch of some source."""
    losses = {}
    for name, batches in validation.items():
        loss = validation_loss(engine, config, batches, monitor)
        if loss is None:
            return None
        losses[name] = loss
    if not config.data.sources:
        return {"loss": losses[""], "perplexity": perplexity(losses[""])}
    weights = {source.name: source.weight for source in config.data.sources}
    mean = sum(weights[name] * loss for name, loss in losses.items()) / sum(weights.values())
    record = {"loss": mean, "perplexity": perplexity(mean)}
    for name, loss in losses.items():
        record |= {f"loss/{name}": loss, f"perplexity/{name}": perplexity(loss)}
    return record


@dataclass
class Interval:
    """The steps since the last metrics record."""

    steps: int = 0
    tokens: int = 0
    skipped: int = 0
    started: float = 0.0
    losses: list[torch.Tensor] = field(default_factory=list)  # `train_step`'s, still on device

    def start(self) -> None:
        self.__init__(started=time.perf_counter())


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host→device copy the host does not wait for: from pinned memory, non-blocking (the
    loader's workers have already prefetched the batch on the host)."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def train_step(engine, batches: Iterator[torch.Tensor], plan: RunPlan) -> torch.Tensor:
    """One optimizer step over `grad_accumulation` micro-batches. Returns this rank's (lm, reg)
    loss of each micro-batch, [grad_accumulation, 2] on the device: nothing here waits for the
    device (`step_losses` fetches them when they are logged)."""
    losses = []
    for _ in range(plan.grad_accumulation):
        loss = parallel_lm_loss(engine.module, to_device(next(batches), engine.device))
        engine.backward(loss.total)
        engine.step()  # DeepSpeed updates at the accumulation boundary only
        losses.append(torch.stack([loss.lm, loss.reg]))
    return torch.stack(losses)


def step_losses(losses: list[torch.Tensor]) -> list[tuple[float, float]]:
    """(lm, reg) of each step from `train_step`'s results: the mean over its micro-batches and
    the data-parallel ranks. One collective and one device→host copy for all of them."""
    steps = []
    for micro_batches in data_parallel_mean(torch.stack(losses)).tolist():
        lm = reg = 0.0
        for micro_lm, micro_reg in micro_batches:
            lm += micro_lm / len(micro_batches)
            reg += micro_reg / len(micro_batches)
        steps.append((lm, reg))
    return steps


class ValidationBatches:
    """The validation split's loader, made once at the start of the run (so a manifest changed
    under a running job cannot stop it), rewound to the split's start for every pass."""

    def __init__(self, config: TrainConfig, shard_dir: str | None = None) -> None:
        self.loader = make_loader(config, "val", 1, shard_dir)
        self._start = self.loader.state_dict()

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.loader.load_state_dict(self._start)
        return iter(self.loader)


@torch.no_grad()
def validation_loss(
    engine, config: TrainConfig, validation: ValidationBatches, monitor: RoutingMonitor | None
) -> float | None:
    """Mean LM loss over the first `eval.batches` micro-batches of each rank's share of the
    validation split (the same ones every pass); None if some rank has no full batch."""
    full = (b for b in validation if len(b) == config.data.micro_batch_size)
    batches = list(itertools.islice(full, config.eval.batches))
    # Every rank must run the same number of forwards (they hold collectives); a rank may have
    # fewer batches than its manifest share when corrupt shards are skipped.
    count = torch.tensor([len(batches)], device=engine.device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    if count.item() == 0:
        return None
    engine.module.eval()
    with monitor.paused() if monitor else contextlib.nullcontext():
        losses = torch.stack(
            [
                parallel_lm_loss(engine.module, to_device(batch, engine.device)).lm
                for batch in batches[: count.item()]
            ]
        )
    engine.module.train()
    means = data_parallel_mean(losses).tolist()
    return sum(means) / len(means)


def train(config: TrainConfig) -> None:
    """Run (or continue) the training `config` describes."""
    plan = check_run(config, world_size_from_environment())
    with distributed_session():
        _train(config, plan)


def _train(config: TrainConfig, plan: RunPlan) -> None:
    if not torch.cuda.is_available():
        keep_freed_memory()  # the CPU has no caching allocator: see `host_memory`
    initialize(config.parallel, plan.model)
    checkpoints = CheckpointManager(config)
    resume = checkpoints.resume_point()
    init_from = config.init_from if resume is None else None
    if init_from is not None:
        check_init_from(init_from, plan.model)
    loader = make_train_loader(config, plan)
    validation = validation_sets(config) if config.eval.every else None
    state = TrainerState(step=0, loader=loader.state_dict())
    if resume is not None:
        state = resume.state
        try:
            loader.load_state_dict(state.loader)
        except ValueError as error:  # data settings changed since the checkpoint
            raise CheckpointError(f"{resume.directory}: {error}") from error
    spec = arch.of(plan.model)
    summary = spec.summary(plan.model, config.data.seq_len)
    model = build_model(plan.model, config.parallel, seed=config.seed)
    has_experts = spec.n_experts(plan.model) > 0
    with stdout_on_rank0_only():
        engine = create_engine(
            model,
            config.parallel,
            config.optim,
            config.data.micro_batch_size,
            gradient_accumulation_steps=plan.grad_accumulation,
            bf16=config.bf16,
        )
    if init_from is not None:
        load_initial_weights(engine, os.path.join(init_from, WEIGHTS_FILE))
    # After the engine, which has moved the model to its device: the counts live there too.
    monitor = RoutingMonitor(model) if config.logging.expert_usage and has_experts else None
    seed_everything(config.seed)
    if resume is not None:
        checkpoints.load(engine, resume)
        if resume.layout_change is not None:  # the RNG states were another layout's ranks'
            seed_everything((config.seed + state.step) % 2**32)

    resumed_step = state.step if resume is not None else None
    metrics = MetricsWriter(
        config.out_path,
        config.logging.tensorboard,
        resumed_step,
        wandb=config.logging.wandb,
        run_config=config.to_dict(),
    )
    if resume is not None:
        event: dict = {"resumed_from": str(resume.directory)}
        if resume.layout_change is not None:
            event["layout_changed"] = dict(zip(("from", "to"), resume.layout_change, strict=True))
        metrics.write("event", state.step, event)
    if isinstance(loader, MixtureLoader) and loader.weight_changes:
        changes = {
            name: {"before": old, "now": new} for name, (old, new) in loader.weight_changes.items()
        }
        metrics.write("event", state.step, {"source_weights_changed": changes})
    if init_from is not None:
        metrics.write("event", state.step, {"initialised_from": init_from})
    metrics.write("model", state.step, summary.to_dict())
    logger.info("model %s", summary.describe())

    end_step = config.schedule.steps
    if config.stop_after_steps is not None:
        end_step = min(end_step, state.step + config.stop_after_steps)
    tokens_per_step = config.data.global_batch_size * config.data.seq_len
    flops_per_step = summary.training_flops_per_token * tokens_per_step
    peak = device_peak_flops(config)
    progress = Progress(
        total=config.schedule.steps,
        initial=state.step,
        tokens_per_unit=tokens_per_step,
        enabled=dist.get_rank() == 0 and config.logging.progress_bar,
        every_steps=config.logging.progress_every_steps,
        every_seconds=config.logging.progress_every_seconds,
    )
    profiler = StepProfiler(config.profiling, config.out_path, dist.get_rank())
    logger.info(
        "training steps %d to %d of %d in %s on %s (%d processes, %d-way data parallel, %d "
        "micro-batches per step)",
        state.step + 1, end_step, config.schedule.steps, config.out_dir, engine.device.type,
        dist.get_world_size(), plan.data_parallel, plan.grad_accumulation,
    )  # fmt: skip
    batches = iter(loader)
    interval = Interval()
    interval.start()
    while state.step < end_step:
        lr = config.optim.lr * lr_multiplier(state.step, config.schedule)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        profiler.before_step(state.step + 1)
        losses = train_step(engine, batches, plan)
        state.step += 1
        profiler.after_step(state.step)
        state.loader = loader.state_dict()
        # DeepSpeed has checked the gradient norm for this step (one host sync per step, on
        # every rank alike): a non-finite loss makes it non-finite and the update is dropped.
        applied = engine.was_step_applied()
        state.consecutive_nonfinite = 0 if applied else state.consecutive_nonfinite + 1
        if state.consecutive_nonfinite >= config.max_consecutive_nonfinite:
            lm, reg = step_losses([losses])[0]
            raise NonFiniteLossError(
                f"step {state.step}: {state.consecutive_nonfinite} steps in a row had a "
                f"non-finite loss or gradient (lm {lm}, reg {reg}); stopping. Lower the "
                "learning rate or resume from an earlier checkpoint."
            )

        interval.steps += 1
        interval.tokens += tokens_per_step
        interval.skipped += 0 if applied else 1
        interval.losses.append(losses)
        progress.update(1, lr=f"{lr:.2e}")

        session_ends = state.step == end_step
        run_ends = state.step == config.schedule.steps
        if state.step % config.logging.every == 0 or session_ends:
            record = _train_record(engine, interval, lr, flops_per_step, peak)
            progress.update(0, loss=f"{record['loss']:.4f}")
            record.update(data_fault_counts(loader, engine.device))
            if isinstance(loader, MixtureLoader):
                record.update(_source_tokens(loader, config))
            if monitor is not None:
                record.update(monitor.collect())
            metrics.write("train", state.step, record)
            interval.start()
        # Validation and checkpoints are not training: their time is kept out of the next
        # record's tokens/s, FLOPs/s and MFU.
        paused = time.perf_counter()
        if config.eval.every and (state.step % config.eval.every == 0 or run_ends):
            val = validation_record(engine, config, validation, monitor)
            if val is not None:
                metrics.write("val", state.step, val)
        if state.step % config.checkpoint.every == 0 or session_ends:
            checkpoints.save(engine, state)
        interval.started += time.perf_counter() - paused
    profiler.close()
    progress.close()
    metrics.close()


def device_peak_flops(config: TrainConfig) -> float | None:
    """The configured peak FLOP/s of one device, else the table's for this GPU; None (no MFU)
    on CPUs and unknown devices, with a note saying so."""
    if config.logging.peak_flops_per_device is not None:
        return config.logging.peak_flops_per_device
    if not torch.cuda.is_available():
        logger.info("MFU is not logged on CPU (set logging.peak_flops_per_device to log it)")
        return None
    name = torch.cuda.get_device_name()
    peak = peak_flops(name, config.bf16)
    if peak is None:
        logger.warning(
            "MFU is not logged: no peak FLOP/s known for %s; set logging.peak_flops_per_device",
            name,
        )
    return peak


def data_fault_counts(loader: TokenLoader | MixtureLoader, device: torch.device) -> dict[str, int]:
    """The run's data faults so far (`TokenLoader.counters`) over all data-parallel ranks, as
    `data/<counter>` (a collective; tensor-parallel ranks read the same data, counted once)."""
    local = loader.counters()
    counts = torch.tensor(list(local.values()), dtype=torch.int64, device=device)
    dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return {f"data/{name}": count for name, count in zip(local, counts.tolist(), strict=True)}


def _source_tokens(loader: MixtureLoader, config: TrainConfig) -> dict[str, int]:
    """Each source's training tokens so far, over all ranks (`tokens/NAME`)."""
    return {f"tokens/{name}": n * config.data.seq_len for name, n in loader.samples.items()}


def _train_record(engine, interval: Interval, lr: float, flops_per_step, peak: float | None):
    # Fetching the losses waits for the device to finish the interval's steps: time it after.
    finite = [(lm, reg) for lm, reg in step_losses(interval.losses) if math.isfinite(lm + reg)]
    elapsed = time.perf_counter() - interval.started
    lm = sum(lm for lm, _ in finite) / len(finite) if finite else math.nan
    reg = sum(reg for _, reg in finite) / len(finite) if finite else math.nan
    flops_per_second = flops_per_step * interval.steps / elapsed
    grad_norm = engine.get_global_grad_norm()
    record = {
        "loss": lm,
        "perplexity": perplexity(lm),
        "reg_loss": reg,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "skipped_steps": interval.skipped,
        "tokens_per_second": interval.tokens / elapsed,
        "model_flops_per_second": flops_per_second,
    }
    if peak is not None:
        record["mfu"] = flops_per_second / (peak * dist.get_world_size())
    return record
