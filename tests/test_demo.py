"""The demo pipeline end to end on a small generated corpus (the real one is not fetched in CI)."""

from __future__ import annotations

import json

import pytest
import torch

from data_prep.synthetic import synthetic_documents
from moeut_dist.cli import main as moeut
from moeut_dist.convert import from_official_state_dict
from moeut_dist.demo import DemoSettings, run_demo
from moeut_dist.export import OFFICIAL_FILE, load_pretrained

pytestmark = pytest.mark.slow


def test_demo_pipeline_on_generated_text(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(4):  # paragraphs are the documents, as in the plays
        documents = synthetic_documents(60, seed=index, words_per_document=(20, 80))
        (corpus / f"text{index}.txt").write_text("\n\n".join(documents) + "\n")
    settings = DemoSettings(
        work_dir=tmp_path / "work", corpus=corpus, vocab_size=400, seq_len=32, steps=30,
        val_fraction=0.1, prompt="ba",
    )  # fmt: skip

    run_demo(settings)
    printed = capsys.readouterr().out
    model = load_pretrained(settings.model_dir)
    assert model.config.vocab_size == 400
    assert (settings.work_dir / "loss.png").stat().st_size > 10_000
    before, after = (
        float(line.split("perplexity")[1].split(",")[0])
        for line in printed.splitlines()
        if "training: perplexity" in line
    )
    assert after < 0.8 * before
    assert "\nba" in printed  # the sample starts with the prompt

    def logged_steps(kind: str) -> list[int]:
        records = map(json.loads, (settings.run_dir / "metrics.jsonl").read_text().splitlines())
        return [record["step"] for record in records if record["kind"] == kind]

    assert logged_steps("train") == [10, 20, 30]
    assert logged_steps("val") == [30]  # the last step is always validated

    # The run also exports through the command line, here with the authors' format beside it.
    out = tmp_path / "exported"
    assert moeut(["export", str(settings.run_dir), str(out), "--official"]) == 0
    official = torch.load(out / OFFICIAL_FILE, weights_only=True)
    restored = from_official_state_dict(official, model.config)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    capsys.readouterr()
    assert moeut(["export", str(tmp_path), str(out)]) == 2
    assert "neither a run directory with checkpoints nor a complete checkpoint" in (
        capsys.readouterr().err
    )

    run_demo(settings)  # a rerun finds every step done: nothing is trained again
    assert logged_steps("train") == [10, 20, 30]
