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
import math
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from moeut_dist.config import ConfigError
from moeut_dist.data import TokenLoader
from moeut_dist.data.mixture import MixtureLoader
from moeut_dist.export import WEIGHTS_FILE
from moeut_dist.model import perplexity
from moeut_dist.parallel.build import build_model, parallel_lm_loss
from moeut_dist.parallel.engine import create_engine, load_initial_weights
from moeut_dist.parallel.layout import init_distributed, initialize
from moeut_dist.train.checkpoint import CheckpointError, CheckpointManager, TrainerState
from moeut_dist.train.config import RunPlan, TrainConfig, check_init_from, check_run
from moeut_dist.train.metrics import MetricsWriter, RoutingMonitor, training_flops_per_token
from moeut_dist.train.schedule import lr_multiplier


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
        if dist.is_initialized():
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
        read=data.read_settings(),
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
        read=data.read_settings(),
    )


def validation_record(engine, config: TrainConfig, monitor: RoutingMonitor | None) -> dict | None:
    """Validation loss and perplexity; for a mixture, of each source (`loss/NAME`) and their
    weighted mean (`loss`). None if some rank has no full batch of some source."""
    if not config.data.sources:
        loss = validation_loss(engine, config, monitor)
        return None if loss is None else {"loss": loss, "perplexity": perplexity(loss)}
    record, total, weights = {}, 0.0, 0.0
    for source in config.data.sources:
        loss = validation_loss(engine, config, monitor, source.shard_dir)
        if loss is None:
            return None
        record |= {f"loss/{source.name}": loss, f"perplexity/{source.name}": perplexity(loss)}
        total += source.weight * loss
        weights += source.weight
    return {"loss": total / weights, "perplexity": perplexity(total / weights), **record}


@dataclass
class Interval:
    """Sums over the steps since the last metrics record."""

    steps: int = 0
    finite_steps: int = 0
    lm: float = 0.0
    reg: float = 0.0
    tokens: int = 0
    skipped: int = 0
    started: float = 0.0

    def start(self) -> None:
        self.__init__(started=time.perf_counter())


def train_step(engine, batches: Iterator[torch.Tensor], plan: RunPlan) -> tuple[float, float]:
    """One optimizer step over `grad_accumulation` micro-batches; (lm, reg) loss averaged over
    them and the data-parallel ranks."""
    lm = reg = 0.0
    for _ in range(plan.grad_accumulation):
        loss = parallel_lm_loss(engine.module, next(batches).to(engine.device))
        engine.backward(loss.total)
        engine.step()  # DeepSpeed updates at the accumulation boundary only
        lm += loss.lm.item() / plan.grad_accumulation
        reg += loss.reg.item() / plan.grad_accumulation
    return lm, reg


