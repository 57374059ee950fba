"""Streaming token batches from webdataset shards, split across ranks and workers, resumable
under any layout.

The order of an epoch is a pure function of (seed, epoch): the split's shards are put in an
order drawn from (seed, epoch) and their samples laid end to end, each shard's samples in an
order drawn from (seed, epoch, shard). Epochs follow one another into one endless sequence, and
its places are the loader's only coordinates: the global batch of micro-batch round `k` (every
data-parallel rank's k-th micro-batch) is the `dp_world_size × batch_size` places after the
`k` rounds before it, rank `r` taking the r-th `batch_size` of them. So what a run has consumed
after any number of optimizer steps is a prefix of the sequence, whatever the number of ranks,
workers or the micro-batch size, and the loader's state is one number, the length of that
prefix: a run resumed under another layout continues at the same place, with no sample of the
epoch read twice or skipped.

Within a rank, dataloader worker `w` of `W` reads micro-batches `w, w + W, …` and the DataLoader
takes them round robin, which is micro-batch order. Each worker reads the shards its
micro-batches fall in (one shard in memory at a time), so every worker reads every shard of an
epoch, using its share of the samples: sequential reads of a few MB per shard, far below what a
training step consumes in compute. A restored loader starts at its place; whole shards before
it are skipped using the manifest's counts, unread.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
import webdataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from moeut_dist.data.manifest import SAMPLE_FIELD, ShardInfo, read_manifest
from moeut_dist.data.tokenizer import Tokenizer, file_sha256

_STATE_FORMAT = 3
# Cumulative data faults each worker counts: corrupt shards passed over (`skip_corrupt`), and
# reads that failed and were tried again.
COUNTERS = ("skipped_shards", "read_retries")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ShardError(RuntimeError):
    """A shard that cannot be read as the manifest describes it; the message names its path."""


class _HashingReader:
    """A binary file that hashes (sha256) the bytes read from it on their way."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._sha256.update(data)
        return data

    def sha256_of_whole_file(self) -> str:
        """The hex sha256 of the whole file, reading what is left of it (a tar's end padding)."""
        while self.read(1 << 20):
            pass
        return self._sha256.hexdigest()


def read_shard(
    path: Path,
    samples: int,
    sample_len: int,
    dtype: np.dtype,
    *,
    vocab_size: int,
    sha256: str,
) -> np.ndarray:
    """A shard's samples in stored order, `[samples, sample_len]`, checked against the manifest.

    Every id must be below `vocab_size`: a flipped bit or another tokenizer's shard fails here,
    naming the shard, instead of as an index error inside the embedding. `sha256`, the
    manifest's hash of the file, catches any other change; it is computed from the bytes read
    for the samples, so checking it costs no second read.
    """
    rows = np.empty((samples, sample_len), dtype)
    sample_bytes = sample_len * dtype.itemsize
    count = 0
    try:
        with open(path, "rb") as file:
            reader = _HashingReader(file)
            for member in webdataset.tariterators.tar_file_iterator(reader):
                if count == samples:
                    raise ShardError(f"{path}: holds more than the manifest's {samples} samples")
                data = member["data"]
                if not member["fname"].endswith(f".{SAMPLE_FIELD}") or len(data) != sample_bytes:
                    raise ShardError(
                        f"{path}: member {member['fname']} is not a {sample_bytes}-byte sample"
                    )
                rows[count] = np.frombuffer(data, dtype)
                count += 1
            found_sha256 = reader.sha256_of_whole_file()
    except (OSError, tarfile.TarError) as error:
        raise ShardError(f"{path}: unreadable shard ({error})") from error
    if count != samples:
        raise ShardError(f"{path}: holds {count} samples, the manifest says {samples} (truncated?)")
    if rows.size and (largest := rows.max()) >= vocab_size:
        raise ShardError(
            f"{path}: token id {largest} is not below the manifest's vocab_size {vocab_size}"
        )
    if found_sha256 != sha256:
        raise ShardError(f"{path}: sha256 {found_sha256} is not the manifest's {sha256} (corrupt)")
    return rows


