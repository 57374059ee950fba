"""`moeut train` in one process: config checks, schedule, FLOPs, the DeepSpeed config, gradient
accumulation, exact resume, NaN handling, interrupted checkpoint writes and untrusted checkpoint
files."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from moeut_dist import arch, profiles
from moeut_dist.checksums import CHECKSUMS_FILE, record_checksums
from moeut_dist.cli import main as moeut
from moeut_dist.config import ConfigError, MoEUTConfig
from moeut_dist.data import read_manifest
from moeut_dist.evaluate import evaluate_shards, load_model_and_tokenizer
from moeut_dist.export import WEIGHTS_FILE, load_pretrained, save_pretrained
from moeut_dist.generate import SamplingConfig, generate
from moeut_dist.model import DenseLM, MoEUTLM
from moeut_dist.parallel.build import ParallelLoss, build_model, parallel_lm_loss
from moeut_dist.parallel.engine import (
    UnsafeCheckpointFileError,
    create_engine,
    deepspeed_config,
    load_initial_weights,
)
from moeut_dist.parallel.layout import ParallelConfig, initialize
from moeut_dist.train import loop
from moeut_dist.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    is_complete,
    latest_checkpoint,
)
from moeut_dist.train.config import (
    OptimSection,
    ScheduleSection,
    check_init_from,
    check_run,
    load_config,
)
from moeut_dist.train.consolidate import export_checkpoint
from moeut_dist.train.metrics import read_run_metrics
from moeut_dist.train.schedule import lr_multiplier
from tests.distributed_utils import run_distributed
from tests.train_helpers import (
    REPO,
    assert_same_run,
    make_corpus,
    run_config,
    run_result,
    write_config,
)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("train_corpus"))


def _train(config: dict, path) -> None:
    loop.train(load_config(write_config(config, path)))


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A model directory of the runs' model (`run_config`, 400 pieces), with other weights."""
    torch.manual_seed(99)
    model = MoEUTLM(profiles.get("tiny", vocab_size=400, kernel="torch"))
    return save_pretrained(model, tmp_path_factory.mktemp("other_model"))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The reference: six steps in one go, checkpoints every two."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    path = write_config(run_config(corpus, directory / "run"), directory / "run.yaml")
    loop.train(load_config(path))
    return run_result(path)


# --- configuration ---------------------------------------------------------------------------


