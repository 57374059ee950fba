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
        shard_dir: Path,
        shards: Sequence[ShardInfo],
        sample_len: int,
        dtype: np.dtype,
        vocab_size: int,
        seed: int,
        slot: int,
        n_slots: int,
        skip_corrupt: bool,
        counters: dict[str, int],
    ) -> None:
        self._shard_dir = shard_dir
        self._shards = shards
        self._sample_len = sample_len
        self._dtype = dtype
        self._vocab_size = vocab_size
        self._seed = seed
        self._slot = slot
        self._skip_corrupt = skip_corrupt
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
            for piece in _epoch_pieces(shard_samples, self._seed, epoch, self._span):
                position += piece.stop - piece.start
                if offset >= piece.stop - piece.start:  # consumed before a restore: not read
                    offset -= piece.stop - piece.start
                    continue
                rows = self._piece_rows(piece, epoch, offset)
                offset = 0
                if rows is not None:
                    yielded = True
                    yield rows, position
            if whole_epoch and not yielded:
                raise ShardError(f"every shard of slot {self._slot} in epoch {epoch} is corrupt")
            epoch += 1

    def _piece_rows(self, piece: _Piece, epoch: int, offset: int) -> np.ndarray | None:
        shard = self._shards[piece.shard]
        try:
            stored = read_shard(
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
        order = np.random.default_rng((self._seed, epoch, piece.shard)).permutation(shard.samples)
        return stored[order[piece.start + offset : piece.stop]]


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


class _WorkerItem(NamedTuple):
    """What a worker sends: a batch with its place in the stream and the worker's counters,
    or the message of the `ShardError` that ended its stream (a worker's own exception would
    reach the trainer wrapped in the worker's traceback)."""

    worker: int
    batch: torch.Tensor | None
    position: int
    counters: dict[str, int]
    error: str | None = None


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

    def __iter__(self) -> Iterator[_WorkerItem]:
        info = get_worker_info()
        worker = (self._first_worker + (0 if info is None else info.id)) % len(self._streams)
        stream = self._streams[worker]
        rows = stream.rows(self._starts[worker], self._epochs)
        try:
            for batch, position in _batches(rows, self._batch_size):
                tensor = torch.from_numpy(batch.astype(np.int64))
                yield _WorkerItem(worker, tensor, position, dict(stream.counters))
        except ShardError as error:
            if info is None:
                raise
            yield _WorkerItem(worker, None, -1, dict(stream.counters), str(error))


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
            raising `ShardError` (a worker process's is raised here with its own message).

    Iterating continues from the current position, so `state_dict()` / `load_state_dict()`
    resume an endless stream exactly: the restored loader yields the batches the original one
    would have yielded next. A restore must use the same layout (ranks, workers, batch size,
    seed, split, and the split's shards as the manifest lists them). Errors about the shards
    are raised here, before anything is read.
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
            # Another set of shards (one added, removed or rebuilt) is another data order.
            "shards": _shards_digest(self._shards),
        }
        self._skip_corrupt = skip_corrupt
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

    @property
    def skipped_shards(self) -> int:
        """Corrupt shard reads skipped so far (with `skip_corrupt`)."""
        return self.counters()["skipped_shards"]

    def counters(self) -> dict[str, int]:
        """Data faults so far, summed over the workers (`COUNTERS`), restored with the state:
        skipped corrupt shards and retried reads."""
        return {name: sum(c[name] for c in self._counters) for name in COUNTERS}

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
                self._skip_corrupt,
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
        for item in batches:
            self._counters[item.worker] = item.counters
            if item.error is not None:
                raise ShardError(item.error)
            self._positions[item.worker] = item.position
            self._next_worker = (item.worker + 1) % self._workers
            yield item.batch

    def state_dict(self) -> dict[str, Any]:
        """The position, as plain JSON-serialisable values."""
        return {
            "format": _STATE_FORMAT,
            "layout": dict(self._layout),
            "next_worker": self._next_worker,
            "positions": list(self._positions),
            "counters": [dict(c) for c in self._counters],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by a loader of the same layout."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown loader state format {state.get('format')!r}")
        saved = state["layout"]
        differing = sorted(k for k in self._layout if saved.get(k) != self._layout[k])
        if "shards" in differing:
            raise ValueError(
                f"the {self._layout['split']!r} shards of {self.shard_dir}/manifest.json are not "
                "those the loader state was saved with (a shard was added, removed or rebuilt): "
                "continuing would train on other data than planned"
            )
        if differing:
            details = ", ".join(
                f"{k}: {saved.get(k)!r} saved, {self._layout[k]!r} now" for k in differing
            )
            raise ValueError(f"loader state is for another layout ({details})")
        self._next_worker = state["next_worker"]
        self._positions = list(state["positions"])
        self._counters = [{name: c.get(name, 0) for name in COUNTERS} for c in state["counters"]]


def _shards_digest(shards: Sequence[ShardInfo]) -> str:
    """sha256 over the names, sample counts and sha256 of a split's shards, in manifest order."""
    listing = "".join(f"{shard.name}:{shard.samples}:{shard.sha256}\n" for shard in shards)
    return hashlib.sha256(listing.encode()).hexdigest()
