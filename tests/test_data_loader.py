"""The streaming shard loader (`moeut_dist.data.TokenLoader`)."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

from data_prep.shards import build_shards
from data_prep.synthetic import synthetic_documents, write_jsonl
from data_prep.tokenizer import train_tokenizer
from moeut_dist.data import (
    ManifestMismatchError,
    ShardError,
    Tokenizer,
    TokenLoader,
    loader,
    read_manifest,
    read_shard,
)

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = write_jsonl(folder / "corpus.jsonl", synthetic_documents(200, seed=3))
    return train_tokenizer([corpus], folder / "tok.model", vocab_size=400)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tokenizer) -> Path:
    """About 1000 training samples in shards of 30, so that slots straddle shards."""
    folder = tmp_path_factory.mktemp("shards")
    corpus = write_jsonl(folder / "corpus.jsonl", synthetic_documents(300, seed=4))
    build_shards(
        [corpus],
        folder / "shards",
        tokenizer.path,
        SEQ_LEN,
        shard_bytes=30 * 1024,
        val_fraction=0.1,
        progress=False,
    )
    return folder / "shards"


def _loader(shard_dir: Path, tokenizer: Tokenizer, **options) -> TokenLoader:
    return TokenLoader(shard_dir, seq_len=SEQ_LEN, tokenizer=tokenizer.path, **options)


def _rows(batches) -> Counter[bytes]:
    return Counter(row.numpy().tobytes() for batch in batches for row in batch)


def _all_samples(shard_dir: Path, split: str = "train", only: str | None = None) -> Counter[bytes]:
    """The split's samples as the loader yields them, or those of the shard named `only`."""
    manifest = read_manifest(shard_dir)
    rows = Counter()
    for shard in manifest.split(split).shards:
        if only in (None, shard.name):
            stored = read_shard(
                shard_dir / shard.name,
                shard.samples,
                manifest.sample_len,
                np.dtype(manifest.dtype),
                vocab_size=manifest.vocab_size,
                sha256=shard.sha256,
            )
            rows.update(row.astype(np.int64).tobytes() for row in stored)
    return rows


def test_batches_have_the_promised_shape_and_dtype(shard_dir, tokenizer):
    batch = next(iter(_loader(shard_dir, tokenizer, batch_size=4)))
    assert batch.shape == (4, SEQ_LEN + 1)
    assert str(batch.dtype) == "torch.int64"


def test_every_sample_once_per_epoch_across_2_ranks_and_2_workers(shard_dir, tokenizer):
    expected = _all_samples(shard_dir)
    assert sum(expected.values()) > 500
    seen = Counter()
    for rank in range(2):
        epoch = _loader(
            shard_dir,
            tokenizer,
            batch_size=7,
            dp_rank=rank,
            dp_world_size=2,
            num_workers=2,
            epochs=1,
        )
        seen += _rows(epoch)
    assert seen == expected


def test_each_epoch_is_a_fresh_order_of_all_samples(shard_dir, tokenizer):
    stream = _loader(shard_dir, tokenizer, batch_size=1)
    rows = [
        batch[0].numpy().tobytes()
        for batch in itertools.islice(stream, 2 * stream.samples_per_epoch)
    ]
    first, second = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    assert Counter(first) == Counter(second) == _all_samples(shard_dir)
    assert first != second


def test_validation_split_is_read_the_same_way(shard_dir, tokenizer):
    batches = list(_loader(shard_dir, tokenizer, batch_size=8, split="val", epochs=1))
    assert _rows(batches) == _all_samples(shard_dir, "val")


@pytest.mark.parametrize("num_workers, dp_rank", [(0, 0), (2, 1)])
def test_resume_at_any_batch_equals_the_uninterrupted_sequence(
    shard_dir, tokenizer, num_workers, dp_rank
):
    options = dict(batch_size=5, dp_rank=dp_rank, dp_world_size=2, num_workers=num_workers)
    # 130 batches of 5 cross more than one epoch of this rank's ~470 samples.
    reference = [b.clone() for b in itertools.islice(_loader(shard_dir, tokenizer, **options), 130)]
    for stop in (1, 37, 101):
        interrupted = _loader(shard_dir, tokenizer, **options)
        for _ in itertools.islice(interrupted, stop):
            pass
        state = json.loads(json.dumps(interrupted.state_dict()))
        resumed = _loader(shard_dir, tokenizer, **options)
        resumed.load_state_dict(state)
        rest = list(itertools.islice(resumed, len(reference) - stop))
        assert all(a.equal(b) for a, b in zip(rest, reference[stop:], strict=True)), stop