def test_config_reads_yaml_and_dotted_overrides(corpus, tmp_path):
    path = write_config(run_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    config = load_config(path, ["optim.lr=1e-3", "parallel.expert=2", "model.d_model=32"])
    assert config.optim.lr == 1e-3 and config.parallel.expert == 2
    assert config.model.overrides["d_model"] == 32
    assert config.schedule.steps == 6 and config.optim.betas == (0.9, 0.999)
    plan = check_run(config, world_size=2)
    assert (plan.model.vocab_size, plan.data_parallel, plan.grad_accumulation) == (400, 2, 2)
    assert load_config(None, ["data.shard_dir=x", "data.tokenizer=y"]).optim.lr == 2.5e-4


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        (["optim.learning_rate=1"], 1, "unknown key(s) ['optim.learning_rate']"),
        (["modle.profile=tiny"], 1, "unknown key(s) ['modle']"),
        (["model.d_modle=3"], 1, "unknown key(s) ['model.d_modle']"),
        (["optim.lr=fast"], 1, "optim.lr must be float"),
        (["schedule.steps=2.5"], 1, "schedule.steps must be int"),
        (["seed=-1"], 1, "seed must be in 0..2**32 - 1, got -1"),
        (["precision=fp16"], 1, "precision must be one of ['auto', 'bf16', 'fp32']"),
        (["model.profile=dense-44m"], 1, "'dense-44m' is a dense profile"),
        (["model.arch=dense", "model.kernel=torch"], 1, "['model.kernel'] for model.arch dense"),
        (["parallel.expert=3"], 2, "world size 2 is not a multiple"),
        (["parallel.tensor=4"], 4, "does not divide n_heads"),
        (["data.global_batch_size=6"], 4, "not a multiple of micro_batch_size 2"),
        (["data.seq_len=64"], 1, "built with seq_len 32"),
        (["data.shard_dir=/nonexistent"], 1, "manifest.json not found"),
        (["data.tokenizer=/nonexistent.model"], 1, "does not exist"),
        (["model.vocab_size=256"], 1, "smaller than the tokenizer's 400"),
        (["optim.lr=-1"], 1, "optim.lr must be a finite number ≥ 0, got -1.0"),
        (["optim.lr=nan"], 1, "optim.lr must be a finite number ≥ 0, got nan"),
        (["optim.betas=[0.9, 1.5]"], 1, "optim.betas must be two numbers in [0, 1)"),
        (["optim.eps=0"], 1, "optim.eps must be a finite number > 0"),
        (["optim.weight_decay=-0.1"], 1, "optim.weight_decay must be a finite number ≥ 0"),
        (["optim.grad_clip=-1"], 1, "optim.grad_clip must be a finite number ≥ 0 (0: no"),
        (["data.prefetch_shards=-1"], 1, "data.prefetch_shards and profiling.steps must not be"),
        (["data.prefetch_shards=one"], 1, "data.prefetch_shards must be int"),
    ],
)
def test_config_errors_name_the_problem(corpus, tmp_path, overrides, world_size, message):
    path = write_config(run_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    with pytest.raises(ConfigError) as error:
        check_run(load_config(path, overrides), world_size)
    assert message in str(error.value)


def test_text_overrides_are_taken_as_written(corpus, tmp_path):
    path = write_config(run_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    config = load_config(
        path, ["out_dir=runs/exp #2", "checkpoint.resume=2024", "init_from=a: b", "seed=7"]
    )
    assert (config.out_dir, config.checkpoint.resume, config.init_from) == (
        "runs/exp #2", "2024", "a: b",
    )  # fmt: skip
    assert config.seed == 7 and load_config(path, ["init_from=null"]).init_from is None
    dated = tmp_path / "dated.yaml"
    dated.write_text(path.read_text() + "out_dir: 2024-05-01\n")  # YAML reads a date
    assert load_config(dated).out_dir == "2024-05-01"


def test_world_size_without_a_launcher_is_refused(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 is set but RANK is not"):
        loop.world_size_from_environment()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert loop.world_size_from_environment() == 1


def test_unreadable_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)


def test_val_split_smaller_than_a_micro_batch_per_rank_is_refused(corpus, tmp_path):
    val_samples = read_manifest(corpus.shard_dir).split("val").samples
    path = write_config(run_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    world = val_samples // 2 + 1  # some rank's share is less than a micro-batch of 2
    overrides = [f"data.global_batch_size={2 * world}"]
    with pytest.raises(ConfigError, match=f"val split has {val_samples} samples, less than one"):
        check_run(load_config(path, overrides), world_size=world)
    check_run(load_config(path, [*overrides, "eval.every=0"]), world_size=world)
    check_run(load_config(path, [f"data.global_batch_size={2 * (world - 1)}"]), world - 1)


def test_pruning_keeps_this_runs_newest_and_leaves_an_abandoned_runs_alone(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        directory = root / f"step_{step:08d}"
        directory.mkdir(parents=True)
        (directory / "done_rank00000").write_text("1")
        record_checksums(directory)
    manager = object.__new__(CheckpointManager)  # _prune needs only the root and `keep`
    manager.root, manager.keep = root, 2
    (root / "step_00000001").mkdir()  # a save that crashed
    # A run resumed from step 2 has just saved step 4; step 6 is left from the abandoned run:
    # it neither displaces this run's own step 2 nor is deleted.
    manager._prune(root / "step_00000004")
    assert sorted(d.name for d in root.glob("step_*")) == [
        "step_00000002", "step_00000004", "step_00000006",
    ]  # fmt: skip
    manager.keep = 1
    manager._prune(root / "step_00000004")
    assert sorted(d.name for d in root.glob("step_*")) == ["step_00000004", "step_00000006"]


def _run_model(path: Path, overrides: list[str] = ()) -> MoEUTConfig:
    return check_run(load_config(path, overrides), world_size=1).model


def test_init_from_needs_a_model_directory_of_the_same_model(
    corpus, tmp_path, other_model_dir, monkeypatch
):
    path = write_config(run_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    # How the model is computed and trained (kernels, dropouts, regulariser weights) may differ.
    training_only = ["model.kernel=auto", "model.expert_dropout=0.1", "model.entropy_reg=0.1"]
    check_init_from(other_model_dir, _run_model(path, training_only))
    # A run that starts afresh checks its init_from before it builds the model.
    monkeypatch.setattr(loop, "build_model", lambda *_, **__: pytest.fail("model was built"))
    with pytest.raises(ConfigError, match=r"has no config\.json; not a model directory"):
        loop.train(load_config(path, [f"init_from={tmp_path}"]))
    truncated = tmp_path / "truncated"
    shutil.copytree(other_model_dir, truncated)
    weights = (truncated / WEIGHTS_FILE).read_bytes()
    (truncated / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ConfigError, match=r"model\.safetensors is corrupt: its sha256 is"):
        check_init_from(truncated, _run_model(path))
    (truncated / CHECKSUMS_FILE).unlink()  # as written before directories recorded checksums
    with pytest.raises(ConfigError, match=r"model\.safetensors is damaged \(.*incomplete"):
        check_init_from(truncated, _run_model(path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.vocab_size=420"], "holds a model with vocab_size = 400, the run's model has "),
        (["model.experts_per_token=2"], "experts_per_token = 4, the run's model has experts_"),
    ],
)
def test_init_from_a_different_model_is_refused_naming_the_field(
    corpus, tmp_path, other_model_dir, overrides, message
):
    path = write_config(run_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match="init_from: ") as error:
        check_init_from(other_model_dir, _run_model(path, overrides))
    assert message in str(error.value)


def test_init_from_sets_the_fp32_master_weights_exactly(corpus, tmp_path, other_model_dir):
    """In bf16 the module holds rounded weights; ZeRO's fp32 master copy, which the optimizer
    updates, must start from the model directory's weights themselves."""
    config = load_config(
        write_config(run_config(corpus, tmp_path / "run", precision="bf16"), tmp_path / "r.yaml")
    )
    model_config = _run_model(tmp_path / "r.yaml")
    weights = load_file(other_model_dir / WEIGHTS_FILE)
    with loop.distributed_session():
        initialize(config.parallel, model_config)
        model = build_model(model_config, config.parallel, seed=0)
        engine = create_engine(model, config.parallel, config.optim, 2, bf16=True)
        load_initial_weights(engine, other_model_dir / WEIGHTS_FILE)
        for name, param in engine.module.named_parameters():
            assert param.dtype == torch.bfloat16
            assert torch.equal(param, weights[name].to(torch.bfloat16)), name
            assert torch.equal(safe_get_full_fp32_param(param), weights[name]), name


def test_config_error_stops_the_command_before_any_work(corpus, tmp_path):
    path = write_config(run_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "moeut_dist.cli", "train", "--config", str(path), "optim.lr=x"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "invalid configuration: optim.lr must be float" in result.stderr
    assert not (tmp_path / "run").exists()


def test_schedule_warms_up_then_follows_the_cosine_to_its_floor():
    schedule = ScheduleSection(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, schedule) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule) == 1.0
    middle = 10 + (99 - 10) / 2
    assert lr_multiplier(int(middle), schedule) == pytest.approx(0.55, abs=0.02)
    assert lr_multiplier(99, schedule) == pytest.approx(0.1)
    values = [lr_multiplier(step, schedule) for step in range(10, 100)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize(
    ("kind", "shape", "expected"),
    [
        # steps 10, warm-up 2: 0.5, 1 | stable 1, 1, 1, 1 | decay over 4 steps to 0.1
        ("wsd", "linear", [0.5, 1, 1, 1, 1, 1, 0.775, 0.55, 0.325, 0.1]),
        ("wsd", "cosine", [0.5, 1, 1, 1, 1, 1, 0.1 + 0.9 * (0.5 + 0.5**1.5), 0.55, None, 0.1]),
        ("wsd", "sqrt", [0.5, 1, 1, 1, 1, 1, 0.55, 1 - 0.9 * 0.5**0.5, None, 0.1]),
    ],
)
def test_wsd_schedule_warms_up_holds_then_decays_to_its_floor_on_the_last_step(
    kind, shape, expected
):
    schedule = ScheduleSection(
        kind=kind, steps=10, warmup_steps=2, decay_steps=4, decay_shape=shape, min_lr_ratio=0.1
    )
    got = [lr_multiplier(step, schedule) for step in range(10)]
    for step, want in enumerate(expected):
        if want is not None:
            assert got[step] == pytest.approx(want), f"step {step}: {got}"
    assert got[6:] == sorted(got[6:], reverse=True)
    # Edge cases: no warm-up starts stable at the full rate; one decay step is the floor itself;
    # no decay at all stays at the full rate to the end.
    no_warmup = ScheduleSection(kind="wsd", steps=4, warmup_steps=0, decay_steps=1)
    assert [lr_multiplier(s, no_warmup) for s in range(4)] == [1, 1, 1, pytest.approx(0.1)]
    constant = ScheduleSection(kind="wsd", steps=4, warmup_steps=1, decay_steps=0)
    assert [lr_multiplier(s, constant) for s in range(4)] == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"decay_steps": 5}, "decay_steps is the wsd decay's length; set kind: wsd"),
        ({"kind": "wsd", "decay_steps": 99}, "decay_steps must be in 0..steps − warmup_steps (90)"),
        ({"kind": "step"}, "schedule.kind must be one of ['cosine', 'wsd']"),
        ({"kind": "wsd", "decay_shape": "exp"}, "schedule.decay_shape must be one of"),
    ],
)
def test_schedule_settings_out_of_range_are_refused(values, message):
    with pytest.raises(ConfigError) as error:
        ScheduleSection.from_dict({"steps": 100, "warmup_steps": 10, **values}, "schedule")
    assert message in str(error.value)


def _forward_flops(config, seq_len: int = 1024) -> float:
    return arch.of(config).summary(config, seq_len).forward_flops_per_token


def test_flops_count_only_the_selected_experts():
    config = profiles.get("moeut-244m")
    more_experts = profiles.get("moeut-244m", n_experts=2 * config.n_experts)
    extra = _forward_flops(more_experts) - _forward_flops(config)
    # Only the selection logits grow with the number of experts; the experts a token does not
    # select cost nothing.
    assert extra == 2 * config.d_model * config.n_experts * config.n_layers
    more_selected = profiles.get("moeut-244m", experts_per_token=config.experts_per_token + 1)
    extra = _forward_flops(more_selected) - _forward_flops(config)
    assert extra == 4 * config.d_model * config.expert_size * config.n_layers


@pytest.mark.parametrize("name", ["dense-44m", "dense-tiny"])
def test_dense_flops_are_two_per_weight_plus_attention_over_the_context(name):
    """2 FLOPs per weight of every matmul a token passes (the layers' linears and the LM head),
    plus the scores and weighted sum over the whole context."""
    config = profiles.get_dense(name)
    with torch.device("meta"):
        model = arch.of(config).model_class(config)
    matmul_weights = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    attention = 2 * 2 * config.n_heads * config.head_dim * 1024 * config.n_layers
    assert _forward_flops(config) == 2 * matmul_weights + attention
    summary = arch.of(config).summary(config, 1024)
    assert (
        summary.parameters
        == summary.active_parameters
        == sum(p.numel() for p in model.parameters())
    )


def test_deepspeed_config_accumulates_and_checks_bf16_overflow():
    layout, settings = ParallelConfig(zero_stage=2), OptimSection()
    config = deepspeed_config(layout, settings, 2, 3, data_parallel_size=4, bf16=True)
    assert (config["train_batch_size"], config["gradient_accumulation_steps"]) == (24, 3)
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 40_000_000}
    assert deepspeed_config(layout, settings, 2)["bf16"] == {"enabled": False}
    # The reduce bucket, allocated for every backward, is no larger than the model's gradients.
    small = deepspeed_config(layout, settings, 2, gradient_elements=1000)
    assert small["zero_optimization"]["reduce_bucket_size"] == 1000
    # DeepSpeed's own parser accepts it (it rejects unknown keys) and reads the same numbers.
    parsed = DeepSpeedConfig(deepspeed_config(layout, settings, 2, 3, bf16=True))
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps) == (6, 3)
    assert parsed.zero_config.reduce_bucket_size == 40_000_000
    assert parsed.bfloat16_config.enabled and parsed.bfloat16_config.check_grad_overflow


