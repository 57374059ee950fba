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
micro-batches fall in, so every worker reads every shard of an epoch, using its share of the
samples: sequential reads of a few MB per shard, far below what a training step consumes in
compute. While it uses one shard, a worker reads the next `prefetch_shards` shards that its own
micro-batches need in a background thread, so a slow (remote) read does not stall it; it holds
at most `1 + prefetch_shards` shards. A prefetched shard's retries, warnings and errors are
reported when the shard is needed, as if it had been read then. A restored loader starts at its
place; whole shards before it are skipped using the manifest's counts, unread.

Shards are read wherever they live (`storage`: a path, file://, http(s)://, s3://, pipe:),
streamed. A transient failure, or a remote shard that arrives damaged, is read again from its
start (with back-off, counted in `read_retries`); samples come out only of a shard read whole
and checked, so a retry repeats or skips none.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
import webdataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from moeut_dist.data import storage
from moeut_dist.data.manifest import SAMPLE_FIELD, ShardInfo, read_manifest
from moeut_dist.data.tokenizer import Tokenizer, file_sha256

_STATE_FORMAT = 3
# Cumulative data faults each worker counts: corrupt shards passed over (`skip_corrupt`), and
# reads that failed and were tried again.
COUNTERS = ("skipped_shards", "read_retries")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ShardError(RuntimeError):
    """A shard that cannot be read as the manifest describes it; the message names its URL.

    `transient`: reading it again may succeed (a remote read cut off or garbled on its way).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


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
    url: str | Path,
    samples: int,
    sample_len: int,
    dtype: np.dtype,
    *,
    vocab_size: int,
    sha256: str,
) -> np.ndarray:
    """A shard's samples in stored order, `[samples, sample_len]`, checked against the manifest.

    `url` is a path or any location `storage` reads; the shard is streamed, never stored whole.
    Every id must be below `vocab_size`: a flipped bit or another tokenizer's shard fails here,
    naming the shard, instead of as an index error inside the embedding. `sha256`, the
    manifest's hash of the file, catches any other change; it is computed from the bytes read
    for the samples, so checking it costs no second read. A remote shard that is not what the
    manifest says may have been damaged on its way: that error is `transient`.
    """
    url = str(url)
    remote = not storage.is_local(url)
    rows = np.empty((samples, sample_len), dtype)
    sample_bytes = sample_len * dtype.itemsize
    count = 0
    try:
        with storage.open_read(url) as file:
            reader = _HashingReader(file)
            for member in webdataset.tariterators.tar_file_iterator(reader):
                if count == samples:
                    raise ShardError(
                        f"{url}: holds more than the manifest's {samples} samples", transient=remote
                    )
                data = member["data"]
                if not member["fname"].endswith(f".{SAMPLE_FIELD}") or len(data) != sample_bytes:
                    raise ShardError(
                        f"{url}: member {member['fname']} is not a {sample_bytes}-byte sample",
                        transient=remote,
                    )
                rows[count] = np.frombuffer(data, dtype)
                count += 1
            found_sha256 = reader.sha256_of_whole_file()
    except storage.StorageError as error:
        raise ShardError(f"unreadable shard: {error}", transient=error.transient) from error
    except (OSError, tarfile.TarError) as error:
        raise ShardError(f"{url}: unreadable shard ({error})", transient=remote) from error
    if count != samples:
        raise ShardError(
            f"{url}: holds {count} samples, the manifest says {samples} (truncated?)",
            transient=remote,
        )
    if rows.size and (largest := rows.max()) >= vocab_size:
        raise ShardError(
            f"{url}: token id {largest} is not below the manifest's vocab_size {vocab_size}",
            transient=remote,
        )
    if found_sha256 != sha256:
        raise ShardError(
            f"{url}: sha256 {found_sha256} is not the manifest's {sha256} (corrupt)",
            transient=remote,
        )
    return rows


class _EpochOrder:
    """Which shard sample each place of the endless sequence is: shards in an order drawn from
    (seed, epoch), laid end to end; within a shard, an order drawn from (seed, epoch, shard)."""

    def __init__(self, shard_samples: Sequence[int], seed: int) -> None:
        self._samples = np.asarray(shard_samples, dtype=np.int64)
        self._seed = seed
        self.samples_per_epoch = int(self._samples.sum())
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # the last one's layout

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shards in order, and where each one's samples end (in samples)."""
        if self._epoch is None or self._epoch[0] != epoch:
            shards = np.random.default_rng((self._seed, epoch)).permutation(len(self._samples))
            self._epoch = (epoch, shards, np.cumsum(self._samples[shards]))
        return self._epoch[1], self._epoch[2]

    def locate(self, place: int) -> tuple[int, int, int, int]:
        """(epoch, shard, position, end): `place` is position `position` of `shard`'s order in
        `epoch`, and that shard's samples end before place `end`."""
        epoch, offset = divmod(place, self.samples_per_epoch)
        shards, ends = self._layout(epoch)
        index = int(np.searchsorted(ends, offset, side="right"))
        shard_end = int(ends[index])
        position = offset - (shard_end - int(self._samples[shards[index]]))
        return epoch, int(shards[index]), position, place - offset + shard_end

    def pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """(epoch, shard, first, end) pieces covering places `start:stop`, in order: positions
        `first:end` of that shard's order in that epoch."""
        while start < stop:
            epoch, shard, first, shard_end = self.locate(start)
            taken = min(stop, shard_end) - start
            yield epoch, shard, first, first + taken
            start += taken

    def sample_order(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng((self._seed, epoch, shard)).permutation(self._samples[shard])


class _ShardRead(NamedTuple):
    """The outcome of reading a shard (with retries): its samples, or the error that ended the
    reads; and the failures that were read again."""

    rows: np.ndarray | None
    retried: tuple[Exception, ...]
    error: ShardError | None


class _ShardReader:
    """The samples of places of the sequence, read from the shards one shard at a time; the
    shards named by `prefetch` are read ahead in a background thread."""

    def __init__(
        self,
        location: str,
        shards: Sequence[ShardInfo],
        sample_len: int,
        dtype: np.dtype,
        vocab_size: int,
        seed: int,
        skip_corrupt: bool,
        retry: storage.RetryPolicy,
    ) -> None:
        self._location = location
        self._retry = retry
        self._shards = shards
        self._sample_len = sample_len
        self._dtype = dtype
        self._vocab_size = vocab_size
        self._skip_corrupt = skip_corrupt
        self.order = _EpochOrder([shard.samples for shard in shards], seed)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._current: tuple[int, np.ndarray | None] | None = None  # (shard, its samples)
        # Made in the process that reads (a dataloader worker), not pickled into it.
        self._executor: ThreadPoolExecutor | None = None
        self._prefetched: dict[int, Future[_ShardRead]] = {}  # by shard index

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The samples at places `start:stop`, less those of corrupt shards (`skip_corrupt`)."""
        parts = [np.empty((0, self._sample_len), self._dtype)]
        for epoch, shard, first, end in self.order.pieces(start, stop):
            stored = self._stored(shard)
            if stored is not None:
                parts.append(stored[self.order.sample_order(epoch, shard)[first:end]])
        return np.concatenate(parts)

    def prefetch(self, shards: Sequence[int]) -> None:
        """Read `shards` (indices, the next needed first) in the background, and forget reads
        started for shards no longer among them."""
        current = None if self._current is None else self._current[0]
        wanted = [index for index in dict.fromkeys(shards) if index != current]
        for index in self._prefetched.keys() - set(wanted):
            self._prefetched.pop(index).cancel()
        for index in wanted:
            if index not in self._prefetched:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
                self._prefetched[index] = self._executor.submit(self._read, self._shards[index])

    def close(self) -> None:
        """Stop prefetching; a read under way finishes in its thread, unused."""
        self._prefetched.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _stored(self, index: int) -> np.ndarray | None:
        if self._current is None or self._current[0] != index:
            self._current = None  # at most the current shard and the prefetched ones in memory
            prefetched = self._prefetched.pop(index, None)
            read = self._read(self._shards[index]) if prefetched is None else prefetched.result()
            self._current = (index, self._take(read))
        return self._current[1]

    def _read(self, shard: ShardInfo) -> _ShardRead:
        """The shard's samples in stored order, read again after transient failures. Touches no
        state of the reader: it may run in the prefetching thread."""
        url = storage.join(self._location, shard.name)

        def read() -> np.ndarray:
            return read_shard(
                url,
                shard.samples,
                self._sample_len,
                self._dtype,
                vocab_size=self._vocab_size,
                sha256=shard.sha256,
            )

        retried: list[Exception] = []
        try:
            rows = storage.with_retries(read, self._retry, retried.append, errors=(ShardError,))
        except ShardError as error:
            return _ShardRead(None, tuple(retried), error)
        return _ShardRead(rows, tuple(retried), None)

    def _take(self, read: _ShardRead) -> np.ndarray | None:
        """A read's samples, its retries counted and reported now, when the shard is needed;
        None when it failed and corrupt shards are skipped."""
        for error in read.retried:
            self.counters["read_retries"] += 1
            warnings.warn(f"reading again: {error}", RuntimeWarning, stacklevel=3)
        if read.error is None:
            return read.rows
        if not self._skip_corrupt:
            raise read.error
        warnings.warn(f"skipping corrupt shard: {read.error}", RuntimeWarning, stacklevel=3)
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

    def next_place(self, place: int, k: int, every: int) -> int | None:
        """The first place at or after `place` in micro-batches `k, k + every, k + 2 × every, …`
        (a dataloader worker's); None if there is none."""
        first = self.start + (k * self.ranks + self.rank) * self.batch_size
        stride = every * self.ranks * self.batch_size
        if place <= first:
            found = first
        else:
            batches, into = divmod(place - first, stride)
            found = place if into < self.batch_size else first + (batches + 1) * stride
        return found if self.end is None or found < self.end else None

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
    the worker's data-fault counters; the next `prefetch` shards they need are read ahead."""

    def __init__(
        self, reader: _ShardReader, share: _RankShare, workers: int, prefetch: int
    ) -> None:
        self._reader = reader
        self._share = share
        self._workers = workers
        self._prefetch = prefetch

    def __iter__(self) -> Iterator[_WorkerItem]:
        info = get_worker_info()
        k = 0 if info is None else info.id
        try:
            yield from self._items(k)
        except ShardError as error:
            if info is None:
                raise
            yield _WorkerItem(k, None, dict(self._reader.counters), str(error))
        finally:
            self._reader.close()

    def _shards_after(self, place: int, k: int) -> tuple[int, list[int]]:
        """Where the shard holding `place` ends, and the next `prefetch` shards that
        micro-batches `k, k + workers, …` read after it: a shard lying wholly between two of
        them is not read at all."""
        shards: list[int] = []
        current_end = shard_end = self._reader.order.locate(place)[3]
        while len(shards) < self._prefetch:
            needed = self._share.next_place(shard_end, k, self._workers)
            if needed is None:
                break
            _, shard, _, shard_end = self._reader.order.locate(needed)
            shards.append(shard)
        return current_end, shards

    def _items(self, k: int) -> Iterator[_WorkerItem]:
        lost = 0  # places read since the last sample that was not in a corrupt shard
        planned_until = 0  # the end of the shard whose successors are being read ahead
        while (places := self._share.places(k)) is not None:
            rows = self._reader.rows(places.start, places.stop)
            if self._prefetch and places.stop > planned_until:  # into another shard
                planned_until, shards = self._shards_after(places.stop - 1, k)
                self._reader.prefetch(shards)
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
        shard_dir: a directory written by `data_prep.shards.build_shards`: a path or a URL
            (`moeut_dist.data.storage`: file://, http(s)://, s3:// and other fsspec
            protocols, pipe:COMMAND).
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
            batches then lack its samples. A shard is unreadable after `retry`'s attempts at
            transient failures (each counted in `read_retries`); a permanent one (not found,
            forbidden) is not tried again.
        prefetch_shards: shards each worker reads ahead, in a background thread, of those
            it needs next (0: read each when needed); a worker holds at most
            `1 + prefetch_shards` shards in memory. The batches do not depend on it.

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
        retry: storage.RetryPolicy | None = None,
        prefetch_shards: int = 1,
    ) -> None:
        if (
            batch_size < 1
            or min(num_workers, seed, prefetch_shards) < 0
            or (epochs is not None and epochs < 1)
        ):
            raise ValueError(
                "need batch_size >= 1, num_workers, seed and prefetch_shards >= 0 and epochs "
                f"None or >= 1; got {batch_size=}, {num_workers=}, {seed=}, {prefetch_shards=}, "
                f"{epochs=}"
            )
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is not in 0..{dp_world_size - 1}")
        storage.check_location(str(shard_dir))
        self.shard_dir = str(shard_dir)
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
        self._retry = retry or storage.RetryPolicy()
        self._prefetch_shards = prefetch_shards
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
            self._retry,
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        epochs = self._order["epochs"]
        end = None if epochs is None else epochs * self.samples_per_epoch
        share = _RankShare(self._position, self._rank, self._ranks, self._batch_size, end)
        workers = max(self._num_workers, 1)
        dataset = _WorkerBatches(self._reader(), share, workers, self._prefetch_shards)
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
        if "sources" in state:
            raise ValueError("the saved run mixed data.sources, this one reads data.shard_dir")
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
