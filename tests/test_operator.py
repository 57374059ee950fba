"""Running moeut as an operator: logs without a terminal, W&B, profiler traces, MFU, the CLI's
help, --print-config, --dry-run and `moeut plot`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml
from matplotlib.image import imread

from data_prep.shards import build_shards
from data_prep.synthetic import synthetic_documents, write_jsonl
from moeut_dist import cli, logs
from moeut_dist.dataclass_dict import ConfigError, from_dict, to_dict
from moeut_dist.progress import Progress
from moeut_dist.train.config import load_config
from moeut_dist.train.metrics import read_run_metrics
from moeut_dist.train.peak_flops import peak_flops
from moeut_dist.train.wandb_sink import RUN_ID_FILE
from tests.train_helpers import REPO, make_corpus, run_config, write_config
from tests.wandb_offline import logged_config, logged_history, logged_summary, run_record


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("operator_corpus"))


def moeut(*args: str) -> subprocess.CompletedProcess:
    """`moeut ARGS` in a subprocess whose stdout and stderr are pipes (no terminal)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    command = [sys.executable, "-m", "moeut_dist.cli", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@dataclass
class TwoSessions:
    out_dir: Path
    outputs: list[str]  # stdout + stderr of each session


@pytest.fixture(scope="module")
def two_sessions(corpus, tmp_path_factory) -> TwoSessions:
    """A 4-step run in two sessions of two steps (the second resumes), without a terminal, with
    W&B offline, step 2 profiled and a progress line every step."""
    directory = tmp_path_factory.mktemp("operator_run")
    config = run_config(
        corpus,
        directory / "run",
        schedule={"steps": 4, "warmup_steps": 1},
        eval={"every": 2, "batches": 1},
        logging={
            "progress_bar": True, "progress_every_steps": 1, "expert_usage": True,
            "wandb": {"project": "moeut-test", "mode": "offline"},
        },
        profiling={"start_step": 2, "steps": 1, "ranks": [0]},
        stop_after_steps=2,
    )  # fmt: skip
    path = write_config(config, directory / "run.yaml")
    outputs = []
    for _ in range(2):
        result = moeut("train", "--config", str(path))
        assert result.returncode == 0, result.stderr[-4000:]
        outputs.append(result.stdout + result.stderr)
    return TwoSessions(directory / "run", outputs)


# --- logs and progress --------------------------------------------------------------------


def test_without_a_terminal_progress_is_plain_periodic_lines(two_sessions):
    for session, output in enumerate(two_sessions.outputs):
        assert "\r" not in output
        for step in (2 * session + 1, 2 * session + 2):
            line = re.search(rf"INFO step {step}/4 \(\d+%\) \| .*", output)
            assert line, output
            assert re.search(r"tok/s \| elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d$", line[0])
        # The loss is the last metrics record's (fetched from the device only for a record):
        # the session's second step writes one.
        assert re.search(rf"INFO step {2 * session + 2}/4 \(\d+%\) \| .*\| loss [\d.]+ \|", output)
        # Dependency noise is gone; MFU on CPU is left out with a note.
        assert "Setting accelerator to CPU" not in output
        assert "Transformer Engine and Apex are not installed" not in output
        assert "MFU is not logged on CPU" in output
    assert all("mfu" not in record for record in read_run_metrics(two_sessions.out_dir))


def test_logs_name_the_rank_and_other_ranks_keep_to_warnings(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logs.configure("info")
    logging.getLogger("moeut_dist.anything").info("rank 0 speaks for the run")
    logging.getLogger("data_prep.anything").warning("a problem of this rank")
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU")
    out, err = capsys.readouterr()
    assert re.fullmatch(r"\S+ \S+ WARNING \[rank 1\] a problem of this rank\n", err)
    assert "Setting accelerator" not in out + err
    monkeypatch.undo()
    logs.configure("debug")
    logging.getLogger("moeut_dist.anything").debug("now shown")
    assert re.fullmatch(r"\S+ \S+ DEBUG now shown\n", capsys.readouterr().err)
    logs.configure()


def test_progress_lines_come_every_n_steps_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="moeut_dist.progress")
    with Progress(total=10, initial=3, every_steps=2, every_seconds=1e9, terminal=False) as bar:
        for _ in range(5):
            bar.update(1, loss="1.0")
    steps = [re.match(r"step (\d+)/10", r.getMessage())[1] for r in caplog.records]
    assert steps == ["5", "7", "8"]


def test_prep_progress_without_a_terminal_is_plain_lines(corpus, tmp_path, caplog, capfd):
    source = write_jsonl(tmp_path / "more.jsonl", synthetic_documents(60, seed=1))
    caplog.set_level(logging.INFO, logger="moeut_dist.progress")
    build_shards([source], tmp_path / "shards", corpus.tokenizer, 32, progress_every_seconds=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "moeut_dist.progress"]
    assert lines and all(
        re.fullmatch(r"[\d.]+[kMG]? tok \| [\d.]+[kMG]? tok/s \| elapsed .*", x) for x in lines
    )
    assert "\r" not in capfd.readouterr().err


# --- W&B, profiler --------------------------------------------------------------------------


def test_wandb_offline_run_holds_the_metrics_and_config_and_resumes_the_same_run(two_sessions):
    run_id = (two_sessions.out_dir / RUN_ID_FILE).read_text().strip()
    files = sorted((two_sessions.out_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one per session, both of the same W&B run
    assert {run_record(f).run_id for f in files} == {run_id}
    rows = [row for f in files for row in logged_history(f)]
    steps = sorted(row["_step"] for row in rows if "train/loss" in row)
    assert steps == [1, 2, 3, 4]
    assert any("val/loss" in row for row in rows)
    first = next(row for row in rows if "train/loss" in row)
    assert {"train/lr", "train/grad_norm", "train/tokens_per_second"} <= first.keys()
    assert "train/expert_entropy/layer0" in first
    assert logged_summary(files[0])["model/parameters"] > 0
    config = logged_config(files[0])
    assert config["schedule"]["steps"] == 4 and config["model"]["profile"] == "tiny"


def test_profiler_writes_a_chrome_trace_of_the_chosen_steps(two_sessions):
    (trace,) = (two_sessions.out_dir / "profiles").iterdir()
    assert trace.name == "rank0_steps2-2.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(event.get("name") == "aten::mm" for event in events)


# --- MFU ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "bf16", "peak"),
    [
        ("NVIDIA H200", True, 989.4e12),
        ("NVIDIA H100 80GB HBM3", True, 989.4e12),
        ("NVIDIA H100 PCIe", True, 756e12),
        ("NVIDIA H100 NVL", False, 60e12),
        ("NVIDIA A100-SXM4-80GB", True, 312e12),
        ("NVIDIA A100-PCIE-40GB", False, 19.5e12),
        ("NVIDIA L40S", True, 362.05e12),
        ("NVIDIA L4", True, 121e12),
        ("AMD Instinct MI300X", True, 1307.4e12),
        ("NVIDIA L40", True, None),  # not in the table: no guess from the L4 or L40S
        ("NVIDIA GeForce RTX 4090", True, None),
    ],
)
def test_peak_flops_are_looked_up_by_device_name(device, bf16, peak):
    assert peak_flops(device, bf16) == peak


# --- the command line -----------------------------------------------------------------------


def _subcommands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public way to list subcommands; `_actions` and `_SubParsersAction` are
    # its long-standing internals.
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found[prefix + name] = child
                found |= _subcommands(child, prefix + name + " ")
    return found


def test_every_option_has_help_and_every_help_shows_defaults(capsys):
    commands = _subcommands(cli.build_parser())
    assert {"train", "prep shards", "plot", "eval", "demo"} <= commands.keys()
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, f"moeut {name}: {action.option_strings or action.dest} has no help"
    for name in commands:
        with pytest.raises(SystemExit):
            cli.main([*name.split(), "--help"])
    text = capsys.readouterr().out
    assert "--log-level {debug,info,warning,error}" in text
    assert "(default: 1000)" in text and "(default: 8000)" in text
    assert "optim.lr: 0.00025" in text and "data.shard_dir: (required)" in text


def test_version():
    result = moeut("--version")
    assert re.fullmatch(r"moeut \d+\.\d+\.\d+\S*\n", result.stdout)


def test_readme_commands_use_the_cli_argument_names():
    readme = (REPO / "README.md").read_text()
    commands = _subcommands(cli.build_parser())
    checked = 0
    for line in re.findall(r"^moeut [^\n]*", readme, re.MULTILINE):
        words = line.split()
        name = " ".join(words[1:3]) if " ".join(words[1:3]) in commands else words[1]
        options = {o for action in commands[name]._actions for o in action.option_strings}
        for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line.split("#")[0]):
            assert option in options, f"README: `{line}` names {option}, not an option of {name}"
            checked += 1
    assert checked >= 10


def test_print_config_loads_back_to_an_equal_config(corpus, tmp_path, capsys):
    path = write_config(run_config(corpus, tmp_path / "run"), tmp_path / "run.yaml")
    overrides = ["optim.lr=1e-3", "model.d_model=32", "logging.wandb.name=exp #2"]
    assert cli.main(["train", "--config", str(path), "--print-config", *overrides]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed) == load_config(path, overrides)
    printed_values = yaml.safe_load(printed.read_text())
    assert printed_values["optim"]["lr"] == 1e-3
    assert printed_values["logging"]["wandb"] == {
        "project": "moeut", "entity": None, "name": "exp #2", "mode": "online"
    }  # fmt: skip


def test_dry_run_checks_and_describes_the_run_without_training(corpus, tmp_path, capsys):
    out_dir = tmp_path / "run"
    path = write_config(run_config(corpus, out_dir), tmp_path / "run.yaml")
    args = ["train", "--config", str(path), "--dry-run", "--world-size", "4"]
    assert cli.main([*args, "parallel.expert=2"]) == 0
    text = capsys.readouterr().out
    assert "layout: 4 processes = tensor 1 × data 4; expert 2 (expert data parallel 2)" in text
    assert re.search(r"model: profile tiny, moeut: 0\.\d+M parameters, 0\.\d+M active", text)
    assert re.search(r"memory per rank .*optimizer state [\d.]+ MiB", text)
    assert not out_dir.exists()  # no step, no checkpoint, no log
    assert cli.main([*args, "parallel.expert=3"]) == 2
    assert "world size 4 is not a multiple" in capsys.readouterr().err


# --- moeut plot -----------------------------------------------------------------------------


def test_plot_overlays_runs_and_draws_expert_usage(two_sessions, tmp_path, capsys):
    dense = tmp_path / "dense"
    dense.mkdir()
    records = [{"kind": "train", "step": s, "loss": 6 - s / 2} for s in range(1, 5)]
    records.append({"kind": "val", "step": 4, "loss": 4.5})
    (dense / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "plots"
    assert cli.main(["plot", str(two_sessions.out_dir), str(dense), "--out", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(out / "loss.png"), str(out / "expert_usage.png")]
    for png in written:
        assert Path(png).read_bytes().startswith(b"\x89PNG") and imread(png).ndim == 3
    assert cli.main(["plot", str(dense), "--label", "a", "--label", "b"]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err


# --- dataclasses from plain dicts -------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class _Data:
    sources: list[_Source] = field(default_factory=list)
    kind: Literal["a", "b"] = "a"
    shape: tuple[int, int] = (1, 2)
    ranks: tuple[int, ...] = ()
    extra: dict[str, _Source] = field(default_factory=dict)
    limit: int | None = None


def test_dataclass_dict_round_trips_nested_lists_optionals_and_tuples():
    values = {
        "sources": [{"path": "x", "weight": "2.5e-1"}, {"path": "y"}],
        "kind": "b",
        "shape": [3, 4],
        "ranks": [0, 2],
        "extra": {"z": {"path": "z", "weight": 2}},
        "limit": None,
    }
    data = from_dict(_Data, values)
    assert data.sources == [_Source("x", 0.25), _Source("y", 1.0)]
    assert data.shape == (3, 4) and data.ranks == (0, 2) and data.extra["z"].weight == 2.0
    assert from_dict(_Data, json.loads(json.dumps(to_dict(data)))) == data


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sources": [{"path": "x"}, {"paht": "y"}]}, r"unknown key\(s\) \['sources\[1\]\.paht'\]"),
        ({"sources": [{"weight": 1}]}, r"missing key\(s\) \['sources\[0\]\.path'\]"),
        ({"sources": [{"path": "x", "weight": "heavy"}]}, "sources\\[0\\].weight must be float"),
        ({"kind": "c"}, r"kind must be one of \['a', 'b'\], got 'c'"),
        ({"shape": [1]}, "shape must be a list of 2 values"),
        ({"ranks": [0, True]}, r"ranks\[1\] must be int, got True"),
        ({"extra": {"k": {"path": 3}}}, "extra.k.path must be str, got 3"),
        ({"limit": 1.5}, "limit must be int, got 1.5"),
        ({"sources": {"path": "x"}}, "sources must be a list"),
    ],
)
def test_dataclass_dict_errors_name_the_dotted_key(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(_Data, values)
