"""Streaming token batches from webdataset shards, split across ranks and workers, resumable.

The order of an epoch is a pure function of (seed, epoch): the split's shards are put in an
order drawn from (seed, epoch) and their samples laid end to end, each shard's samples in an
order drawn from (seed, epoch, shard). That sequence is cut into `dp_world_size × workers`
contiguous slots whose lengths differ by at most one sample; slot `rank × workers + worker`
belongs to one dataloader worker of one rank, which reads only the shards its slot overlaps.
So every sample is read by exactly one worker per epoch, whatever the layout.

A worker's stream is its slot in epoch 0, then in epoch 1, and so on, cut into batches; a
position in it is a sample count. The DataLoader takes batches from the workers round robin,
passing over those whose (finite) stream has ended, so the loader's state is each worker's
position plus the worker after the one that yielded last. A restored loader starts each worker
at its position (whole shards before it are skipped using the manifest's counts, unread; an
ended stream yields nothing) and renumbers the workers so that that one comes first.

Shards are read wherever they live (`storage`): streamed, one shard in flight per worker plus
`prefetch_shards` read ahead by a thread. A transient failure, or a remote shard that arrives
damaged, is read again from its start (with back-off, counted in `read_retries`); samples come
out only of a shard read whole and checked, so a retry repeats or skips none.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import webdataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from moeut_dist.data import storage
from moeut_dist.data.manifest import SAMPLE_FIELD, ShardInfo, read_manifest
from moeut_dist.data.tokenizer import Tokenizer, file_sha256

_STATE_FORMAT = 3
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


@dataclass(frozen=True)
class ReadSettings:
    """How shards are read: retries of transient failures, shards read ahead, and what a shard
    that cannot be read does (`skip_corrupt`: skipped with a warning and counted, instead of
    raising `ShardError`)."""

    retry: storage.RetryPolicy = field(default_factory=storage.RetryPolicy)
    prefetch_shards: int = 1  # read while the current one is used; memory: 1 + this many shards
    skip_corrupt: bool = False

    def __post_init__(self) -> None:
        if self.prefetch_shards < 0:
            raise ValueError(f"prefetch_shards must not be negative, got {self.prefetch_shards}")


# The counters a loader keeps, summed over its workers and carried in its state.
COUNTERS = ("skipped_shards", "read_retries")


@dataclass(frozen=True)
class _Piece:
    """The part of one shard that a slot reads in one epoch: positions `start:stop` of the
    shard's shuffled sample order."""

    shard: int
    start: int
    stop: int


