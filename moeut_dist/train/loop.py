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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from moeut_dist.config import ConfigError
from moeut_dist.data import TokenLoader
from moeut_dist.export import WEIGHTS_FILE
from moeut_dist.model import perplexity
from moeut_dist.model.flops import training_flops_per_token
from moeut_dist.parallel.build import build_model, parallel_lm_loss
from moeut_dist.parallel.collectives import data_parallel_mean
from moeut_dist.parallel.engine import create_engine, load_initial_weights
from moeut_dist.parallel.layout import init_distributed, initialize
from moeut_dist.train.checkpoint import CheckpointError, CheckpointManager, TrainerState
from moeut_dist.train.config import RunPlan, TrainConfig, check_init_from, check_run
from moeut_dist.train.metrics import MetricsWriter, RoutingMonitor
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


def make_loader(config: TrainConfig, split: str, epochs: int | None) -> TokenLoader:
    data = config.data
    return TokenLoader(
        data.shard_dir,
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
    )


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


@torch.no_grad()
def validation_loss(engine, config: TrainConfig, monitor: RoutingMonitor | None) -> float | None:
    """Mean LM loss over the first `eval.batches` micro-batches of each rank's share of the
    validation split (the same ones every pass); None if some rank has no full batch."""
    full = (
        b for b in make_loader(config, "val", epochs=1) if len(b) == config.data.micro_batch_size
    )
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
    initialize(config.parallel, plan.model)
    checkpoints = CheckpointManager(config)
    resume = checkpoints.resume_point()
    init_from = config.init_from if resume is None else None
    if init_from is not None:
        check_init_from(init_from, plan.model)
    loader = make_loader(config, "train", epochs=None)
    state = TrainerState(step=0, loader=loader.state_dict())
    if resume is not None:
        state = resume.state
        try:
            loader.load_state_dict(state.loader)
        except ValueError as error:  # data settings changed since the checkpoint
            raise CheckpointError(f"{resume.directory}: {error}") from error
    model = build_model(plan.model, config.parallel, seed=config.seed)
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
    monitor = RoutingMonitor(model) if config.logging.expert_usage else None
    seed_everything(config.seed)
    if resume is not None:
        checkpoints.load(engine, resume)

    resumed_step = state.step if resume is not None else None
    metrics = MetricsWriter(config.out_path, config.logging.tensorboard, resumed_step)
    if resume is not None:
        metrics.write("event", state.step, {"resumed_from": str(resume.directory)})
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
        losses = train_step(engine, batches, plan)
        state.step += 1
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
        interval.tokens += config.data.global_batch_size * config.data.seq_len
        interval.skipped += 0 if applied else 1
        interval.losses.append(losses)
        progress.update(1)

        session_ends = state.step == end_step
        run_ends = state.step == config.schedule.steps
        if state.step % config.logging.every == 0 or session_ends:
            record = _train_record(engine, config, interval, lr, flops_per_step)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            if monitor is not None:
                record.update(monitor.collect())
            metrics.write("train", state.step, record)
            interval.start()
        # Validation and checkpoints are not training: their time is kept out of the next
        # record's tokens/s, FLOPs/s and MFU.
        paused = time.perf_counter()
        if config.eval.every and (state.step % config.eval.every == 0 or run_ends):
            val = validation_loss(engine, config, monitor)
            if val is not None:
                metrics.write("val", state.step, {"loss": val, "perplexity": perplexity(val)})
        if state.step % config.checkpoint.every == 0 or session_ends:
            checkpoints.save(engine, state)
        interval.started += time.perf_counter() - paused
    progress.close()
    metrics.close()


def _train_record(engine, config: TrainConfig, interval: Interval, lr: float, flops_per_step):
    # Fetching the losses waits for the device to finish the interval's steps: time it after.
    finite = [(lm, reg) for lm, reg in step_losses(interval.losses) if math.isfinite(lm + reg)]
    elapsed = time.perf_counter() - interval.started
    lm = sum(lm for lm, _ in finite) / len(finite) if finite else math.nan
    reg = sum(reg for _, reg in finite) / len(finite) if finite else math.nan
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
