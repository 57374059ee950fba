"""A run that changes layout: 4 processes (DP 2 × EP 2, ZeRO-2) train 3 steps, then continue
with 2 processes at EP 2 (ZeRO-1), with 1 process, or with 2 processes at TP 2, and one more
change from ZeRO-1 back to ZeRO-2. Every continuation follows a run that went through
uninterrupted (gloo, fp32; one process stands for every layout, which all train like it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moeut_dist.train import loop
from moeut_dist.train.config import load_config
from moeut_dist.train.metrics import read_run_metrics
from tests.train_helpers import make_corpus, run_config, run_result, torchrun, wait, write_config

pytestmark = pytest.mark.slow

STEPS = 6
FIRST = {"world": 4, "parallel": {"expert": 2, "zero_stage": 2}}
CHANGES = {
    "ep2_zero1": {"world": 2, "parallel": {"expert": 2, "zero_stage": 1}},
    "one_process": {"world": 1, "parallel": {"zero_stage": 2}},
    "tp2": {"world": 2, "parallel": {"tensor": 2, "zero_stage": 2}},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("layout_corpus"))


def _config(corpus, out_dir: Path, layout: dict, **extra) -> dict:
    return run_config(
        corpus,
        out_dir,
        parallel=layout["parallel"],
        schedule={"steps": STEPS, "warmup_steps": 2},
        checkpoint={"every": 1, "keep": 2},
        eval={"every": 0},
        **extra,
    )


def _run(config: dict, path: Path, world: int, *extra: str) -> Path:
    write_config(config, path)
    if world == 1:  # in this process: no interpreter start
        overrides = [f"checkpoint.resume={extra[1]}"] if extra else []
        loop.train(load_config(path, overrides))
    else:
        wait(torchrun(path, world, *extra), path)
    return path


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """The uninterrupted reference, the first 3 steps, and each continuation."""
    root = tmp_path_factory.mktemp("layouts")
    reference = _run(
        _config(corpus, root / "reference", CHANGES["one_process"]), root / "ref.yaml", 1
    )
    first = root / "first"
    _run({**_config(corpus, first, FIRST), "stop_after_steps": 3}, root / "first.yaml", 4)
    continued = {}
    for name, layout in CHANGES.items():
        shutil.copytree(first, root / name)
        path = root / f"{name}.yaml"
        resume = str(root / name / "checkpoints" / "step_00000003")
        continued[name] = _run(
            _config(corpus, root / name, layout), path, layout["world"], "--resume", resume
        )
    # ZeRO-1 back to ZeRO-2: the EP 2 continuation's step-5 checkpoint, its last step again.
    shutil.copytree(root / "ep2_zero1", root / "back_to_zero2")
    layout = {"world": 2, "parallel": {"expert": 2, "zero_stage": 2}}
    resume = str(root / "back_to_zero2" / "checkpoints" / "step_00000005")
    continued["back_to_zero2"] = _run(
        _config(corpus, root / "back_to_zero2", layout), root / "back.yaml", 2, "--resume", resume
    )
    return run_result(reference), first, continued


def _trainer_state(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_rank00000.json"
    return json.loads(path.read_text())


def _assert_follows(got, want, steps) -> None:
    losses = {step: (loss, reg) for step, loss, reg in got.losses}
    for step, loss, reg in want.losses:
        if step in steps:
            assert losses[step] == pytest.approx((loss, reg), rel=1e-5), step
    # Adam turns fp32 rounding in near-zero gradients into update differences far below lr;
    # a lost or repeated update, or other data, would move weights by about lr = 3e-3.
    for name, tensor in want.weights.items():
        torch.testing.assert_close(got.weights[name], tensor, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("name", list(CHANGES))
def test_continuation_under_another_layout_follows_the_uninterrupted_run(runs, name):
    reference, first, continued = runs
    result = run_result(continued[name])
    _assert_follows(result, reference, steps=range(1, STEPS + 1))
    run_dir = continued[name].parent / name
    # The same place in the data: 6 global batches of 8, the first 3 of them before the change.
    assert _trainer_state(first, 3)["loader"]["position"] == 3 * 8
    assert _trainer_state(run_dir, STEPS)["loader"]["position"] == STEPS * 8
    assert _trainer_state(run_dir, STEPS)["optimizer_steps"] == STEPS
    (event,) = read_run_metrics(run_dir, "event")
    assert event["step"] == 3
    layout = CHANGES[name]
    assert event["layout_changed"]["from"] == {
        "world_size": 4, "parallel": {"tensor": 1, "expert": 2, "zero_stage": 2},
    }  # fmt: skip
    assert event["layout_changed"]["to"]["world_size"] == layout["world"]
    assert (
        event["layout_changed"]["to"]["parallel"]["zero_stage"] == layout["parallel"]["zero_stage"]
    )


def test_zero_1_back_to_zero_2_follows_the_uninterrupted_run(runs):
    reference, _, continued = runs
    _assert_follows(run_result(continued["back_to_zero2"]), reference, steps={6})