def test_resume_of_a_finite_pass_ends_where_the_uninterrupted_one_does(shard_dir, tokenizer):
    options = dict(batch_size=7, dp_rank=1, dp_world_size=3, num_workers=2, epochs=2)
    reference = list(_loader(shard_dir, tokenizer, **options))
    for stop in (len(reference) - 2, len(reference) - 1):
        interrupted = _loader(shard_dir, tokenizer, **options)
        for _ in itertools.islice(interrupted, stop):
            pass
        resumed = _loader(shard_dir, tokenizer, **options)
        resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
        rest = list(resumed)
        assert len(rest) == len(reference) - stop, stop
        assert all(a.equal(b) for a, b in zip(rest, reference[stop:], strict=True)), stop


def _steps(layout: dict, steps: int, state: dict | None, shard_dir, tokenizer):
    """Each step's global batch (every rank's micro-batches) under `layout` (ranks, workers,
    micro-batch size, accumulation), starting from `state`; and the state after them."""
    ranks, accumulation = layout["ranks"], layout["accumulation"]
    loaders = []
    for rank in range(ranks):
        one = _loader(
            shard_dir, tokenizer, batch_size=layout["batch"], dp_rank=rank,
            dp_world_size=ranks, num_workers=layout["workers"],
        )  # fmt: skip
        if state is not None:
            one.load_state_dict(json.loads(json.dumps(state)))
        loaders.append(one)
    streams = [iter(one) for one in loaders]
    batches = [
        _rows(next(stream) for stream in streams for _ in range(accumulation)) for _ in range(steps)
    ]
    states = [one.state_dict() for one in loaders]
    assert all(s == states[0] for s in states)  # at a step boundary, one global position
    return batches, states[0]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_position_continues_under_another_layout(shard_dir, tokenizer):
    """A global batch of 24 samples on 2 ranks × 2 workers (micro-batch 3, 4 accumulated), then
    on 1 rank (micro-batch 8, 3 accumulated) or 4 ranks (micro-batch 6): every step reads the
    same samples as an uninterrupted run of any layout, the epoch boundary included (~900
    samples: 40 steps cross it)."""
    first = {"ranks": 2, "workers": 2, "batch": 3, "accumulation": 4}
    others = [
        {"ranks": 1, "workers": 0, "batch": 8, "accumulation": 3},
        {"ranks": 4, "workers": 1, "batch": 6, "accumulation": 1},
    ]
    before, state = _steps(first, 36, None, shard_dir, tokenizer)
    assert state["position"] == 36 * 24
    for other in others:
        after, _ = _steps(other, 6, state, shard_dir, tokenizer)
        uninterrupted, _ = _steps(other, 42, None, shard_dir, tokenizer)
        assert before + after == uninterrupted


def test_resume_skips_consumed_shards_without_reading_them(shard_dir, tokenizer, monkeypatch):
    reads = []
    real_read_shard = loader.read_shard
    monkeypatch.setattr(
        loader,
        "read_shard",
        lambda path, *args, **kwargs: (
            reads.append(Path(path).name) or real_read_shard(path, *args, **kwargs)
        ),
    )
    # Without prefetching, so that every read is that of a shard needed, and made before the
    # batch that needs it is returned.
    interrupted = _loader(shard_dir, tokenizer, batch_size=8, prefetch_shards=0)
    for _ in itertools.islice(interrupted, 50):  # 400 samples: a dozen shards in
        pass
    current_shard = reads[-1]
    reads.clear()
    resumed = _loader(shard_dir, tokenizer, batch_size=8, prefetch_shards=0)
    resumed.load_state_dict(interrupted.state_dict())
    next(iter(resumed))
    assert reads[0] == current_shard
    assert len(reads) <= 2  # the current shard and, if the batch needs more, the next