@torch.no_grad()
def validation_loss(
    engine, config: TrainConfig, monitor: RoutingMonitor | None, shard_dir: str | None = None
) -> float | None:
    """Mean LM loss over the first `eval.batches` micro-batches of each rank's share of the
    validation split of `shard_dir` (default: `data.shard_dir`; the same batches every pass);
    None if some rank has no full batch."""
    batch_size = config.data.micro_batch_size
    full = (b for b in make_loader(config, "val", 1, shard_dir) if len(b) == batch_size)
    batches = list(itertools.islice(full, config.eval.batches))
    # Every rank must run the same number of forwards (they hold collectives); a rank may have
    # fewer batches than its manifest share when corrupt shards are skipped.
    count = torch.tensor([len(batches)], device=engine.device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    if count.item() == 0:
        return None
    engine.module.eval()
    with monitor.paused() if monitor else contextlib.nullcontext():
        losses = [
            parallel_lm_loss(engine.module, batch.to(engine.device)).lm.item()
            for batch in batches[: count.item()]
        ]
    engine.module.train()
    return sum(losses) / len(losses)


def train(config: TrainConfig) -> None:
    """Run (or continue) the training `config` describes."""
    plan = check_run(config, world_size_from_environment())
    with distributed_session():
        _train(config, plan)


def _train(config: TrainConfig, plan: RunPlan) -> None:
    initialize(config.parallel, plan.model)
    checkpoints = CheckpointManager(config)
    resume = checkpoints.resume_point()
    init_from = config.init_from if resume is None else None
    if init_from is not None:
        check_init_from(init_from, plan.model)
    loader = make_train_loader(config, plan)
    state = TrainerState(step=0, loader=loader.state_dict())
    if resume is not None:
        state = resume.state
        try:
            loader.load_state_dict(state.loader)
        except ValueError as error:  # data settings changed since the checkpoint
            raise CheckpointError(f"{resume.directory}: {error}") from error
    model = build_model(plan.model, config.parallel, seed=config.seed)
    monitor = RoutingMonitor(model) if config.logging.expert_usage else None
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
    seed_everything(config.seed)
    if resume is not None:
        checkpoints.load(engine, resume)

    resumed_step = state.step if resume is not None else None
    metrics = MetricsWriter(config.out_path, config.logging.tensorboard, resumed_step)
    if resume is not None:
        metrics.write("event", state.step, {"resumed_from": str(resume.directory)})
    if isinstance(loader, MixtureLoader) and loader.weight_changes:
        changes = {
            name: {"before": old, "now": new} for name, (old, new) in loader.weight_changes.items()
        }
        metrics.write("event", state.step, {"source_weights_changed": changes})
    if init_from is not None:
        metrics.write("event", state.step, {"initialised_from": init_from})

    end_step = config.schedule.steps
    if config.stop_after_steps is not None:
        end_step = min(end_step, state.step + config.stop_after_steps)
    flops_per_step = training_flops_per_token(plan.model, config.data.seq_len) * (
        config.data.global_batch_size * config.data.seq_len
    )
    rank0 = dist.get_rank() == 0
    progress = tqdm(
        total=config.schedule.steps,
        initial=state.step,
        disable=not (rank0 and config.logging.progress_bar),
        dynamic_ncols=True,
    )
    batches = iter(loader)
    interval = Interval()
    interval.start()
    while state.step < end_step:
        lr = config.optim.lr * lr_multiplier(state.step, config.schedule)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        lm, reg = train_step(engine, batches, plan)
        state.step += 1
        state.loader = loader.state_dict()
        applied = engine.was_step_applied()
        state.consecutive_nonfinite = 0 if applied else state.consecutive_nonfinite + 1
        if state.consecutive_nonfinite >= config.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"step {state.step}: {state.consecutive_nonfinite} steps in a row had a "
                f"non-finite loss or gradient (lm {lm}, reg {reg}); stopping. Lower the "
                "learning rate or resume from an earlier checkpoint."
            )

        interval.steps += 1
        interval.tokens += config.data.global_batch_size * config.data.seq_len
        interval.skipped += 0 if applied else 1
        if math.isfinite(lm + reg):
            interval.finite_steps += 1
            interval.lm += lm
            interval.reg += reg
        progress.update(1)
        progress.set_postfix(loss=f"{lm:.4f}", lr=f"{lr:.2e}")

        session_ends = state.step == end_step
        run_ends = state.step == config.schedule.steps
        if state.step % config.logging.every == 0 or session_ends:
            record = _train_record(engine, config, interval, lr, flops_per_step)
            record.update(_data_record(engine, loader, config))
            if monitor is not None:
                record.update(monitor.collect())
            metrics.write("train", state.step, record)
            interval.start()
        # Validation and checkpoints are not training: their time is kept out of the next
        # record's tokens/s, FLOPs/s and MFU.
        paused = time.perf_counter()
        if config.eval.every and (state.step % config.eval.every == 0 or run_ends):
            val = validation_record(engine, config, monitor)
            if val is not None:
                metrics.write("val", state.step, val)
        if state.step % config.checkpoint.every == 0 or session_ends:
            checkpoints.save(engine, state)
        interval.started += time.perf_counter() - paused
    progress.close()
    metrics.close()


def _data_record(engine, loader: TokenLoader | MixtureLoader, config: TrainConfig) -> dict:
    """The loaders' counters (`skipped_shards`, `read_retries`), cumulative and summed over the
    ranks, and, for a mixture, each source's training tokens so far (`tokens/NAME`)."""
    names = list(loader.counters())
    counts = torch.tensor([loader.counters()[name] for name in names], device=engine.device)
    dist.all_reduce(counts)
    record = dict(zip(names, counts.tolist(), strict=True))
    if isinstance(loader, MixtureLoader):
        seq_len = config.data.seq_len
        record |= {f"tokens/{name}": count * seq_len for name, count in loader.samples.items()}
    return record


def _train_record(engine, config: TrainConfig, interval: Interval, lr: float, flops_per_step):
    elapsed = time.perf_counter() - interval.started
    lm = interval.lm / interval.finite_steps if interval.finite_steps else math.nan
    reg = interval.reg / interval.finite_steps if interval.finite_steps else math.nan
    flops_per_second = flops_per_step * interval.steps / elapsed
    peak = config.logging.peak_flops_per_device
    grad_norm = engine.get_global_grad_norm()
    return {
        "loss": lm,
        "perplexity": perplexity(lm),
        "reg_loss": reg,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "skipped_steps": interval.skipped,
        "tokens_per_second": interval.tokens / elapsed,
        "model_flops_per_second": flops_per_second,
        "mfu": flops_per_second / (peak * dist.get_world_size()) if peak else None,
    }