def _slots_span(total: int, slots: range, n_slots: int) -> range:
    """The places that consecutive `slots` cover in an epoch's sequence of `total` samples, cut
    into `n_slots` contiguous slots whose lengths differ by at most one."""
    return range(total * slots.start // n_slots, total * slots.stop // n_slots)


def _epoch_pieces(
    shard_samples: Sequence[int], seed: int, epoch: int, slot_span: range
) -> list[_Piece]:
    low, high = slot_span.start, slot_span.stop
    pieces, offset = [], 0
    for shard in np.random.default_rng((seed, epoch)).permutation(len(shard_samples)):
        count = shard_samples[shard]
        start, stop = max(low, offset) - offset, min(high, offset + count) - offset
        if start < stop:
            pieces.append(_Piece(int(shard), start, stop))
        offset += count
        if offset >= high:
            break
    return pieces


class _SlotStream:
    """The samples of one slot, epoch after epoch, with their positions."""

    def __init__(
        self,
        location: str,
        shards: Sequence[ShardInfo],
        sample_len: int,
        dtype: np.dtype,
        vocab_size: int,
        seed: int,
        slot: int,
        n_slots: int,
        read: ReadSettings,
        counters: dict[str, int],
    ) -> None:
        self._location = location
        self._shards = shards
        self._sample_len = sample_len
        self._dtype = dtype
        self._vocab_size = vocab_size
        self._seed = seed
        self._slot = slot
        self._read = read
        self.counters = dict(counters)
        total = sum(shard.samples for shard in shards)
        self._span = _slots_span(total, range(slot, slot + 1), n_slots)  # within each epoch
        self.samples_per_epoch = len(self._span)

    def rows(self, start: int, epochs: int | None) -> Iterator[tuple[np.ndarray, int]]:
        """From stream position `start` on: (consecutive samples, the position after them)."""
        epoch, offset = divmod(start, self.samples_per_epoch)
        while epochs is None or epoch < epochs:
            whole_epoch, yielded = offset == 0, False
            position = epoch * self.samples_per_epoch
            shard_samples = [shard.samples for shard in self._shards]
            reads = []  # (piece, its first sample to use, the position after the piece)
            for piece in _epoch_pieces(shard_samples, self._seed, epoch, self._span):
                position += piece.stop - piece.start
                if offset >= piece.stop - piece.start:  # consumed before a restore: not read
                    offset -= piece.stop - piece.start
                    continue
                reads.append((piece, offset, position))
                offset = 0
            stored_shards = self._prefetched(read[0] for read in reads)
            for (piece, first, end), stored in zip(reads, stored_shards, strict=True):
                if stored is not None:
                    yielded = True
                    order = np.random.default_rng((self._seed, epoch, piece.shard))
                    order = order.permutation(len(stored))
                    yield stored[order[piece.start + first : piece.stop]], end
            if whole_epoch and not yielded:
                raise ShardError(f"every shard of slot {self._slot} in epoch {epoch} is corrupt")
            epoch += 1

    def _prefetched(self, pieces: Iterator[_Piece]) -> Iterator[np.ndarray | None]:
        """Each piece's shard (None: skipped), reading `prefetch_shards` ahead in a thread."""
        if self._read.prefetch_shards == 0:
            yield from map(self._stored_rows, pieces)
            return
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending: deque[Future] = deque()
            for piece in pieces:
                pending.append(reader.submit(self._stored_rows, piece))
                if len(pending) > self._read.prefetch_shards:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _stored_rows(self, piece: _Piece) -> np.ndarray | None:
        """The shard's samples in stored order, read again after transient failures; None when
        it cannot be read and corrupt shards are skipped."""
        shard = self._shards[piece.shard]
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

        def count_retry(error: Exception) -> None:
            self.counters["read_retries"] += 1
            warnings.warn(f"reading again: {error}", RuntimeWarning, stacklevel=2)

        try:
            return storage.with_retries(read, self._read.retry, count_retry, errors=(ShardError,))
        except ShardError as error:
            if not self._read.skip_corrupt:
                raise
            warnings.warn(f"skipping corrupt shard: {error}", RuntimeWarning, stacklevel=2)
            self.counters["skipped_shards"] += 1
            return None


def _batches(
    rows: Iterator[tuple[np.ndarray, int]], batch_size: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Batches of `batch_size` samples (the last of a finite stream may be short), each with
    the stream position after it."""
    parts: list[np.ndarray] = []
    filled = 0
    position = 0
    for block, end in rows:
        used = 0
        while used < len(block):
            take = min(batch_size - filled, len(block) - used)
            parts.append(block[used : used + take])
            filled += take
            used += take
            if filled == batch_size:
                yield np.concatenate(parts), end - (len(block) - used)
                parts, filled = [], 0
        position = end
    if parts:
        yield np.concatenate(parts), position


class _WorkerBatches(IterableDataset):
    """Each dataloader worker's batches, tagged with its logical worker index and position."""

    def __init__(
        self,
        streams: Sequence[_SlotStream],
        starts: Sequence[int],
        first_worker: int,
        batch_size: int,
        epochs: int | None,
    ) -> None:
        self._streams = streams
        self._starts = starts
        self._first_worker = first_worker
        self._batch_size = batch_size
        self._epochs = epochs

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, int, dict[str, int]]]:
        info = get_worker_info()
        worker = (self._first_worker + (0 if info is None else info.id)) % len(self._streams)
        stream = self._streams[worker]
        rows = stream.rows(self._starts[worker], self._epochs)
        for batch, position in _batches(rows, self._batch_size):
            batch = torch.from_numpy(batch.astype(np.int64))
            yield worker, batch, position, dict(stream.counters)


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
        read: retries of transient read failures (each counted in `read_retries`), shards
            read ahead, and `skip_corrupt`: skip a shard that cannot be read (a permanent
            failure, or not what the manifest describes, its sha256 included, after the
            retries) with a warning and count it in `skipped_shards`, instead of raising
            `ShardError`.

    Iterating continues from the current position, so `state_dict()` / `load_state_dict()`
    resume an endless stream exactly: the restored loader yields the batches the original one
    would have yielded next. A restore must use the same layout (ranks, workers, batch size,
    seed, split). Errors about the shards are raised here, before anything is read.
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
        read: ReadSettings = ReadSettings(),
    ) -> None:
        if batch_size < 1 or num_workers < 0 or seed < 0 or (epochs is not None and epochs < 1):
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, seed >= 0 and epochs None or >= 1; got "
                f"{batch_size=}, {num_workers=}, {seed=}, {epochs=}"
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
        self._workers = max(num_workers, 1)
        self._n_slots = dp_world_size * self._workers
        total = sum(shard.samples for shard in self._shards)
        if total < self._n_slots:
            raise ValueError(
                f"split {split!r} of {self.shard_dir} has {total} samples, fewer than the "
                f"{self._n_slots} ranks × workers that would share it"
            )
        self._layout = {
            "split": split,
            "seed": seed,
            "batch_size": batch_size,
            "epochs": epochs,
            "dp_rank": dp_rank,
            "dp_world_size": dp_world_size,
            "num_workers": num_workers,
        }
        self._read = read
        self._next_worker = 0
        self._positions = [0] * self._workers
        self._counters = [dict.fromkeys(COUNTERS, 0) for _ in range(self._workers)]

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank gets in one epoch (ranks differ by at most `num_workers`)."""
        total = sum(shard.samples for shard in self._shards)
        first_slot = self._layout["dp_rank"] * self._workers
        my_slots = range(first_slot, first_slot + self._workers)
        return len(_slots_span(total, my_slots, self._n_slots))

    def counters(self) -> dict[str, int]:
        """Cumulative counts over all workers (and earlier sessions, when resumed):
        `skipped_shards`, corrupt shard reads skipped (with `skip_corrupt`), and `read_retries`,
        shard reads tried again after a transient failure."""
        return {name: sum(worker[name] for worker in self._counters) for name in COUNTERS}

    @property
    def skipped_shards(self) -> int:
        return self.counters()["skipped_shards"]

    def _streams(self) -> list[_SlotStream]:
        dtype = np.dtype(self.manifest.dtype)
        first_slot = self._layout["dp_rank"] * self._workers
        return [
            _SlotStream(
                self.shard_dir,
                self._shards,
                self.manifest.sample_len,
                dtype,
                self.manifest.vocab_size,
                self._layout["seed"],
                first_slot + worker,
                self._n_slots,
                self._read,
                self._counters[worker],
            )
            for worker in range(self._workers)
        ]

    def __iter__(self) -> Iterator[torch.Tensor]:
        dataset = _WorkerBatches(
            self._streams(),
            list(self._positions),
            self._next_worker,
            self._layout["batch_size"],
            self._layout["epochs"],
        )
        num_workers = self._layout["num_workers"]
        batches = (
            iter(dataset)
            if num_workers == 0
            else iter(DataLoader(dataset, batch_size=None, num_workers=num_workers))
        )
        for worker, batch, position, counters in batches:
            self._positions[worker] = position
            self._counters[worker] = counters
            self._next_worker = (worker + 1) % self._workers
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position, as plain JSON-serialisable values."""
        return {
            "format": _STATE_FORMAT,
            "layout": dict(self._layout),
            "next_worker": self._next_worker,
            "positions": list(self._positions),
            "counters": [dict(counters) for counters in self._counters],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by a loader of the same layout."""
        if "sources" in state:
            raise ValueError("the saved run mixed data.sources, this one reads data.shard_dir")
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown loader state format {state.get('format')!r}")
        saved = state["layout"]
        differing = sorted(k for k in self._layout if saved.get(k) != self._layout[k])
        if differing:
            details = ", ".join(
                f"{k}: {saved.get(k)!r} saved, {self._layout[k]!r} now" for k in differing
            )
            raise ValueError(f"loader state is for another layout ({details})")
        self._next_worker = state["next_worker"]
        self._positions = list(state["positions"])
        self._counters = [dict(counters) for counters in state["counters"]]