class _EpochOrder:
    """Which shard sample each place of the endless sequence is: shards in an order drawn from
    (seed, epoch), laid end to end; within a shard, an order drawn from (seed, epoch, shard)."""

    def __init__(self, shard_samples: Sequence[int], seed: int) -> None:
        self._samples = np.asarray(shard_samples, dtype=np.int64)
        self._seed = seed
        self.samples_per_epoch = int(self._samples.sum())

    def pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """(epoch, shard, first, end) pieces covering places `start:stop`, in order: positions
        `first:end` of that shard's order in that epoch."""
        while start < stop:
            epoch, offset = divmod(start, self.samples_per_epoch)
            shards = np.random.default_rng((self._seed, epoch)).permutation(len(self._samples))
            ends = np.cumsum(self._samples[shards])
            index = int(np.searchsorted(ends, offset, side="right"))
            shard_start = int(ends[index] - self._samples[shards[index]])
            taken = min(stop - start, int(ends[index]) - offset)
            first = offset - shard_start
            yield epoch, int(shards[index]), first, first + taken
            start += taken

    def sample_order(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng((self._seed, epoch, shard)).permutation(self._samples[shard])


class _ShardReader:
    """The samples of places of the sequence, read from the shards one shard at a time."""

    def __init__(
        self,
        shard_dir: Path,
        shards: Sequence[ShardInfo],
        sample_len: int,
        dtype: np.dtype,
        vocab_size: int,
        seed: int,
        skip_corrupt: bool,
    ) -> None:
        self._shard_dir = shard_dir
        self._shards = shards
        self._sample_len = sample_len
        self._dtype = dtype
        self._vocab_size = vocab_size
        self._skip_corrupt = skip_corrupt
        self.order = _EpochOrder([shard.samples for shard in shards], seed)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._cached: tuple[int, np.ndarray | None] | None = None  # (shard, its samples)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The samples at places `start:stop`, less those of corrupt shards (`skip_corrupt`)."""
        parts = [np.empty((0, self._sample_len), self._dtype)]
        for epoch, shard, first, end in self.order.pieces(start, stop):
            stored = self._stored(shard)
            if stored is not None:
                parts.append(stored[self.order.sample_order(epoch, shard)[first:end]])
        return np.concatenate(parts)

    def _stored(self, index: int) -> np.ndarray | None:
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, self._read(self._shards[index]))
        return self._cached[1]

    def _read(self, shard: ShardInfo) -> np.ndarray | None:
        try:
            return read_shard(
                self._shard_dir / shard.name,
                shard.samples,
                self._sample_len,
                self._dtype,
                vocab_size=self._vocab_size,
                sha256=shard.sha256,
            )
        except ShardError as error:
            if not self._skip_corrupt:
                raise
            warnings.warn(f"skipping corrupt shard: {error}", RuntimeWarning, stacklevel=2)
            self.counters["skipped_shards"] += 1
            return None


@dataclass(frozen=True)
class _RankShare:
    """One rank's micro-batches from a starting place: micro-batch `k` is places
    `start + (k × ranks + rank) × batch_size` onwards, `batch_size` of them, cut at `end`."""

    start: int
    rank: int
    ranks: int
    batch_size: int
    end: int | None  # None: endless

    def places(self, k: int) -> range | None:
        first = self.start + (k * self.ranks + self.rank) * self.batch_size
        last = (
            first + self.batch_size if self.end is None else min(first + self.batch_size, self.end)
        )
        return range(first, last) if first < last else None

    def position_after(self, k: int) -> int:
        """The place every rank has reached once each has taken micro-batch `k`."""
        position = self.start + (k + 1) * self.ranks * self.batch_size
        return position if self.end is None else min(position, self.end)


class _WorkerItem(NamedTuple):
    """What a worker sends: micro-batch `k` with the worker's counters, or the message of the
    `ShardError` that ended its stream (a worker's own exception would reach the trainer
    wrapped in the worker's traceback)."""

    k: int
    batch: torch.Tensor | None
    counters: dict[str, int]
    error: str | None = None