# --- runs in this process ----------------------------------------------------------------------


def _validate_with_a_rank_short_of_batches(config_path: Path) -> tuple[float, int]:
    """On 2 data-parallel ranks, rank 1's validation loader ends after one batch (as when a
    corrupt shard is skipped); returns rank 0's loss and how many forwards it ran."""
    config = load_config(config_path)
    plan = check_run(config, world_size=2)
    initialize(config.parallel, plan.model)
    engine = types.SimpleNamespace(
        module=build_model(plan.model, config.parallel, seed=0), device=torch.device("cpu")
    )
    forward = loop.parallel_lm_loss
    forwards = itertools.count()

    def counted(*args):
        next(forwards)
        return forward(*args)

    loop.parallel_lm_loss = counted
    loss = loop.validation_loss(engine, config, _EndingEarlyOnRank1(config), None)
    return loss, next(forwards)


class _EndingEarlyOnRank1(loop.ValidationBatches):
    def __iter__(self):
        batches = super().__iter__()
        return itertools.islice(batches, 1) if dist.get_rank() == 1 else batches


def test_validation_runs_as_many_batches_on_every_rank(corpus, tmp_path):
    """Each forward holds collectives: a rank running more of them than another would hang."""
    config = run_config(corpus, tmp_path / "run", data={"global_batch_size": 4})
    path = write_config(config, tmp_path / "run.yaml")
    loss, forwards = run_distributed(_validate_with_a_rank_short_of_batches, 2, path)
    assert forwards == 1 and math.isfinite(loss)


