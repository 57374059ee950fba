"""DeepSpeed ZeRO under TP/EP/DP layouts against one process, and checkpoints (gloo, 4 CPUs);
MoEUT and the dense baseline."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state
from megatron.core import parallel_state

from moeut_dist import profiles
from moeut_dist.export import WEIGHTS_FILE, export_shards, load_pretrained
from moeut_dist.model import lm_loss
from moeut_dist.parallel.build import (
    build_model,
    gather_state_dict,
    parallel_lm_loss,
    read_local_shards,
)
from moeut_dist.parallel.collectives import data_parallel_mean
from moeut_dist.parallel.engine import (
    create_engine,
    link_optimizer_state,
    load_checkpoint,
    materialize_optimizer_state,
    optimizer_steps,
    save_checkpoint,
)
from moeut_dist.parallel.layout import ParallelConfig, initialize
from moeut_dist.parallel.shards import read_full_state_dict
from moeut_dist.train.config import OptimSection
from tests.distributed_utils import run_distributed
from tests.parallel_cases import (
    BATCH,
    assert_close_dicts,
    batch,
    data_parallel_share,
    model_config,
    reference_loss,
    reference_model,
)

pytestmark = pytest.mark.slow

# Clipping is active at this threshold (the test model's gradient norm is ~1), so the global
# norm is part of what must agree.
# Adam's eps bounds how much it amplifies fp32 rounding in near-zero gradients (see below).
SETTINGS = OptimSection(lr=1e-2, eps=1e-6, weight_decay=0.01, grad_clip=0.1)
STEPS = 2


def _reference_run(config) -> tuple[list[tuple[float, float, float]], dict[str, torch.Tensor]]:
    """(lm loss, reg loss, gradient norm) per step and the final weights, in one process."""
    model = reference_model(config)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=SETTINGS.lr,
        betas=SETTINGS.betas,
        eps=SETTINGS.eps,
        weight_decay=SETTINGS.weight_decay,
    )
    history = []
    for step in range(STEPS):
        lm, reg = reference_loss(model, batch(config, step))
        optimizer.zero_grad()
        (lm + reg).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), SETTINGS.grad_clip)
        optimizer.step()
        history.append((lm.item(), reg.item(), norm.item()))
    return history, model.state_dict()


def _engine(config, layout: ParallelConfig, bf16: bool = False):
    initialize(layout, config)
    model = build_model(config, layout, seed=1234)
    dp_size = parallel_state.get_data_parallel_world_size()
    return create_engine(model, layout, SETTINGS, micro_batch_size=BATCH // dp_size, bf16=bf16)


def _train_step(engine, config, step: int) -> tuple[float, float, float]:
    loss = parallel_lm_loss(engine.module, data_parallel_share(batch(config, step)))
    engine.backward(loss.total)
    engine.step()
    lm, reg = data_parallel_mean(torch.stack([loss.lm, loss.reg])).tolist()
    return lm, reg, float(engine.get_global_grad_norm())


def _check_layout_trains_like_one_process(config, layout, expected_history, expected_weights):
    engine = _engine(config, layout)
    history = [_train_step(engine, config, step) for step in range(STEPS)]
    for step, (got, want) in enumerate(zip(history, expected_history, strict=True)):
        for what, g, w in zip(("lm", "reg", "grad norm"), got, want, strict=True):
            assert g == pytest.approx(w, rel=1e-5), f"{layout} step {step} {what}"
    weights = gather_state_dict(engine.module)
    # The cross-entropy runs in fp32 (as `lm_loss` does), so gradients agree to ~1e-7 relative;
    # Adam turns that into larger update differences where a gradient is near eps.
    assert_close_dicts(weights, expected_weights, rtol=1e-5, atol=1e-6, what=f"{layout} weight")


def _check_bf16_layout_follows_one_process(config, expected_history) -> None:
    """bf16 weights and activations under TP × EP × ZeRO-2: the losses and the global gradient
    norm (computed from ZeRO's fp32 gradient partitions) follow the one-process run to bf16
    precision."""
    layout = ParallelConfig(tensor=2, expert=2, zero_stage=2)
    engine = _engine(config, layout, bf16=True)
    assert engine.module.embedding.weight.dtype == torch.bfloat16
    for step, want in enumerate(expected_history):
        got = _train_step(engine, config, step)
        for what, g, w in zip(("lm", "reg", "grad norm"), got, want, strict=True):
            assert g == pytest.approx(w, rel=1e-2), f"bf16 step {step} {what}"


def _check_checkpoint_round_trip(config, save_dir: str) -> None:
    layout = ParallelConfig(expert=2, zero_stage=2)
    engine = _engine(config, layout)
    for step in range(STEPS):
        _train_step(engine, config, step)
    saved = gather_state_dict(engine.module)
    save_checkpoint(engine, save_dir, "step2")
    # The files alone hold every expert of every rank and every TP shard.
    from_files = read_full_state_dict(os.path.join(save_dir, "step2"), engine.module.config)
    assert_close_dicts(from_files, saved, rtol=0, atol=0, what="checkpoint file")
    next_step = _train_step(engine, config, STEPS)
    after_next = gather_state_dict(engine.module)

    engine = _engine(config, layout)  # fresh weights and optimizer, then the checkpoint
    load_checkpoint(engine, save_dir, "step2")
    assert_close_dicts(gather_state_dict(engine.module), saved, rtol=0, atol=0, what="loaded")
    assert _train_step(engine, config, STEPS) == next_step
    assert_close_dicts(gather_state_dict(engine.module), after_next, 0, 0, what="resumed step")


def _check_export_matches_training_model(config, save_dir: str, layout: ParallelConfig) -> None:
    """A checkpoint of `layout` exports to one directory that loads in one process and computes
    what the training-time model computes, and whose weights file gives every rank back its
    shards."""
    engine = _engine(config, layout)
    for step in range(STEPS):
        _train_step(engine, config, step)
    save_checkpoint(engine, save_dir, "trained")
    tokens = batch(config, STEPS)
    engine.module.eval()
    with torch.no_grad():
        local_loss = parallel_lm_loss(engine.module, data_parallel_share(tokens)).lm
        training_time_loss = data_parallel_mean(local_loss)
    trained = gather_state_dict(engine.module)  # a collective: every rank takes part
    out_dir = os.path.join(save_dir, "export")
    if torch.distributed.get_rank() == 0:
        export_shards(os.path.join(save_dir, "trained"), config, out_dir)
        exported = load_pretrained(out_dir)
        assert_close_dicts(exported.state_dict(), trained, 0, 0, what="exported")
        with torch.no_grad():
            exported_loss = lm_loss(exported(tokens[:, :-1]).logits, tokens[:, 1:])
        # The logged loss is reduced in fp32.
        assert exported_loss.item() == pytest.approx(training_time_loss.item(), rel=1e-7)
    torch.distributed.barrier()
    local = read_local_shards(os.path.join(out_dir, WEIGHTS_FILE), config)
    assert_close_dicts(local, engine.module.state_dict(), 0, 0, what="shards read back")


def _check_deepspeed_contract(config) -> None:
    """What the uses of DeepSpeed beyond its documented API (`moeut_dist.parallel.engine`'s
    docstring) rely on, under TP 2 × EP 2 with ZeRO-2. The groups' check is part of
    `create_engine`; the replaced global norm is checked against one process above."""
    layout = ParallelConfig(tensor=2, expert=2, zero_stage=2)
    fresh = _engine(config, layout)
    # The marker module makes the engine partition experts over their own data-parallel group.
    assert fresh.has_moe_layers
    expert_dp = dist.get_process_group_ranks(parallel_state.get_expert_data_parallel_group())
    zero = fresh.optimizer
    moe_groups = [i for i, group in enumerate(zero.param_groups) if group.get("moe")]
    assert moe_groups
    for i in moe_groups:
        assert dist.get_process_group_ranks(zero.real_dp_process_group[i]) == expert_dp
    # Before any step: AdamW's state made up, then every parameter's moments set and read.
    materialize_optimizer_state(fresh, steps=5)
    assert optimizer_steps(fresh) == 5
    for index, (name, param) in enumerate(fresh.module.named_parameters()):
        value = torch.full(param.shape, float(index), dtype=torch.float32)
        safe_set_full_optimizer_state(param, value, "exp_avg")
        assert torch.equal(safe_get_full_optimizer_state(param, "exp_avg"), value), name
    # After a step, DeepSpeed has mapped only the dense groups; linking maps the experts too.
    trained = _engine(config, layout)
    _train_step(trained, config, 0)
    link_optimizer_state(trained)
    assert optimizer_steps(trained) == 1
    for name, param in trained.module.named_parameters():
        assert safe_get_full_optimizer_state(param, "exp_avg_sq").abs().sum() > 0, name


def _zero_checks(save_dir: str) -> None:
    torch.set_default_dtype(torch.float64)
    config = model_config()
    expected_history, expected_weights = _reference_run(config)
    for layout in (
        ParallelConfig(zero_stage=1),  # DP = 4
        ParallelConfig(zero_stage=2),
        ParallelConfig(tensor=2, zero_stage=1),  # DP = 2
        ParallelConfig(expert=2, zero_stage=2),
        ParallelConfig(expert=4, zero_stage=1),  # 10 experts: 3, 3, 2, 2
        ParallelConfig(tensor=2, expert=2, zero_stage=2, checkpoint_activations=True),
    ):
        _check_layout_trains_like_one_process(config, layout, expected_history, expected_weights)
    _check_bf16_layout_follows_one_process(config, expected_history)
    _check_deepspeed_contract(config)
    _check_checkpoint_round_trip(config, save_dir)
    _check_export_matches_training_model(
        config, save_dir, ParallelConfig(tensor=2, expert=2, zero_stage=2)
    )
    _dense_checks(os.path.join(save_dir, "dense"))


def _dense_checks(save_dir: str) -> None:
    """The dense baseline under TP (heads, FFN units split unevenly: 211 over 2 and 4) and ZeRO-2
    trains like one process; a TP × ZeRO-2 checkpoint exports to the one-process model."""
    config = profiles.get_dense("dense-tiny")
    expected_history, expected_weights = _reference_run(config)
    for layout in (
        ParallelConfig(tensor=2, zero_stage=2),  # DP = 2
        ParallelConfig(zero_stage=2),  # DP = 4
        ParallelConfig(tensor=4, zero_stage=1, checkpoint_activations=True),
    ):
        _check_layout_trains_like_one_process(config, layout, expected_history, expected_weights)
    _check_export_matches_training_model(config, save_dir, ParallelConfig(tensor=2, zero_stage=2))


def test_zero_layouts_train_like_one_process_checkpoints_keep_every_expert_and_export():
    with tempfile.TemporaryDirectory() as save_dir:
        run_distributed(_zero_checks, 4, save_dir)