class _WorkerBatches(IterableDataset):
    """Each dataloader worker's micro-batches (`k ≡ worker mod workers`), tagged with `k` and
    the worker's data-fault counters."""

    def __init__(self, reader: _ShardReader, share: _RankShare, workers: int) -> None:
        self._reader = reader
        self._share = share
        self._workers = workers

    def __iter__(self) -> Iterator[_WorkerItem]:
        info = get_worker_info()
        k = 0 if info is None else info.id
        try:
            yield from self._items(k)
        except ShardError as error:
            if info is None:
                raise
            yield _WorkerItem(k, None, dict(self._reader.counters), str(error))

    def _items(self, k: int) -> Iterator[_WorkerItem]:
        lost = 0  # places read since the last sample that was not in a corrupt shard
        while (places := self._share.places(k)) is not None:
            rows = self._reader.rows(places.start, places.stop)
            if len(rows):
                lost = 0
                batch = torch.from_numpy(rows.astype(np.int64))
                yield _WorkerItem(k, batch, dict(self._reader.counters))
            else:
                lost += self._workers * self._share.ranks * self._share.batch_size
                if lost > self._reader.order.samples_per_epoch:
                    raise ShardError("every shard of the split is corrupt")
            k += self._workers


def _tokenizer_sha256(tokenizer: str | Path | Tokenizer) -> str:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.sha256
    if isinstance(tokenizer, str) and _SHA256.fullmatch(tokenizer) and not Path(tokenizer).exists():
        return tokenizer
    return file_sha256(tokenizer)


