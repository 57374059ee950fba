"""Fault injection: the faults that happen to real runs, injected the way they happen.

A worker killed by SIGKILL under plain `torchrun --max-restarts`; weight, optimizer and config
files of a checkpoint flipped, truncated or replaced; a full disk (a small tmpfs, where this
process may mount one); a run resumed on another tokenizer; pruning while a checkpoint is
exported; corrupt shards read by DataLoader workers. Each ends either in the run carrying on
exactly, or in one line naming the problem, with nothing lost.

Run alone with `pytest -m faults`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from data_prep.shards import build_shards
from data_prep.synthetic import synthetic_documents, write_jsonl
from data_prep.tokenizer import train_tokenizer
from moeut_dist.checksums import ChecksumError, record_checksums
from moeut_dist.config import ConfigError
from moeut_dist.data import read_manifest
from moeut_dist.export import WEIGHTS_FILE, load_pretrained
from moeut_dist.parallel.layout import init_distributed, initialize
from moeut_dist.train import loop
from moeut_dist.train.checkpoint import (
    CheckpointError,
    DiskFullError,
    checkpoint_lease,
    is_complete,
    latest_checkpoint,
)
from moeut_dist.train.config import check_run, load_config
from moeut_dist.train.consolidate import export_checkpoint
from moeut_dist.train.metrics import METRICS_FILE, read_run_metrics
from tests.train_helpers import (
    REPO,
    SEQ_LEN,
    make_corpus,
    run_config,
    torchrun,
    wait,
    write_config,
)

pytestmark = pytest.mark.faults

STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("fault_corpus"))


def _two_process_config(corpus, directory: Path, **sections) -> dict:
    return run_config(
        corpus,
        directory / "run",
        parallel={"expert": 2},
        schedule={"steps": STEPS, "warmup_steps": 2},
        data={"num_workers": 1},
        eval={"every": 0},
        **sections,
    )


def _workers(agent_pid: int) -> list[int]:
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def _logged(out_dir: Path) -> list[dict]:
    """The train records written so far (whole lines only)."""
    path = out_dir / METRICS_FILE
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.slow
def test_plain_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(corpus, tmp_path):
    """torchrun's default environment (its rendezvous store shared with the workers): the
    restarted workers reconnect, resume from the step-2 checkpoint and redo the steps the
    killed attempt had logged bit for bit."""
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in os.environ
    path = write_config(_two_process_config(corpus, tmp_path), tmp_path / "run.yaml")
    (agent,) = torchrun(path, max_restarts=1)
    try:
        # Kill one worker once a few steps are logged (past the step-2 checkpoint), mid-run.
        deadline = time.monotonic() + 180
        while len(logged := _logged(tmp_path / "run")) < 3:
            assert agent.poll() is None and time.monotonic() < deadline, "run ended too early"
            time.sleep(0.02)
        os.kill(_workers(agent.pid)[-1], signal.SIGKILL)
        wait([agent], path, timeout=180)  # before the fix, the restarted workers hung
    finally:
        for worker in _workers(agent.pid) if agent.poll() is None else []:
            os.kill(worker, signal.SIGKILL)
        agent.kill()
    resumes = read_run_metrics(tmp_path / "run", "event")
    assert len(resumes) == 1, "the workers were not restarted from a checkpoint"
    assert 2 <= resumes[0]["step"] < STEPS  # a checkpoint of this run, mid-run
    train = read_run_metrics(tmp_path / "run")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    redone = [(r["loss"], r["grad_norm"]) for r in train[: len(logged)]]
    assert redone == [(r["loss"], r["grad_norm"]) for r in logged]


def test_several_nodes_restarted_over_a_shared_store_are_told_what_to_set(monkeypatch):
    """Agents on several nodes count restarts apart, so a restart there cannot be told apart
    from the attempt before it: the restarted workers name the setting that avoids it."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(ConfigError, match="set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the "):
        init_distributed("gloo")
    assert not dist.is_initialized()


# --- one-process runs and their checkpoints ----------------------------------------------------


def _train(config: dict, path: Path) -> None:
    loop.train(load_config(write_config(config, path)))


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """Four steps in one process, checkpoints at steps 2 and 4; copies are damaged."""
    directory = tmp_path_factory.mktemp("finished")
    config = run_config(corpus, directory / "run", schedule={"steps": 4}, eval={"every": 0})
    _train(config, directory / "run.yaml")
    return config


def _copy(run: dict, tmp_path: Path, **changes) -> dict:
    """A copy of the run's directory and config, for `steps` more (or as many) steps."""
    shutil.copytree(run["out_dir"], tmp_path / "run")
    config = {**run, "out_dir": str(tmp_path / "run")}
    for name, values in changes.items():
        config[name] = {**config[name], **values}
    return config