def test_accumulated_micro_batches_train_like_one_batch(corpus, tmp_path):
    """Two micro-batches of 2 per step update the model as one batch of the same 4 sequences:
    DeepSpeed must step once per 2 micro-batches, on the mean of their gradients (a sum would
    show in the gradient norm, which Adam and clipping would otherwise hide)."""
    results = []
    for micro_batch_size in (2, 4):
        config = run_config(
            corpus,
            tmp_path / f"micro{micro_batch_size}",
            data={"global_batch_size": 4, "micro_batch_size": micro_batch_size},
            schedule={"steps": 3, "warmup_steps": 0},
            eval={"every": 0},
        )
        path = write_config(config, tmp_path / f"micro{micro_batch_size}.yaml")
        assert check_run(load_config(path), 1).grad_accumulation == 4 // micro_batch_size
        loop.train(load_config(path))
        results.append(run_result(path))
    accumulated, whole = results
    for got, want in zip(accumulated.records, whole.records, strict=True):
        for key in ("step", "loss", "reg_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    # Adam turns fp32 rounding in near-zero gradients into update differences far below lr;
    # an extra or a missing update would move weights by about lr = 3e-3.
    for name, tensor in whole.weights.items():
        torch.testing.assert_close(accumulated.weights[name], tensor, rtol=1e-4, atol=1e-4)


def _synchronising_train_step(engine, batches, plan) -> tuple[float, float]:
    """The training step as it was before the host syncs were removed: an all-reduce and two
    `.item()` per micro-batch. The oracle of what the step computes."""
    lm = reg = 0.0
    for _ in range(plan.grad_accumulation):
        loss = parallel_lm_loss(engine.module, next(batches))
        engine.backward(loss.total)
        engine.step()
        logged = torch.stack([loss.lm, loss.reg])
        dist.all_reduce(logged)  # one process: data parallel is the world
        logged /= dist.get_world_size()
        lm += logged[0].item() / plan.grad_accumulation
        reg += logged[1].item() / plan.grad_accumulation
    return lm, reg


class _LoopStalls(TorchDispatchMode):
    """Host syncs (`.item()`) and all-reduces that the loop, the loss and the model call: not
    DeepSpeed's, nor the gradient norm it calls once per optimizer step (`parallel/engine.py`),
    nor the ones inside the expert custom ops."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.stalls = {
            torch.ops.aten._local_scalar_dense.default,
            torch.ops.c10d.allreduce_.default,
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.stalls:
            frame = sys._getframe(1)
            while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back
            caller = frame.f_code.co_filename if frame is not None else ""
            ours = f"{os.sep}moeut_dist{os.sep}" in caller or caller == __file__  # the oracle
            if ours and not caller.endswith("engine.py"):
                self.calls.append(f"{func} from {caller}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


def _three_steps(config, plan, step) -> tuple[list, dict[str, torch.Tensor], list[str]]:
    engine = create_engine(
        build_model(plan.model, config.parallel, seed=config.seed),
        config.parallel,
        config.optim,
        config.data.micro_batch_size,
        gradient_accumulation_steps=plan.grad_accumulation,
        bf16=False,
    )
    batches = iter(loop.make_loader(config, "train", epochs=None))
    results = []
    with _LoopStalls() as stalls:
        for _ in range(3):
            results.append(step(engine, batches, plan))
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return results, weights, stalls.calls


def test_the_step_without_host_syncs_computes_what_the_synchronising_one_did(corpus, tmp_path):
    """Same losses (as logged), same updated weights, bit for bit; and the loop itself makes no
    host sync or collective per micro-batch (4 per step here)."""
    config = load_config(write_config(run_config(corpus, tmp_path / "run"), tmp_path / "r.yaml"))
    plan = check_run(config, 1)
    assert plan.grad_accumulation == 4
    with loop.distributed_session():
        initialize(config.parallel, plan.model)
        expected, expected_weights, old_stalls = _three_steps(
            config, plan, _synchronising_train_step
        )
        losses, weights, stalls = _three_steps(config, plan, loop.train_step)
        logged = loop.step_losses(losses)
    assert len(old_stalls) == 3 * 4 * 3  # the detector sees the old step's stalls
    assert stalls == []
    assert logged == expected
    for name, tensor in expected_weights.items():
        assert torch.equal(weights[name], tensor), name


def test_run_logs_metrics_and_keeps_the_last_checkpoints(uninterrupted, corpus, tmp_path):
    records = uninterrupted.records
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[0]["lr"] == pytest.approx(1.5e-3) and records[-1]["lr"] == pytest.approx(3e-4)
    for record in records:
        assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
        assert record["grad_norm"] > 0 and record["tokens_per_second"] > 0
        assert record["model_flops_per_second"] > 0 and "mfu" not in record  # no peak FLOP/s on CPU
        assert len(record["expert_share"]) == 2  # the tiny profile's two group layers
        assert all(sum(s) == pytest.approx(1.0) for s in record["expert_share"])
        assert all(0.5 < h <= 1.0 for h in record["expert_entropy"])
        assert record["ep_bytes_sent"] == 0.0  # one process: nothing leaves it
    assert [step for step, _ in uninterrupted.val] == [3, 6]
    assert all(0 < loss < math.log(400) + 1 for _, loss in uninterrupted.val)


def test_stopped_and_resumed_run_is_bit_identical(uninterrupted, corpus, tmp_path):
    config = run_config(corpus, tmp_path / "run")
    _train({**config, "stop_after_steps": 3}, tmp_path / "first.yaml")
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000003"
    # The checkpoint wins over `init_from`, which is not even read (it may be gone by now), and
    # recomputing activations in backward changes nothing a checkpoint holds.
    second = {
        **config,
        "init_from": str(tmp_path / "deleted_model"),
        "parallel": {**config.get("parallel", {}), "checkpoint_activations": True},
    }
    path = write_config(second, tmp_path / "second.yaml")
    loop.train(load_config(path))
    assert_same_run(run_result(path), uninterrupted)
    kept = sorted(d.name for d in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006"]


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one(
    uninterrupted, corpus, tmp_path, monkeypatch
):
    write_rank_state = CheckpointManager._write_rank_state

    def crash_at_step_4(self, directory, state, *more):
        if state.step == 4:
            (directory / "trainer_rank00000.json").write_text('{"step": 4, "loa')
            raise OSError("disk full")
        write_rank_state(self, directory, state, *more)

    monkeypatch.setattr(CheckpointManager, "_write_rank_state", crash_at_step_4)
    config = run_config(corpus, tmp_path / "run")
    with pytest.raises(OSError, match="disk full"):
        _train(config, tmp_path / "run.yaml")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step_00000002"
    assert not is_complete(checkpoints / "step_00000004")

    monkeypatch.undo()
    path = write_config(config, tmp_path / "run.yaml")
    loop.train(load_config(path))
    assert_same_run(run_result(path), uninterrupted)


def test_rewriting_a_checkpoint_the_pointer_names_never_leaves_it_on_a_partial_one(
    corpus, tmp_path, monkeypatch
):
    """A run resumed from an older checkpoint rewrites the newer step directories; a crash
    in the middle must leave the pointer on a complete checkpoint of its own."""
    config = run_config(corpus, tmp_path / "run", schedule={"steps": 4}, checkpoint={"keep": 3})
    _train(config, tmp_path / "run.yaml")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step_00000004"

    write_rank_state = CheckpointManager._write_rank_state

    def crash_at_step_4(self, directory, state, *more):
        if state.step == 4:
            raise OSError("disk full")
        write_rank_state(self, directory, state, *more)

    monkeypatch.setattr(CheckpointManager, "_write_rank_state", crash_at_step_4)
    resumed = {
        **config,
        "checkpoint": {**config["checkpoint"], "resume": str(checkpoints / "step_00000002")},
    }
    with pytest.raises(OSError, match="disk full"):
        _train(resumed, tmp_path / "resumed.yaml")
    assert latest_checkpoint(checkpoints).name == "step_00000002"


def test_bf16_run_resumes_bit_identically_and_exports_in_bf16(corpus, tmp_path):
    """bf16 weights and activations, fp32 master weights and Adam state in ZeRO's partitions:
    all of it is checkpointed, so a resumed run continues bit for bit."""
    config = run_config(corpus, tmp_path / "whole", precision="bf16", eval={"every": 0})
    whole_path = write_config(config, tmp_path / "whole.yaml")
    loop.train(load_config(whole_path))
    whole = run_result(whole_path)
    assert {t.dtype for t in whole.weights.values()} == {torch.bfloat16}
    assert whole.losses[-1][1] < whole.losses[0][1]

    parts = {**config, "out_dir": str(tmp_path / "parts")}
    _train({**parts, "stop_after_steps": 3}, tmp_path / "first.yaml")
    parts_path = write_config(parts, tmp_path / "parts.yaml")
    loop.train(load_config(parts_path))
    assert_same_run(run_result(parts_path), whole)

    model = load_pretrained(export_checkpoint(tmp_path / "whole", tmp_path / "model"))
    assert model.embedding.weight.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, whole.weights[name]), name


# --- the dense baseline, trained the same way ---------------------------------------------------


def _dense_config(corpus, out_dir: Path, **sections) -> dict:
    config = run_config(corpus, out_dir, **sections)
    config["model"] = {"arch": "dense", "profile": "dense-tiny"}
    return config


def test_expert_parallelism_on_a_dense_model_is_refused_by_name(corpus, tmp_path, monkeypatch):
    path = write_config(_dense_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    monkeypatch.setattr(loop, "build_model", lambda *_, **__: pytest.fail("model was built"))
    message = "expert parallelism (parallel.expert=2) needs experts, and a dense model has none"
    with pytest.raises(ConfigError) as error:
        loop.train(load_config(path, ["parallel.expert=2"]))
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


def test_init_from_a_model_of_another_architecture_is_refused(corpus, tmp_path, other_model_dir):
    path = write_config(_dense_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match="holds a moeut model, the run's model is dense"):
        check_init_from(other_model_dir, _run_model(path))


@pytest.fixture(scope="module")
def dense_uninterrupted(corpus, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dense")
    path = write_config(_dense_config(corpus, directory / "run"), directory / "run.yaml")
    loop.train(load_config(path))
    return run_result(path), directory / "run"


def test_dense_run_logs_its_summary_and_counts_mfu_from_it(dense_uninterrupted):
    result, out_dir = dense_uninterrupted
    config = profiles.get_dense("dense-tiny", vocab_size=400)  # the corpus tokenizer's
    summary = arch.of(config).summary(config, 32)
    (record,) = read_run_metrics(out_dir, "model")
    assert record == {"kind": "model", "step": 0, **summary.to_dict()}
    assert record["parameters"] == sum(p.numel() for p in DenseLM(config).parameters())
    assert [step for step, *_ in result.losses] == [1, 2, 3, 4, 5, 6]
    assert result.losses[-1][1] < result.losses[0][1]
    for train in result.records:
        assert train["reg_loss"] == 0.0 and "expert_share" not in train
        flops_per_token = train["model_flops_per_second"] / train["tokens_per_second"]
        assert flops_per_token == pytest.approx(3 * summary.forward_flops_per_token)


def test_dense_run_resumes_bit_identically(dense_uninterrupted, corpus, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="moeut_dist.train.loop")
    config = _dense_config(corpus, tmp_path / "run")
    _train({**config, "stop_after_steps": 3}, tmp_path / "first.yaml")
    path = write_config(config, tmp_path / "second.yaml")
    loop.train(load_config(path))
    assert_same_run(run_result(path), dense_uninterrupted[0])
    config = profiles.get_dense("dense-tiny", vocab_size=400)
    summary = arch.of(config).summary(config, 32)
    described = [r for r in caplog.records if r.getMessage() == f"model {summary.describe()}"]
    assert len(described) == 2  # each session


def test_dense_run_exports_for_generate_and_eval(dense_uninterrupted, corpus, tmp_path, capsys):
    result, out_dir = dense_uninterrupted
    assert moeut(["export", str(out_dir), str(tmp_path / "model")]) == 0
    model, tokenizer = load_model_and_tokenizer(tmp_path / "model")
    assert isinstance(model, DenseLM)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, result.weights[name]), name
    # Greedy decoding with the KV cache follows the model's full forward, token by token.
    tokens = torch.tensor([[tokenizer.eod_id, *tokenizer.encode("the")]])
    sampling = SamplingConfig(max_new_tokens=6, temperature=0)
    generated = torch.stack(list(generate(model, tokens, sampling)), dim=1)
    with torch.no_grad():
        for new in generated[0]:
            assert model(tokens).logits[0, -1].argmax() == new
            tokens = torch.cat([tokens, new.view(1, 1)], dim=1)
    capsys.readouterr()
    assert moeut(["generate", str(tmp_path / "model"), "--prompt", "the", "--max-tokens", "4",
                  "--temperature", "0"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("the")
    perplexity = evaluate_shards(model, tokenizer, corpus.shard_dir).perplexity
    assert 1 < perplexity < 300
    assert moeut(["export", str(out_dir), str(tmp_path / "official"), "--official"]) == 2
    assert "the authors' checkpoint format exists for MoEUT, not dense" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_step_run(corpus, tmp_path_factory):
    """A finished two-step run (checkpoint at step 2) to damage copies of."""
    directory = tmp_path_factory.mktemp("two_steps")
    config = run_config(corpus, directory / "run", schedule={"steps": 2}, eval={"every": 0})
    _train(config, directory / "run.yaml")
    return config


def _damage(path, content: str | None) -> None:
    """Damage a checkpoint file as if it had been written so (its checksum recorded too)."""
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    if path.parent.name.startswith("step_"):
        record_checksums(path.parent)


@pytest.mark.parametrize(
    ("damaged", "content", "message"),
    [
        ("latest.json", '{"tag": "step_0000', "latest.json is damaged (JSONDecodeError"),
        ("latest.json", '{"tag": "../../elsewhere"}', "not a checkpoint directory beside it"),
        ("step_00000002/done_rank00000", "", "step_00000002, which is not complete"),
        ("step_00000002/trainer_rank00000.json", None, "rank 0's trainer state is missing"),
        ("step_00000002/trainer_rank00000.json", '{"format": 1}', "KeyError: 'world_size'"),
        ("step_00000002/done_rank00000", "2", "its completion markers name 2 ranks"),
    ],
)
def test_damaged_or_foreign_checkpoint_is_refused_before_the_model_is_built(
    two_step_run, tmp_path, monkeypatch, damaged, content, message
):
    source = Path(two_step_run["out_dir"])
    shutil.copytree(source, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    _damage(checkpoints / damaged, content)
    if content == "2":  # a complete checkpoint of two ranks
        (checkpoints / "step_00000002" / "done_rank00001").write_text("2")
        record_checksums(checkpoints / "step_00000002")
    monkeypatch.setattr(loop, "build_model", lambda *_, **__: pytest.fail("model was built"))
    config = {**two_step_run, "out_dir": str(tmp_path / "run")}
    config["schedule"] = {**config["schedule"], "steps": 4}
    with pytest.raises(CheckpointError) as error:
        _train(config, tmp_path / "resume.yaml")
    assert message in str(error.value)


def test_checkpoint_of_another_format_is_refused_naming_it(two_step_run, tmp_path, monkeypatch):
    shutil.copytree(two_step_run["out_dir"], tmp_path / "run")
    state_file = tmp_path / "run/checkpoints/step_00000002/trainer_rank00000.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "format": 1}))
    record_checksums(state_file.parent)
    monkeypatch.setattr(loop, "build_model", lambda *_, **__: pytest.fail("model was built"))
    config = {**two_step_run, "out_dir": str(tmp_path / "run")}
    with pytest.raises(CheckpointError, match="checkpoint format 1, from another version"):
        _train(config, tmp_path / "resume.yaml")


def _as_format_2(checkpoint: Path) -> None:
    """Rewrite a one-process checkpoint as the previous version (format 2) wrote it. Generated
    rather than committed: its DeepSpeed files and weight shards come from the same code in
    both versions (a committed copy would pin binary files of one torch and DeepSpeed release),
    so what differs is only what is rewritten here: no portable/, no AdamW step count, and
    the loader's per-worker positions of the previous data order."""
    shutil.rmtree(checkpoint / "portable")
    path = checkpoint / "trainer_rank00000.json"
    values = json.loads(path.read_text())
    del values["optimizer_steps"]
    order = values["loader"]["order"]
    layout = {**order, "batch_size": 2, "dp_rank": 0, "dp_world_size": 1, "num_workers": 0}
    values["loader"] = {
        "format": 2,
        "layout": layout,
        "next_worker": 0,
        "positions": [values["loader"]["position"]],
        "skipped_shards": [0],
    }
    path.write_text(json.dumps({**values, "format": 2}))
    (checkpoint / "checksums.json").unlink()  # recorded from this version on


def test_checkpoint_of_the_previous_format_resumes_under_its_own_layout_only(
    two_step_run, tmp_path
):
    runs = {}
    for name in ("current", "previous"):
        shutil.copytree(two_step_run["out_dir"], tmp_path / name)
        if name == "previous":
            _as_format_2(tmp_path / name / "checkpoints" / "step_00000002")
        config = {**two_step_run, "out_dir": str(tmp_path / name)}
        config["schedule"] = {**config["schedule"], "steps": 3}
        runs[name] = config
    zero_2 = {**runs["previous"], "parallel": {"zero_stage": 2}}
    earlier = r"earlier version of moeut-dist \(checkpoint format 2"
    with pytest.raises(CheckpointError, match=earlier):
        _train(zero_2, tmp_path / "zero2.yaml")
    results = {}
    for name, config in runs.items():
        _train(config, tmp_path / f"{name}.yaml")
        results[name] = run_result(tmp_path / f"{name}.yaml")
    assert_same_run(results["previous"], results["current"])


def test_resume_with_other_data_settings_is_refused_before_the_model_is_built(
    two_step_run, tmp_path, monkeypatch
):
    shutil.copytree(two_step_run["out_dir"], tmp_path / "run")
    monkeypatch.setattr(loop, "build_model", lambda *_, **__: pytest.fail("model was built"))
    config = {**two_step_run, "out_dir": str(tmp_path / "run")}
    config["seed"] = 4
    config["schedule"] = {**config["schedule"], "steps": 4}
    with pytest.raises(CheckpointError, match=r"another data order \(seed: 3 saved, 4 now\)"):
        _train(config, tmp_path / "resume.yaml")


def test_checkpoints_without_their_pointer_are_named_not_abandoned(
    two_step_run, tmp_path, monkeypatch
):
    shutil.copytree(two_step_run["out_dir"], tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "latest.json").unlink()
    monkeypatch.setattr(loop, "build_model", lambda *_, **__: pytest.fail("model was built"))
    config = {**two_step_run, "out_dir": str(tmp_path / "run")}
    with pytest.raises(CheckpointError) as error:
        _train(config, tmp_path / "auto.yaml")
    assert "complete checkpoints but no latest.json" in str(error.value)
    assert f"checkpoint.resume={checkpoints / 'step_00000002'}" in str(error.value)


def test_a_damaged_pointer_yields_to_an_explicit_choice_and_a_fresh_start_keeps_the_old_log(
    two_step_run, tmp_path
):
    shutil.copytree(two_step_run["out_dir"], tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "latest.json").write_text("garbage")
    config = {**two_step_run, "out_dir": str(tmp_path / "run")}
    named = {
        **config,
        "checkpoint": {**config["checkpoint"], "resume": str(checkpoints / "step_00000002")},
    }
    _train(named, tmp_path / "named.yaml")  # resumes at the last step: nothing left to do
    old_log = (tmp_path / "run" / "metrics.jsonl").read_text()
    (tmp_path / "run" / "tensorboard").mkdir()
    (tmp_path / "run" / "tensorboard" / "events.earlier").write_text("an earlier run's")

    never = {**config, "checkpoint": {**config["checkpoint"], "resume": "never"}}
    _train(never, tmp_path / "never.yaml")
    assert latest_checkpoint(checkpoints).name == "step_00000002"
    assert (tmp_path / "run" / "metrics.1.jsonl").read_text() == old_log
    assert (tmp_path / "run" / "tensorboard.1" / "events.earlier").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()  # this run logs none
    assert [r["step"] for r in read_run_metrics(tmp_path / "run")] == [1, 2]


def test_every_checkpoint_file_is_on_disk_before_its_completion_marker(
    corpus, tmp_path, monkeypatch
):
    flushed = []
    fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        fsync(descriptor)
        path = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        # Files written atomically are flushed under their temporary name, then renamed.
        if path.name.startswith(".") and path.name.endswith(".partial"):
            path = path.with_name(path.name[1 : -len(".partial")])
        flushed.append(path)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    schedule = {"steps": 1, "warmup_steps": 0}
    config = run_config(corpus, tmp_path / "run", schedule=schedule, eval={"every": 0})
    _train(config, tmp_path / "run.yaml")
    directory = latest_checkpoint(tmp_path / "run" / "checkpoints")
    marker = flushed.index(directory / "done_rank00000")
    # The checksums are recorded once every rank's marker is there.
    files = {p for p in directory.rglob("*") if p.is_file()}
    files -= {directory / "done_rank00000", directory / CHECKSUMS_FILE}
    assert flushed.index(directory / CHECKSUMS_FILE) > marker
    assert files and files <= set(flushed[:marker])
    assert {directory, directory / "engine"} <= set(flushed[:marker])


def test_damaged_checkpoint_stops_the_command_with_one_line(two_step_run, tmp_path):
    shutil.copytree(two_step_run["out_dir"], tmp_path / "run")
    (tmp_path / "run/checkpoints/latest.json").write_text("garbage")
    path = write_config({**two_step_run, "out_dir": str(tmp_path / "run")}, tmp_path / "run.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "moeut_dist.cli", "train", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    last_line = result.stderr.splitlines()[-1]  # libraries may warn before it
    assert (
        last_line.startswith("moeut train: cannot resume: ")
        and "latest.json is damaged" in last_line
    )
    assert "Traceback" not in result.stderr


def _poisoned_loss(nan_steps: set[int], micro_batches_per_step: int):
    """`parallel_lm_loss`, but NaN on every micro-batch of the steps in `nan_steps`."""
    calls = itertools.count()

    def loss(model, tokens) -> ParallelLoss:
        real = parallel_lm_loss(model, tokens)
        if next(calls) // micro_batches_per_step + 1 not in nan_steps:
            return real
        nan = torch.tensor(math.nan)
        return ParallelLoss(real.total * nan, real.lm * nan, real.reg)

    return loss


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_loss_skips_the_step_and_stops_after_too_many(
    corpus, tmp_path, monkeypatch, precision
):
    config = run_config(
        corpus, tmp_path / "run", eval={"every": 0}, checkpoint={"every": 1, "keep": 10},
        precision=precision,
    )  # fmt: skip
    monkeypatch.setattr(loop, "parallel_lm_loss", _poisoned_loss({2}, micro_batches_per_step=4))
    _train(config, tmp_path / "skip.yaml")
    records = read_run_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in records] == [0, 1, 0, 0, 0, 0]
    assert records[1]["loss"] is None and records[1]["nonfinite"]["loss"] == "nan"
    assert all(math.isfinite(r["loss"]) for r in records[2:])
    weights = {
        step: torch.load(
            tmp_path / f"run/checkpoints/step_{step:08d}/engine/mp_rank_00_model_states.pt",
            weights_only=True,
        )["module"]
        for step in (1, 2, 3)
    }
    for name, tensor in weights[1].items():
        assert torch.equal(weights[2][name], tensor), f"skipped step changed {name}"
    assert any(not torch.equal(weights[3][n], t) for n, t in weights[2].items())

    monkeypatch.setattr(
        loop, "parallel_lm_loss", _poisoned_loss({3, 4, 5, 6}, micro_batches_per_step=4)
    )
    config["max_consecutive_nonfinite"] = 2
    config["out_dir"] = str(tmp_path / "diverging")
    with pytest.raises(loop.NonFiniteLossError, match="step 4: 2 steps in a row"):
        _train(config, tmp_path / "diverge.yaml")


class _Payload:
    """Unpickling this runs code: it creates a directory."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_untrusted_checkpoint_files_are_not_unpickled(uninterrupted, corpus, tmp_path):
    config = run_config(corpus, tmp_path / "run", schedule={"steps": 2})
    _train(config, tmp_path / "run.yaml")
    engine_dir = latest_checkpoint(tmp_path / "run" / "checkpoints") / "engine"
    marker = tmp_path / "code_ran"
    for name in os.listdir(engine_dir):
        if name.endswith(".pt"):
            torch.save({"payload": _Payload(str(marker))}, engine_dir / name)
    record_checksums(engine_dir.parent)  # planted by someone who also rewrote the checksums
    config["schedule"] = {**config["schedule"], "steps": 4}
    with pytest.raises(UnsafeCheckpointFileError, match=r"holds code .* and was not loaded"):
        _train(config, tmp_path / "resume.yaml")
    assert not marker.exists()
    assert json.loads((tmp_path / "run/checkpoints/latest.json").read_text())["step"] == 2


LAUNCH_CONFIGS = [
    f"{arch}-{size}"
    for arch in ("moeut", "dense")
    for size in ("44m", "126m", "244m", "318m", "727m", "1b")
] + ["moeut-582m"]


@pytest.mark.parametrize("name", LAUNCH_CONFIGS)
def test_launch_configs_hold_the_authors_recipe_and_fit_a_node(name):
    config = load_config(REPO / "launch" / "configs" / f"{name}.yaml")
    assert (config.model.arch, config.model.profile) == (name.split("-")[0], name)
    config.parallel.validate(config.model.build(8000), world_size=8)
    # The 44M models (MoEUT and dense) were trained with clipping 0.1 and no warm-up.
    clip, warmup = (0.1, 0) if name.endswith("-44m") else (0.25, 4000)
    recipe = (config.optim.lr, config.optim.weight_decay, config.optim.grad_clip)
    assert recipe == (2.5e-4, 0.01, clip)
    schedule = config.schedule
    assert (schedule.kind, schedule.steps, schedule.warmup_steps, schedule.min_lr_ratio) == (
        "cosine", 100_000, warmup, 0.1,
    )  # fmt: skip
    assert (config.data.global_batch_size, config.data.seq_len) == (64, 1024)
    per_step = config.data.micro_batch_size * config.parallel.data(8)
    assert config.data.global_batch_size % per_step == 0


def test_reading_a_config_does_not_import_deepspeed(corpus, tmp_path):
    """Config checks run before any process starts (and in tools that never train)."""
    path = write_config(run_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    code = (
        "import sys; from moeut_dist.train.config import load_config; "
        f"load_config({str(path)!r}); print(sorted(m for m in sys.modules if 'deepspeed' in m))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
