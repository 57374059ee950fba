"""Weighted mixtures of corpora (`data.sources`): the loader and training runs."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_prep.shards import build_shards
from data_prep.synthetic import synthetic_documents, write_jsonl
from moeut_dist.config import ConfigError
from moeut_dist.data import TokenLoader
from moeut_dist.data.mixture import MixtureLoader, Source, step_labels
from moeut_dist.train import loop
from moeut_dist.train.config import check_run, load_config
from moeut_dist.train.metrics import read_run_metrics
from tests.train_helpers import (
    SEQ_LEN,
    Corpus,
    assert_same_run,
    make_corpus,
    run_config,
    run_result,
    write_config,
)

SAMPLES_PER_STEP = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("mixture"))


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, corpus) -> Path:
    """A second corpus, much smaller than the first (its epochs end sooner), same tokenizer."""
    folder = tmp_path_factory.mktemp("small")
    documents = synthetic_documents(16, seed=11, words_per_document=(20, 80))
    source = write_jsonl(folder / "small.jsonl", documents)
    build_shards(
        [source], folder / "shards", corpus.tokenizer, SEQ_LEN, shard_bytes=5_000,
        val_fraction=0.3, progress=False,
    )  # fmt: skip
    return folder / "shards"


def _sources(corpus: Corpus, small_shards: Path, big: float = 3.0, small: float = 1.0):
    return [Source("big", str(corpus.shard_dir), big), Source("small", str(small_shards), small)]


def _mixture(sources, corpus: Corpus, **options) -> MixtureLoader:
    options = {"batch_size": 4, "samples_per_step": SAMPLES_PER_STEP, "seed": 7, **options}
    return MixtureLoader(sources, seq_len=SEQ_LEN, tokenizer=corpus.tokenizer, **options)


def _alone(shard_dir, corpus: Corpus, samples: int) -> list[bytes]:
    """The first `samples` samples of one source read alone, as a mixture reads it."""
    stream = TokenLoader(
        shard_dir, seq_len=SEQ_LEN, tokenizer=corpus.tokenizer, batch_size=1, seed=7
    )
    return [row.numpy().tobytes() for batch in itertools.islice(stream, samples) for row in batch]


def test_sources_make_up_their_share_and_keep_their_own_order(corpus, small_shards):
    sources = _sources(corpus, small_shards)
    mixture = _mixture(sources, corpus)
    steps = 60
    rows = [row for batch in itertools.islice(mixture, steps * 2) for row in batch]
    labels = [step_labels([3.0, 1.0], 7, step, SAMPLES_PER_STEP) for step in range(steps)]
    small_taken = int(sum((label == 1).sum() for label in labels))
    n = steps * SAMPLES_PER_STEP
    # Binomial: within 4 standard deviations of the expected count.
    assert abs(small_taken - n / 4) <= 4 * math.sqrt(n * 0.25 * 0.75)
    # Every source is read in the order it has alone, across the small one's epoch ends.
    drawn = [rows[i].numpy().tobytes() for i in range(n)]
    flat_labels = [int(label) for step_labels_ in labels for label in step_labels_]
    by_source = {index: [s for s, lab in zip(drawn, flat_labels, strict=True) if lab == index]
                 for index in (0, 1)}  # fmt: skip
    small_epoch = TokenLoader(
        small_shards, seq_len=SEQ_LEN, tokenizer=corpus.tokenizer, batch_size=1
    ).samples_per_epoch
    assert small_taken > small_epoch  # the small source wrapped around at least once
    assert by_source[0] == _alone(corpus.shard_dir, corpus, len(by_source[0]))
    assert by_source[1] == _alone(small_shards, corpus, len(by_source[1]))
    assert mixture.samples == {"big": n - small_taken, "small": small_taken}


def test_resumed_mixture_continues_bit_for_bit(corpus, small_shards):
    sources = _sources(corpus, small_shards)
    reference = list(itertools.islice(_mixture(sources, corpus, num_workers=2), 24))
    interrupted = _mixture(sources, corpus, num_workers=2)
    first = list(itertools.islice(interrupted, 10))  # five steps of two micro-batches
    resumed = _mixture(sources, corpus, num_workers=2)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    rest = list(itertools.islice(resumed, 14))
    assert all(a.equal(b) for a, b in zip(first + rest, reference, strict=True))


def test_new_weights_apply_from_the_restored_step(corpus, small_shards):
    interrupted = _mixture(_sources(corpus, small_shards), corpus)
    list(itertools.islice(interrupted, 6))  # three steps
    reweighted = _mixture(_sources(corpus, small_shards, big=1.0, small=9.0), corpus)
    reweighted.load_state_dict(interrupted.state_dict())
    assert reweighted.weight_changes == {"big": (3.0, 1.0), "small": (1.0, 9.0)}
    before = dict(reweighted.samples)
    list(itertools.islice(reweighted, 2))  # step 3, drawn with the new weights
    labels = step_labels([1.0, 9.0], 7, 3, SAMPLES_PER_STEP)
    assert reweighted.samples["small"] - before["small"] == int((labels == 1).sum())


def test_other_changes_to_the_sources_are_refused_by_name(corpus, small_shards, tmp_path):
    state = _mixture(_sources(corpus, small_shards), corpus).state_dict()
    renamed = [Source("web", str(corpus.shard_dir), 3.0), Source("small", str(small_shards), 1.0)]
    with pytest.raises(ValueError, match="source 'web' added; source 'big' removed"):
        _mixture(renamed, corpus).load_state_dict(state)
    moved = [Source("big", str(small_shards), 3.0), Source("small", str(small_shards), 1.0)]
    with pytest.raises(ValueError, match="source 'big' has shard_dir"):
        _mixture(moved, corpus).load_state_dict(state)
    single = TokenLoader(
        corpus.shard_dir, seq_len=SEQ_LEN, tokenizer=corpus.tokenizer, batch_size=4
    )
    with pytest.raises(
        ValueError, match=r"saved run mixed data\.sources, this one reads data\.shard"
    ):
        single.load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved run read data\.shard_dir, this one mixes"):
        _mixture(moved, corpus).load_state_dict(single.state_dict())


def test_a_source_of_another_seq_len_is_refused_by_name(corpus, small_shards, tmp_path):
    other = tmp_path / "other"
    build_shards(
        [corpus.shard_dir.parent / "corpus.jsonl"], other, corpus.tokenizer, SEQ_LEN * 2,
        val_fraction=0.1, progress=False,
    )  # fmt: skip
    data = {
        "shard_dir": "",
        "sources": [
            {"name": "main", "shard_dir": str(corpus.shard_dir), "weight": 1},
            {"name": "long", "shard_dir": str(other), "weight": 1},
        ],
    }
    path = write_config(run_config(corpus, tmp_path / "run", data=data), tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match=r"data\.sources\[long\]: shards were built with seq_len"):
        check_run(load_config(path), world_size=1)
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.weight must be float"):
        load_config(path, ["data.sources=[{name: a, shard_dir: b, weight: much}]"])


def _mixture_run(corpus, small_shards, tmp_path, **data) -> dict:
    data = {
        "shard_dir": "",
        "sources": [
            {"name": "big", "shard_dir": str(corpus.shard_dir), "weight": 3.0},
            {"name": "small", "shard_dir": str(small_shards), "weight": 1.0},
        ],
        **data,
    }
    return run_config(
        corpus,
        tmp_path,
        data=data,
        schedule={"steps": 4, "warmup_steps": 1},
        eval={"every": 2, "batches": 1},
    )


def test_mixture_run_resumes_bit_for_bit_and_records_weight_changes(corpus, small_shards, tmp_path):
    config = _mixture_run(corpus, small_shards, tmp_path / "whole")
    loop.train(load_config(write_config(config, tmp_path / "whole.yaml")))
    whole = run_result(tmp_path / "whole.yaml")
    last = whole.records[-1]
    assert last["tokens/big"] + last["tokens/small"] == 4 * 8 * SEQ_LEN
    assert last["data/read_retries"] == 0 and last["data/skipped_shards"] == 0
    val = read_run_metrics(config["out_dir"], "val")
    assert {"loss/big", "perplexity/big", "loss/small", "perplexity/small"} <= val[-1].keys()

    config = _mixture_run(corpus, small_shards, tmp_path / "split")
    loop.train(load_config(write_config({**config, "stop_after_steps": 2}, tmp_path / "a.yaml")))
    shutil.copytree(tmp_path / "split", tmp_path / "reweighted")
    loop.train(load_config(write_config(config, tmp_path / "split.yaml")))
    assert_same_run(run_result(tmp_path / "split.yaml"), whole)

    config = _mixture_run(corpus, small_shards, tmp_path / "reweighted")
    config["data"]["sources"][1]["weight"] = 9.0
    loop.train(load_config(write_config(config, tmp_path / "reweighted.yaml")))
    events = read_run_metrics(config["out_dir"], "event")
    changes = [e["source_weights_changed"] for e in events if "source_weights_changed" in e]
    assert changes == [{"small": {"before": 1.0, "now": 9.0}}]
    assert run_result(tmp_path / "reweighted.yaml").losses[2:] != whole.losses[2:]


def test_weight_draws_are_a_function_of_seed_and_step():
    first = step_labels([1.0, 2.0, 3.0], seed=1, step=5, samples=64)
    assert torch.equal(torch.from_numpy(first), torch.from_numpy(step_labels([1, 2, 3], 1, 5, 64)))
    assert not (first == step_labels([1.0, 2.0, 3.0], seed=1, step=6, samples=64)).all()
    assert Counter(first.tolist()).keys() <= {0, 1, 2}