def _moeut(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "moeut_dist.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    return result


def _one_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The error line a command ended with; it must be the only report (no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.splitlines()[-1]  # libraries may warn before it
    assert line.startswith(f"moeut {command}: ")
    return line


def _flip_a_byte(path: Path, offset: int = -100) -> None:
    content = bytearray(path.read_bytes())
    content[offset] ^= 0x10
    path.write_bytes(content)


def test_no_recovery_script_that_unpickles_is_shipped(finished_run):
    directory = latest_checkpoint(Path(finished_run["out_dir"]) / "checkpoints")
    assert not list(directory.rglob("zero_to_*.py"))


@pytest.mark.parametrize(
    ("damaged", "damage"),
    [
        ("engine/model_tp00_ep00.safetensors", _flip_a_byte),  # a weight's bit flipped
        ("engine/zero_pp_rank_0_mp_rank_00_optim_states.pt", lambda p: _truncate(p, 5000)),
        ("config.yaml", lambda p: _truncate(p, 40)),
    ],
)
def test_corrupt_checkpoint_file_stops_the_resume_naming_it_and_the_previous_one(
    finished_run, tmp_path, monkeypatch, damaged, damage
):
    config = _copy(finished_run, tmp_path, schedule={"steps": 6})
    checkpoints = tmp_path / "run" / "checkpoints"
    damage(checkpoints / "step_00000004" / damaged)
    monkeypatch.setattr(loop, "build_model", lambda *_, **__: pytest.fail("model was built"))
    with pytest.raises(CheckpointError) as error:
        _train(config, tmp_path / "resume.yaml")
    message = str(error.value)
    assert f"{checkpoints / 'step_00000004' / damaged} is corrupt" in message
    assert f"--resume {checkpoints / 'step_00000002'}" in message
    assert "--resume latest-intact" in message


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def test_latest_intact_falls_back_to_the_previous_checkpoint(finished_run, corpus, tmp_path):
    """A flipped bit in the newest checkpoint: `latest-intact` resumes from the one before and
    redoes the steps since, exactly (the uninterrupted run's losses)."""
    config = _copy(finished_run, tmp_path, checkpoint={"resume": "latest-intact"})
    checkpoints = tmp_path / "run" / "checkpoints"
    _flip_a_byte(checkpoints / "step_00000004" / "engine" / "model_tp00_ep00.safetensors")
    with pytest.warns(RuntimeWarning, match="passing over a corrupt checkpoint"):
        _train(config, tmp_path / "resume.yaml")
    (resumed,) = read_run_metrics(tmp_path / "run", "event")
    assert resumed["resumed_from"] == str(checkpoints / "step_00000002")
    assert latest_checkpoint(checkpoints).name == "step_00000004"
    original = read_run_metrics(finished_run["out_dir"])
    assert [r["loss"] for r in read_run_metrics(tmp_path / "run")] == [r["loss"] for r in original]


def test_pickled_code_planted_in_a_checkpoint_is_refused_in_one_line(finished_run, tmp_path):
    """Even with its checksums rewritten to match, a file that holds code is not loaded, and
    the user is not advised to load it with `weights_only=False`."""
    config = _copy(finished_run, tmp_path, schedule={"steps": 6})
    directory = tmp_path / "run" / "checkpoints" / "step_00000004"
    marker = tmp_path / "code_ran"
    optimizer_file = directory / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"payload": _Payload(str(marker))}, optimizer_file)
    record_checksums(directory)
    line = _one_line(
        _moeut("train", "--config", str(write_config(config, tmp_path / "r.yaml"))), "train"
    )
    assert f"{optimizer_file} holds code" in line and "was not loaded" in line
    assert "weights_only" not in line
    assert not marker.exists()


