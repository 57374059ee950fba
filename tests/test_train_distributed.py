"""`moeut train` under torchrun with 2 processes and expert parallelism (gloo): end to end,
two simulated nodes (torchrun agents, and a SLURM job on a local two-node cluster), the DeepSpeed
launcher, stop-and-resume, and a run started from the export of another layout's checkpoint.
A worker killed mid-run is in `test_faults`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeut_dist.config import ConfigError
from moeut_dist.data import TokenLoader
from moeut_dist.export import load_pretrained
from moeut_dist.model import lm_loss
from moeut_dist.train.config import check_init_from, check_run, load_config
from moeut_dist.train.consolidate import export_checkpoint
from moeut_dist.train.metrics import read_run_metrics
from tests import slurm_cluster
from tests.distributed_utils import free_port
from tests.train_helpers import (
    REPO,
    assert_same_run,
    deepspeed_launcher,
    make_corpus,
    run_config,
    run_result,
    torchrun,
    wait,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("train_corpus"))


def _config(corpus, directory: Path, **sections) -> dict:
    return run_config(
        corpus,
        directory / "run",
        parallel={"expert": 2, "zero_stage": 2},
        schedule={"steps": STEPS, "warmup_steps": 2},
        data={"num_workers": 1},
        logging={"tensorboard": True},
        **sections,
    )


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Two workers under one torchrun agent, uninterrupted."""
    directory = tmp_path_factory.mktemp("reference")
    path = write_config(_config(corpus, directory), directory / "run.yaml")
    wait(torchrun(path), path)
    return run_result(path), directory / "run"


def test_two_process_expert_parallel_run_end_to_end(reference):
    result, out_dir = reference
    assert [step for step, *_ in result.losses] == list(range(1, STEPS + 1))
    assert result.losses[-1][1] < result.losses[0][1]
    assert [step for step, _ in result.val] == [3, 6, 9, 10]
    for record in result.records:
        assert record["ep_bytes_sent"] > 0  # tokens travelled to the other rank's experts
        assert all(abs(sum(shares) - 1) < 1e-9 for shares in record["expert_share"])
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(result.weights["transformer.layers.0.ffn.keys"]) == 16  # both ranks' experts


def test_two_nodes_match_one_node(reference, corpus, tmp_path):
    path = write_config(_config(corpus, tmp_path), tmp_path / "run.yaml")
    wait(torchrun(path, 1, agents=2), path)
    assert_same_run(run_result(path), reference[0])


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment of a local two-node SLURM cluster (see `tests.slurm_cluster`)."""
    if not slurm_cluster.available():
        reason = "SLURM is not installed (slurmctld, slurmd, munged); .ci/run installs it"
        if os.environ.get("MOEUT_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with slurm_cluster.slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def test_slurm_job_on_two_nodes_matches_one_node(reference, corpus, tmp_path, slurm):
    path = write_config(_config(corpus, tmp_path), tmp_path / "run.yaml")
    job_log = tmp_path / "job.log"
    env = {
        **slurm,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{slurm['PATH']}",  # torchrun
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "NPROC_PER_NODE": "1",  # no GPUs to count
        "MASTER_PORT": str(free_port()),
    }
    submitted = subprocess.run(
        ["sbatch", "--wait", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
         f"--output={job_log}", str(REPO / "launch" / "slurm.sbatch"), str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = job_log.read_text() if job_log.exists() else ""
    assert submitted.returncode == 0, f"{submitted.stderr}\n{log[-6000:]}"
    assert "--rdzv-endpoint=127.0.0.1:" in log  # the head node's NodeAddr, not its name
    assert_same_run(run_result(path), reference[0])


def test_deepspeed_launcher_matches_torchrun(reference, corpus, tmp_path):
    path = write_config(_config(corpus, tmp_path), tmp_path / "run.yaml")
    wait(deepspeed_launcher(path), path)
    assert_same_run(run_result(path), reference[0])


def test_stopped_and_resumed_two_process_run_is_bit_identical(reference, corpus, tmp_path):
    config = _config(corpus, tmp_path)
    first = write_config({**config, "stop_after_steps": 5}, tmp_path / "first.yaml")
    wait(torchrun(first), first)
    path = write_config(config, tmp_path / "run.yaml")
    wait(torchrun(path, 2, "--resume", "auto"), path)
    assert_same_run(run_result(path), reference[0])


def _first_batch(config_path: Path) -> torch.Tensor:
    """The first training micro-batch of a run with one data-parallel rank."""
    config = load_config(config_path)
    data = config.data
    loader = TokenLoader(
        data.shard_dir, seq_len=data.seq_len, tokenizer=data.tokenizer,
        batch_size=data.micro_batch_size, dp_rank=0, dp_world_size=1, num_workers=0,
        seed=config.seed,
    )  # fmt: skip
    return next(iter(loader))


def test_run_starts_from_the_export_of_another_layout(reference, corpus, tmp_path):
    """The EP = 2 reference's last checkpoint, exported, starts a TP = 2 run: its first logged
    loss (computed before any update) is the exported model's loss on that batch in one process."""
    exported = export_checkpoint(reference[1], tmp_path / "export")  # `moeut export`
    config = run_config(
        corpus,
        tmp_path / "run",
        init_from=str(exported),
        parallel={"tensor": 2},
        data={"global_batch_size": 2},
        schedule={"steps": 1, "warmup_steps": 0},
        eval={"every": 0},
    )
    path = write_config(config, tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match="n_experts = 16, the run's model has n_experts = 8"):
        check_init_from(exported, check_run(load_config(path, ["model.n_experts=8"]), 2).model)
    wait(torchrun(path), path)

    tokens = _first_batch(path)
    with torch.no_grad():
        logits = load_pretrained(exported)(tokens[:, :-1]).logits
    expected = lm_loss(logits, tokens[:, 1:]).item()
    (record,) = read_run_metrics(tmp_path / "run")
    assert record["loss"] == pytest.approx(expected, rel=1e-5)
    (event,) = read_run_metrics(tmp_path / "run", "event")
    assert event["initialised_from"] == str(exported)
