"""Shared pieces of the training tests: a tiny corpus, run configs, launchers, results."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from data_prep.shards import build_shards
from data_prep.synthetic import synthetic_documents, write_jsonl
from data_prep.tokenizer import train_tokenizer
from moeut_dist.parallel.shards import read_full_state_dict
from moeut_dist.train.checkpoint import latest_checkpoint
from moeut_dist.train.config import load_config
from moeut_dist.train.metrics import read_run_metrics
from tests.distributed_utils import free_port

SEQ_LEN = 32
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Corpus:
    shard_dir: Path
    tokenizer: Path


def make_corpus(directory: Path) -> Corpus:
    """Synthetic documents → SentencePiece (300 pieces) → shards of 33-token samples."""
    source = write_jsonl(
        directory / "corpus.jsonl", synthetic_documents(300, seed=0, words_per_document=(20, 150))
    )
    tokenizer = directory / "tok.model"
    train_tokenizer([source], tokenizer, vocab_size=300)
    shard_dir = directory / "shards"
    build_shards(
        [source], shard_dir, tokenizer, SEQ_LEN, shard_bytes=30_000, val_fraction=0.1,
        progress=False,
    )  # fmt: skip
    return Corpus(shard_dir, tokenizer)


def run_config(corpus: Corpus, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny run as a plain dict; `sections` update the defaults key by key."""
    config = {
        "out_dir": str(out_dir),
        "seed": 3,
        "model": {"profile": "tiny", "kernel": "torch"},
        "data": {
            "shard_dir": str(corpus.shard_dir),
            "tokenizer": str(corpus.tokenizer),
            "seq_len": SEQ_LEN,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "num_workers": 0,
        },
        "optim": {"lr": 3e-3},
        "schedule": {"steps": 6, "warmup_steps": 2},
        "checkpoint": {"every": 2, "keep": 2},
        "eval": {"every": 3, "batches": 2},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(name, {}).update(values)
        else:
            config[name] = values
    return config


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(
    config_path: Path, nproc: int = 2, *extra: str, agents: int = 1, max_restarts: int = 0
) -> list[subprocess.Popen]:
    """Start `agents` torchrun agents (simulated nodes) of `nproc` workers each, joined by a
    c10d rendezvous on localhost; returns the agent processes."""
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={agents}", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test",
        f"--max-restarts={max_restarts}", "--monitor-interval=0.1",
        "-m", "moeut_dist.cli", "train", "--config", str(config_path), *extra,
    ]  # fmt: skip
    return [_start(command, config_path) for _ in range(agents)]


def deepspeed_launcher(config_path: Path, nproc: int = 2) -> list[subprocess.Popen]:
    """Start one node of `nproc` workers with the DeepSpeed launcher, as launch/deepspeed.sh."""
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
        f"--master_port={free_port()}", "--no_local_rank",
        "--module", "moeut_dist.cli", "train", "--config", str(config_path),
    ]  # fmt: skip
    return [_start(command, config_path)]


def _start(command: list[str], config_path: Path) -> subprocess.Popen:
    # torchrun's default environment (it shares its rendezvous store with the workers), as a
    # user who launches it by hand gets.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    log = open(config_path.with_suffix(".log"), "a")  # noqa: SIM115 -- the process owns it
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait(agents: list[subprocess.Popen], config_path: Path, timeout: float = 240) -> None:
    for agent in agents:
        code = agent.wait(timeout=timeout)
        if code != 0:
            log = config_path.with_suffix(".log").read_text()
            raise AssertionError(f"the launcher exited with {code}:\n{log[-6000:]}")


@dataclass
class RunResult:
    losses: list[tuple[int, float, float]]  # (step, loss, reg_loss) of every train record
    val: list[tuple[int, float]]
    weights: dict[str, torch.Tensor]  # the full model of the newest checkpoint
    records: list[dict[str, Any]]


def run_result(config_path: Path) -> RunResult:
    config = load_config(config_path)
    records = read_run_metrics(config.out_dir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
    latest = latest_checkpoint(config.out_path / "checkpoints")
    weights = read_full_state_dict(latest / "engine", config.model.build(300))
    return RunResult(
        [(r["step"], r["loss"], r["reg_loss"]) for r in records],
        [(r["step"], r["loss"]) for r in read_run_metrics(config.out_dir, "val")],
        weights,
        records,
    )


def assert_same_run(got: RunResult, want: RunResult) -> None:
    """Bit for bit: exactly equal logged losses and final weights."""
    assert got.losses == want.losses
    assert got.val == want.val
    assert got.weights.keys() == want.weights.keys()
    for name, tensor in want.weights.items():
        assert torch.equal(got.weights[name], tensor), name