class TokenLoader:
    """Batches `torch.LongTensor [batch_size, seq_len + 1]` of one split for one data-parallel
    rank; the model's inputs are `batch[:, :-1]` and its targets `batch[:, 1:]`.

    Args:
        shard_dir: a directory written by `data_prep.shards.build_shards`.
        seq_len: the run's context length; must equal the shards'.
        tokenizer: the run's tokenizer (a model path, a loaded `Tokenizer`, or its sha256);
            must be the one the shards were built with.
        batch_size: samples per batch on this rank.
        split: "train" or "val".
        dp_rank, dp_world_size: this rank's place among the data-parallel ranks.
        num_workers: dataloader worker processes (0: read in this process).
        seed: the data order is a pure function of the seed and the epoch.
        epochs: None to continue forever, each epoch in a fresh order; else the number of
            epochs, after which iteration ends (the last batch may then be short). Use
            `epochs=1` for a validation pass; ranks may then get one batch more or fewer.
        skip_corrupt: skip a corrupt shard (unreadable, or not what the manifest describes,
            its sha256 included) with a warning and count it in `counters()`, instead of
            raising `ShardError` (a worker process's is raised here with its own message);
            batches then lack its samples.

    Iterating continues from the current position, so `state_dict()` / `load_state_dict()`
    resume an endless stream exactly: the restored loader yields the batches the original one
    would have yielded next. The state is the position in the sequence shared by all ranks
    (see the module docstring), taken when every rank has read the same number of batches
    (an optimizer step's); a loader of any number of ranks, workers and batch size continues
    from it, with the same split, seed, epochs and the split's shards as the manifest lists them.
    Errors about the shards are raised here, before anything is read.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        *,
        seq_len: int,
        tokenizer: str | Path | Tokenizer,
        batch_size: int,
        split: str = "train",
        dp_rank: int = 0,
        dp_world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        epochs: int | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        if batch_size < 1 or num_workers < 0 or seed < 0 or (epochs is not None and epochs < 1):
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, seed >= 0 and epochs None or >= 1; got "
                f"{batch_size=}, {num_workers=}, {seed=}, {epochs=}"
            )
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is not in 0..{dp_world_size - 1}")
        self.shard_dir = Path(shard_dir)
        self.manifest = read_manifest(self.shard_dir)
        self.manifest.check_compatible(
            seq_len=seq_len, tokenizer_sha256=_tokenizer_sha256(tokenizer)
        )
        self._shards = self.manifest.split(split).shards
        self.samples_per_epoch = sum(shard.samples for shard in self._shards)
        if self.samples_per_epoch == 0:
            raise ValueError(f"split {split!r} of {self.shard_dir} has no samples")
        # What the sequence is: a position means nothing under other values. Another set of
        # shards (one added, removed or rebuilt) is another sequence.
        self._order = {
            "split": split,
            "seed": seed,
            "epochs": epochs,
            "shards": _shards_digest(self._shards),
        }
        self._rank, self._ranks, self._batch_size = dp_rank, dp_world_size, batch_size
        self._num_workers = num_workers
        self._skip_corrupt = skip_corrupt
        self._position = 0
        self._counters = dict.fromkeys(COUNTERS, 0)

    @property
    def position(self) -> int:
        """Samples of the sequence consumed by all ranks together (at a step boundary)."""
        return self._position

    @property
    def skipped_shards(self) -> int:
        """Corrupt shard reads skipped so far (with `skip_corrupt`)."""
        return self._counters["skipped_shards"]

    def counters(self) -> dict[str, int]:
        """Data faults so far (`COUNTERS`), restored with the state: skipped corrupt shards and
        retried reads."""
        return dict(self._counters)

    def _reader(self) -> _ShardReader:
        return _ShardReader(
            self.shard_dir,
            self._shards,
            self.manifest.sample_len,
            np.dtype(self.manifest.dtype),
            self.manifest.vocab_size,
            self._order["seed"],
            self._skip_corrupt,
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        epochs = self._order["epochs"]
        end = None if epochs is None else epochs * self.samples_per_epoch
        share = _RankShare(self._position, self._rank, self._ranks, self._batch_size, end)
        workers = max(self._num_workers, 1)
        dataset = _WorkerBatches(self._reader(), share, workers)
        batches = (
            iter(dataset)
            if self._num_workers == 0
            else iter(DataLoader(dataset, batch_size=None, num_workers=self._num_workers))
        )
        before = dict(self._counters)
        per_worker = [dict.fromkeys(COUNTERS, 0) for _ in range(workers)]
        for item in batches:
            per_worker[item.k % workers] = item.counters
            self._counters = {
                name: before[name] + sum(c[name] for c in per_worker) for name in COUNTERS
            }
            if item.error is not None:
                raise ShardError(item.error)
            self._position = max(self._position, share.position_after(item.k))
            yield item.batch

    def state_dict(self) -> dict[str, Any]:
        """The position, as plain JSON-serialisable values."""
        return {
            "format": _STATE_FORMAT,
            "order": dict(self._order),
            "position": self._position,
            "counters": dict(self._counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by a loader of the same sequence (split, seed,
        epochs), under any layout."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"loader state format {state.get('format')!r} is not this version's {_STATE_FORMAT}"
            )
        # A state converted from a format-2 checkpoint predates the shards' digest.
        saved = {"shards": self._order["shards"], **state["order"]}
        differing = sorted(k for k in self._order if saved.get(k) != self._order[k])
        if "shards" in differing:
            raise ValueError(
                f"the {self._order['split']!r} shards of {self.shard_dir}/manifest.json are not "
                "those the loader state was saved with (a shard was added, removed or rebuilt): "
                "continuing would train on other data than planned"
            )
        if differing:
            details = ", ".join(
                f"{k}: {saved.get(k)!r} saved, {self._order[k]!r} now" for k in differing
            )
            raise ValueError(f"loader state is for another data order ({details})")
        self._position = state["position"]
        self._counters = {name: state["counters"].get(name, 0) for name in COUNTERS}


def _shards_digest(shards: Sequence[ShardInfo]) -> str:
    """sha256 over the names, sample counts and sha256 of a split's shards, in manifest order."""
    listing = "".join(f"{shard.name}:{shard.samples}:{shard.sha256}\n" for shard in shards)
    return hashlib.sha256(listing.encode()).hexdigest()