@pytest.mark.parametrize("num_workers, batch_size", [(0, 5), (1, 7), (2, 8)])
def test_batches_do_not_depend_on_prefetching(shard_dir, tokenizer, num_workers, batch_size):
    """From a resumed place across an epoch boundary; with 2 workers of 2 ranks reading 8
    samples every 32 places, each worker passes over some of the 30-sample shards."""
    options = dict(batch_size=batch_size, dp_rank=1, dp_world_size=2, num_workers=num_workers)
    first = _loader(shard_dir, tokenizer, **options)
    state = {**first.state_dict(), "position": first.samples_per_epoch - 317}

    def batches(prefetch_shards: int) -> list:
        resumed = _loader(shard_dir, tokenizer, prefetch_shards=prefetch_shards, **options)
        resumed.load_state_dict(state)
        return list(itertools.islice(resumed, 60))  # 60 × 2 ranks × 5 to 8 samples

    reference = batches(0)
    for prefetch_shards in (1, 2):
        got = batches(prefetch_shards)
        assert all(a.equal(b) for a, b in zip(got, reference, strict=True)), prefetch_shards


def test_state_of_another_data_order_is_refused(shard_dir, tokenizer):
    state = _loader(shard_dir, tokenizer, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="another data order \\(seed: 0 saved, 1 now\\)"):
        _loader(shard_dir, tokenizer, batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="format 2 is not this version's 3"):
        _loader(shard_dir, tokenizer, batch_size=4).load_state_dict({**state, "format": 2})


def _truncate_a_shard(shard_dir: Path, tmp_path: Path) -> Path:
    copy = shutil.copytree(shard_dir, tmp_path / "copy")
    shard = copy / read_manifest(copy).split("train").shards[3].name
    shard.write_bytes(shard.read_bytes()[:10_000])
    return shard


def test_truncated_shard_is_an_error_naming_it(shard_dir, tokenizer, tmp_path):
    shard = _truncate_a_shard(shard_dir, tmp_path)
    with pytest.raises(ShardError, match=str(shard)):
        list(_loader(shard.parent, tokenizer, batch_size=8, num_workers=2, epochs=1))


def test_truncated_shard_is_skipped_when_asked(shard_dir, tokenizer, tmp_path):
    shard = _truncate_a_shard(shard_dir, tmp_path)
    epoch = _loader(shard.parent, tokenizer, batch_size=8, epochs=1, skip_corrupt=True)
    with pytest.warns(RuntimeWarning, match=str(shard)):
        seen = _rows(epoch)
    assert epoch.skipped_shards == 1
    assert seen == _all_samples(shard_dir) - _all_samples(shard_dir, only=shard.name)


def test_corrupt_shard_met_by_prefetching_is_reported_when_needed(shard_dir, tokenizer, tmp_path):
    """The same batches, and the same counters after each, as reading each shard when needed;
    without `skip_corrupt`, the error comes after the same batches."""
    shard = _truncate_a_shard(shard_dir, tmp_path)

    def batches_and_counters(prefetch_shards: int, skip_corrupt: bool) -> tuple[list, list]:
        epoch = _loader(
            shard.parent, tokenizer, batch_size=64, num_workers=2, epochs=1,
            skip_corrupt=skip_corrupt, prefetch_shards=prefetch_shards,
        )  # fmt: skip
        batches, counters = [], []
        with nullcontext() if skip_corrupt else pytest.raises(ShardError, match=str(shard)):
            for batch in epoch:
                batches.append(batch)
                counters.append(epoch.counters())
        return batches, counters

    for skip_corrupt in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference, reference_counters = batches_and_counters(0, skip_corrupt)
            got, counters = batches_and_counters(2, skip_corrupt)
        assert len(got) == len(reference) and counters == reference_counters
        assert all(a.equal(b) for a, b in zip(got, reference, strict=True))
        assert (counters[-1]["skipped_shards"] > 0) == skip_corrupt


def _change_first_id(shard_dir: Path, tmp_path: Path, new_id) -> Path:
    """A copy of the shards in which the first id of one shard is `new_id(id, vocab_size)`."""
    copy = shutil.copytree(shard_dir, tmp_path / "copy")
    manifest = read_manifest(copy)
    shard = copy / manifest.split("train").shards[3].name
    content = bytearray(shard.read_bytes())
    dtype = np.dtype(manifest.dtype)
    first_id = slice(512, 512 + dtype.itemsize)  # after the first member's tar header
    old_id = int(np.frombuffer(content[first_id], dtype)[0])
    content[first_id] = np.array([new_id(old_id, manifest.vocab_size)], dtype).tobytes()
    shard.write_bytes(content)
    return shard