class _Payload:
    """Unpickling this runs code: it creates a directory."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_export_names_a_corrupt_file(finished_run, tmp_path):
    _copy(finished_run, tmp_path)
    config_file = latest_checkpoint(tmp_path / "run" / "checkpoints") / "config.yaml"
    _truncate(config_file, 40)
    with pytest.raises(ChecksumError, match=f"{config_file} is corrupt"):
        export_checkpoint(tmp_path / "run", tmp_path / "model")


def test_corrupt_model_directory_is_named_by_load_pretrained_and_init_from(
    finished_run, corpus, tmp_path
):
    model_dir = export_checkpoint(finished_run["out_dir"], tmp_path / "model")
    load_pretrained(model_dir)  # intact
    weights = model_dir / WEIGHTS_FILE
    _flip_a_byte(weights)  # in the last tensor's values: the header still reads
    with pytest.raises(ChecksumError, match=f"{weights} is corrupt"):
        load_pretrained(model_dir)
    config = run_config(corpus, tmp_path / "run", init_from=str(model_dir))
    with pytest.raises(ConfigError, match=f"init_from: {weights} is corrupt"):
        _train(config, tmp_path / "run.yaml")


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory):
    """Shards of another tokenizer with the same number of pieces (300)."""
    directory = tmp_path_factory.mktemp("other_corpus")
    source = write_jsonl(directory / "corpus.jsonl", synthetic_documents(120, seed=7))
    tokenizer = directory / "tok.model"
    train_tokenizer([source], tokenizer, vocab_size=300)
    build_shards(
        [source], directory / "shards", tokenizer, SEQ_LEN, shard_bytes=30_000,
        val_fraction=0.1, progress=False,
    )  # fmt: skip
    return directory


def test_resume_on_another_tokenizer_is_refused_before_the_model_is_built(
    finished_run, other_corpus, tmp_path, monkeypatch
):
    data = {"shard_dir": str(other_corpus / "shards"), "tokenizer": str(other_corpus / "tok.model")}
    config = _copy(finished_run, tmp_path, schedule={"steps": 6}, data=data)
    monkeypatch.setattr(loop, "build_model", lambda *_, **__: pytest.fail("model was built"))
    with pytest.raises(CheckpointError, match="was trained with another tokenizer"):
        _train(config, tmp_path / "resume.yaml")


def test_shard_removed_from_the_manifest_is_refused_on_resume(finished_run, corpus, tmp_path):
    shard_dir = shutil.copytree(corpus.shard_dir, tmp_path / "shards")
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"].pop()
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    config = _copy(
        finished_run, tmp_path, schedule={"steps": 6}, data={"shard_dir": str(shard_dir)}
    )
    with pytest.raises(CheckpointError, match="a shard was added, removed or rebuilt"):
        _train(config, tmp_path / "resume.yaml")


def test_export_holds_a_lease_that_pruning_honours(finished_run, tmp_path):
    """A run saving and pruning while its oldest checkpoint is exported keeps that checkpoint
    until the lease is gone; the next save prunes it."""
    config = _copy(finished_run, tmp_path, schedule={"steps": 6})
    checkpoints = tmp_path / "run" / "checkpoints"
    exported = checkpoints / "step_00000002"
    with checkpoint_lease(exported):
        _train(config, tmp_path / "more.yaml")  # saves step 6, keeps 4 and 6
        assert is_complete(exported)
    _train({**config, "schedule": {**config["schedule"], "steps": 8}}, tmp_path / "last.yaml")
    assert sorted(d.name for d in checkpoints.glob("step_*")) == ["step_00000006", "step_00000008"]


# --- full disks ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs: room for two single-process checkpoints of the tiny model (about 7.2 MB
    each, its portable state included) and little more."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up to `leave` free bytes with one file."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as file:
        file.write(b"\0" * max(free - leave, 0))
    return filler


def test_full_disk_during_a_save_is_one_line_and_leaves_nothing_behind(corpus, small_disk):
    """The disk fills in the middle of the first checkpoint: no partial checkpoint stays."""
    config = run_config(corpus, small_disk / "run", schedule={"steps": 2}, eval={"every": 0})
    _fill(small_disk, 3 << 20)
    with pytest.raises(DiskFullError) as error:
        _train(config, small_disk.parent / "run.yaml")
    checkpoint = small_disk / "run" / "checkpoints" / "step_00000002"
    assert str(error.value).startswith(f"no space left on device for checkpoint {checkpoint}")
    assert "bytes written" in str(error.value)
    assert not checkpoint.exists()


def test_full_disk_refuses_the_next_save_and_a_restart_runs_in_what_is_left(corpus, small_disk):
    config = run_config(corpus, small_disk / "run", schedule={"steps": 2}, eval={"every": 0})
    _train(config, small_disk.parent / "run.yaml")
    checkpoints = small_disk / "run" / "checkpoints"
    previous = checkpoints / "step_00000002"
    previous_files = {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    more = {**config, "schedule": {**config["schedule"], "steps": 4}}
    filler = _fill(small_disk, 2 << 20)
    with pytest.raises(DiskFullError) as error:
        _train(more, small_disk.parent / "more.yaml")
    assert f"it needs about {sum(len(b) for b in previous_files.values())} bytes" in str(
        error.value
    )
    assert f"{previous} is untouched" in str(error.value)
    assert not (checkpoints / "step_00000004").exists()
    assert {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()} == previous_files

    # A save killed mid-way left a partial checkpoint that fills the disk to the last byte.
    filler.unlink()
    partial = checkpoints / "step_00000004"
    (partial / "engine").mkdir(parents=True)
    _fill(partial / "engine", 0).rename(partial / "engine" / "mp_rank_00_model_states.pt")
    _train(more, small_disk.parent / "more.yaml")
    assert latest_checkpoint(checkpoints) == partial and is_complete(partial)
    assert [r["step"] for r in read_run_metrics(small_disk / "run")] == [1, 2, 3, 4]


# --- data faults and the metrics ---------------------------------------------------------------


def _corrupt_train_shards(corpus, tmp_path: Path, keep: int) -> Path:
    """A copy of the shards in which a byte of each train shard but the last `keep` is flipped
    (the manifest's sha256 catches it)."""
    shard_dir = shutil.copytree(corpus.shard_dir, tmp_path / "shards")
    shards = read_manifest(shard_dir).split("train").shards
    for shard in shards[: len(shards) - keep]:
        _flip_a_byte(shard_dir / shard.name, 600)
    return shard_dir


def test_corrupt_shard_read_by_a_worker_is_one_line(corpus, tmp_path):
    shard_dir = _corrupt_train_shards(corpus, tmp_path, keep=0)
    config = run_config(
        corpus, tmp_path / "run", data={"shard_dir": str(shard_dir), "num_workers": 1}
    )
    line = _one_line(
        _moeut("train", "--config", str(write_config(config, tmp_path / "r.yaml"))), "train"
    )
    assert line.startswith(f"moeut train: {shard_dir}/") and "(corrupt)" in line
    assert "DataLoader worker" not in line


def test_skipped_shards_and_steps_are_in_the_metrics_as_valid_json(corpus, tmp_path, monkeypatch):
    """A corrupt shard skipped by a worker and a NaN step: both counted in metrics.jsonl and
    TensorBoard, and every line parses as strict JSON (no bare NaN)."""
    shard_dir = _corrupt_train_shards(corpus, tmp_path, keep=1)
    real_loss = loop.parallel_lm_loss

    calls = itertools.count()

    def nan_on_step_2(model, tokens):
        loss = real_loss(model, tokens)
        if next(calls) // 4 + 1 != 2:  # 4 micro-batches per step
            return loss
        return type(loss)(loss.total * math.nan, loss.lm * math.nan, loss.reg)

    monkeypatch.setattr(loop, "parallel_lm_loss", nan_on_step_2)
    config = run_config(
        corpus, tmp_path / "run", schedule={"steps": 3}, eval={"every": 0},
        data={"shard_dir": str(shard_dir), "num_workers": 1, "skip_corrupt_shards": True},
        logging={"tensorboard": True},
    )  # fmt: skip
    _train(config, tmp_path / "run.yaml")

    def no_bare_constants(name):
        raise AssertionError(f"{name} is not JSON")

    lines = (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line, parse_constant=no_bare_constants) for line in lines]
    train = [r for r in records if r["kind"] == "train"]
    assert train[1]["loss"] is None and train[1]["nonfinite"]["loss"] == "nan"
    assert [r["skipped_steps"] for r in train] == [0, 1, 0]
    assert train[-1]["data/skipped_shards"] >= 1 and train[-1]["data/read_retries"] == 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/data/skipped_shards", "train/skipped_steps"} <= set(scalars)
    assert events.Scalars("train/data/skipped_shards")[-1].value >= 1


def test_validation_is_not_stopped_by_a_manifest_changed_mid_run(corpus, tmp_path):
    """The validation split's shards are fixed when the run starts."""
    shard_dir = shutil.copytree(corpus.shard_dir, tmp_path / "shards")
    config = load_config(
        write_config(
            run_config(corpus, tmp_path / "run", data={"shard_dir": str(shard_dir)}),
            tmp_path / "r.yaml",
        )
    )
    with loop.distributed_session():
        initialize(config.parallel, check_run(config, 1).model)
        validation = loop.ValidationBatches(config)
        first = [b.clone() for b in validation]
        (shard_dir / "manifest.json").write_text("{}")  # rewritten by another job, say
        assert all(torch.equal(a, b) for a, b in zip(first, validation, strict=True))


def test_out_dir_that_is_a_file_is_refused_before_anything_starts(corpus, tmp_path):
    (tmp_path / "run").write_text("not a directory")
    path = write_config(run_config(corpus, tmp_path / "run"), tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match=f"out_dir: {tmp_path / 'run'} exists and is not a dir"):
        load_config(path)