def _check_refused_then_skipped(shard: Path, shard_dir: Path, tokenizer, problem: str) -> None:
    """The damaged `shard` (a copy of one in `shard_dir`) stops an epoch with an error naming
    it and `problem`; with `skip_corrupt`, the epoch is everything else."""
    with pytest.raises(ShardError, match=rf"{shard}: {problem}"):
        list(_loader(shard.parent, tokenizer, batch_size=8, epochs=1))
    epoch = _loader(shard.parent, tokenizer, batch_size=8, epochs=1, skip_corrupt=True)
    with pytest.warns(RuntimeWarning, match=str(shard)):
        seen = _rows(epoch)
    assert epoch.skipped_shards == 1
    assert seen == _all_samples(shard_dir) - _all_samples(shard_dir, only=shard.name)


def test_shard_with_an_id_outside_the_vocabulary_is_an_error_naming_it(
    shard_dir, tokenizer, tmp_path
):
    shard = _change_first_id(shard_dir, tmp_path, lambda _, vocab_size: vocab_size)
    vocab_size = read_manifest(shard.parent).vocab_size
    _check_refused_then_skipped(shard, shard_dir, tokenizer, f"token id {vocab_size} is not below")


def test_shard_that_does_not_match_its_sha256_is_an_error_naming_it(shard_dir, tokenizer, tmp_path):
    # Another id of the vocabulary: nothing but the hash can tell.
    shard = _change_first_id(shard_dir, tmp_path, lambda old, vocab_size: (old + 1) % vocab_size)
    problem = "sha256 [0-9a-f]{64} is not the manifest's [0-9a-f]{64} \\(corrupt\\)"
    _check_refused_then_skipped(shard, shard_dir, tokenizer, problem)


def _damage_manifest(shard_dir: Path, tmp_path: Path, damage) -> Path:
    copy = shutil.copytree(shard_dir, tmp_path / "copy")
    manifest = copy / "manifest.json"
    values = json.loads(manifest.read_text())
    manifest.write_text(damage(values) if callable(damage) else damage)
    return manifest


def _without_dropped_tail(values: dict) -> str:
    del values["splits"]["val"]["dropped_tail_tokens"]
    return json.dumps(values)


def _with(key: str, value):
    return lambda values: json.dumps({**values, key: value})


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ('{"format": "moeut-token-shards/1", "seq', "Unterminated string"),
        ("[]", "the top level must be a mapping, got \\[\\]"),
        (_without_dropped_tail, "missing key\\(s\\) \\['splits.val.dropped_tail_tokens'\\]"),
        (_with("seq_len", "16"), "seq_len must be int, got '16'"),
        (_with("splits", []), "splits must be a mapping, got \\[\\]"),
        (_with("splits", {"train": {"shards": [{"name": "x"}], "dropped_tail_tokens": 0}}),
         "missing key\\(s\\) \\['splits.train.shards\\[0\\].samples'"),
        (_with("extra", 1), "unknown key\\(s\\) \\['extra'\\]"),
        (_with("format", "other/1"), "unknown manifest format 'other/1'"),
    ],
)  # fmt: skip
def test_damaged_manifest_is_a_value_error_naming_it_and_the_problem(
    shard_dir, tmp_path, damage, problem
):
    manifest = _damage_manifest(shard_dir, tmp_path, damage)
    with pytest.raises(ValueError, match=rf"^{manifest} is damaged: .*{problem}"):
        read_manifest(manifest.parent)


def test_other_tokenizer_is_refused_naming_both_hashes(shard_dir, tokenizer, tmp_path):
    corpus = write_jsonl(tmp_path / "other.jsonl", synthetic_documents(50, seed=9))
    other = train_tokenizer([corpus], tmp_path / "other.model", vocab_size=380)
    with pytest.raises(ManifestMismatchError) as error:
        TokenLoader(shard_dir, seq_len=SEQ_LEN, tokenizer=other, batch_size=4)
    assert tokenizer.sha256 in str(error.value) and other.sha256 in str(error.value)
    TokenLoader(shard_dir, seq_len=SEQ_LEN, tokenizer=tokenizer.sha256, batch_size=4)


def test_other_seq_len_is_refused_naming_both(shard_dir, tokenizer):
    with pytest.raises(ManifestMismatchError, match=f"seq_len {SEQ_LEN}, .* seq_len 64"):
        TokenLoader(shard_dir, seq_len=64, tokenizer=tokenizer, batch_size=4)
