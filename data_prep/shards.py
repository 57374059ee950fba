"""Tokenised webdataset shards: documents → token stream → fixed-length samples → tar shards.

Each split's documents are tokenised, each followed by the end-of-document id, concatenated in
input order and cut into samples of `seq_len + 1` tokens (the tail shorter than one sample is
dropped and counted). Shards hold a fixed number of samples, derived from the target shard size,
so shard boundaries depend only on the token stream.

Determinism: documents are grouped into chunks of about `CHUNK_CHARACTERS` in input order; worker
processes only tokenise chunks, and the main process consumes the results in chunk order. The
bytes written therefore do not depend on the number of workers (tar members also get fixed
names, mtimes and owners).

Restart: every shard is written under a temporary name and renamed when complete. After each
completed shard, `progress.json` records, per split, the shards done and the stream position
just after them as (chunk index, tokens of that chunk already consumed). A rerun of the same
command re-reads the inputs up to that point without tokenising them and continues, producing
the same bytes as an uninterrupted build. `manifest.json` is written last and marks completion.
A build is recognised by the settings that determine its bytes, input files by resolved path,
so a rerun may come from another working directory; an unfinished build also by how it cuts its
input into chunks, which its resume position counts in. A build without documents or without a
training sample is refused before its manifest is written, and its files are removed, so that
a corrected rerun can start afresh in the same directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import tarfile
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.readers import (
    BadInputError,
    Document,
    ReadReport,
    TextUnit,
    iter_documents,
    require_documents,
    resolve_inputs,
)
from moeut_dist.data import storage
from moeut_dist.data.manifest import (
    MANIFEST_NAME,
    PROGRESS_NAME,
    SAMPLE_FIELD,
    Manifest,
    ShardInfo,
    SplitInfo,
    read_manifest,
    token_dtype,
    write_manifest,
)
from moeut_dist.data.tokenizer import Tokenizer, file_sha256
from moeut_dist.dataclass_dict import from_dict, to_dict
from moeut_dist.progress import Progress

logger = logging.getLogger(__name__)

TRAIN, VALIDATION = "train", "val"
# A chunk holds documents in input order up to this many characters (or one longer document):
# large enough that the per-chunk cost of handing it to a worker is small against tokenising it,
# small enough that the chunks in flight stay a few MB per worker.
CHUNK_CHARACTERS = 1 << 18
_TAR_BLOCK = 512
# Results a worker pool may hold ahead of the writer, per worker: enough to keep every worker
# busy, few enough that memory stays bounded whatever the corpus size.
_CHUNKS_IN_FLIGHT_PER_WORKER = 4


def is_validation_document(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a pure function of its text, so
    the choice is stable across builds and duplicated documents never straddle the splits."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def samples_per_shard(shard_bytes: int, sample_bytes: int) -> int:
    """Samples that fit a target shard size, counting each tar member's header and padding."""
    member_bytes = _TAR_BLOCK + -(-sample_bytes // _TAR_BLOCK) * _TAR_BLOCK
    return max(1, shard_bytes // member_bytes)


class ShardTarWriter:
    """A tar file of samples written straight to a file: what `webdataset.TarWriter` writes
    with fixed mtime, owner and mode (ustar headers; the same bytes), without its per-member
    encoder and stream layers, and without importing webdataset (which imports torch)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        # By member size: the header of a member named "", and its checksum with the
        # checksum field blank (all members of a shard have one size).
        self._templates: dict[int, tuple[bytes, int]] = {}

    def write(self, name: str, data: bytes) -> None:
        self._file.write(self._header(name, len(data)))
        self._file.write(data)
        self._file.write(bytes(-len(data) % tarfile.BLOCKSIZE))

    def _header(self, name: str, size: int) -> bytes:
        """`tarfile`'s header, made from a template: building it costs more than writing a
        sample. Only the name field and the checksum differ between members of one size."""
        encoded = name.encode("ascii", "replace")
        if not name.isascii() or len(encoded) > tarfile.LENGTH_NAME:
            return _tar_header(name, size)  # a pax header holds the name
        if size not in self._templates:
            template = _tar_header("", size)
            blank = template[: _CHECKSUM_FIELD.start] + b" " * 8 + template[_CHECKSUM_FIELD.stop :]
            self._templates[size] = (template, sum(blank))
        template, checksum = self._templates[size]
        checksum += sum(encoded)
        return b"".join(
            (
                encoded,
                template[len(encoded) : _CHECKSUM_FIELD.start],
                b"%06o\0 " % checksum,  # as tarfile writes it
                template[_CHECKSUM_FIELD.stop :],
            )
        )

    def close(self) -> None:
        """End the archive as tarfile does: two empty blocks, then zeros to a whole record."""
        end = self._file.tell() + 2 * tarfile.BLOCKSIZE
        self._file.write(bytes(2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))
        self._file.close()


_CHECKSUM_FIELD = slice(148, 156)  # of a ustar header


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "moeut"
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


@dataclass(frozen=True)
class _Chunk:
    index: int
    texts: list[str]
    splits: tuple[str, ...]  # splits whose tokens are still needed from this chunk


@dataclass(frozen=True)
class _TokenizedChunk:
    index: int
    tokens: dict[str, np.ndarray]  # split -> its documents' ids, each document ended by EOD


class _ChunkTokenizer:
    """Tokenises a chunk's documents into one token array per split."""

    def __init__(self, tokenizer_path: Path, val_fraction: float, dtype: np.dtype) -> None:
        self._tokenizer = Tokenizer(tokenizer_path)
        self._val_fraction = val_fraction
        self._dtype = dtype

    def __call__(self, chunk: _Chunk) -> _TokenizedChunk:
        texts: dict[str, list[str]] = {split: [] for split in chunk.splits}
        for text in chunk.texts:
            validation = self._val_fraction > 0 and is_validation_document(text, self._val_fraction)
            split = VALIDATION if validation else TRAIN
            if split in texts:
                texts[split].append(text)
        tokens = {split: self._encode(split_texts) for split, split_texts in texts.items()}
        return _TokenizedChunk(chunk.index, tokens)

    def _encode(self, texts: list[str]) -> np.ndarray:
        ids = self._tokenizer.encode_documents(texts)
        flat = itertools.chain.from_iterable(ids)
        return np.fromiter(flat, self._dtype, count=sum(map(len, ids)))


_worker_tokenizer: _ChunkTokenizer | None = None


def _start_worker(*args: Any) -> None:
    global _worker_tokenizer
    _worker_tokenizer = _ChunkTokenizer(*args)


def _tokenize_in_worker(chunk: _Chunk) -> _TokenizedChunk:
    assert _worker_tokenizer is not None, "worker started without _start_worker"
    return _worker_tokenizer(chunk)


@contextmanager
def _tokenized(
    chunks: Iterable[_Chunk], workers: int, tokenizer_args: tuple[Any, ...]
) -> Iterator[Iterator[_TokenizedChunk]]:
    """Tokenised chunks in input order, from `workers` processes (1: this process)."""
    if workers == 1:
        yield map(_ChunkTokenizer(*tokenizer_args), chunks)
        return
    # Not `multiprocessing.Pool`: its worker-handling thread wakes for every result waiting in
    # the pipe, which cost the main process more CPU than reading and writing the shards.
    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=tokenizer_args) as pool:
        yield _ordered_bounded_map(pool, chunks, workers * _CHUNKS_IN_FLIGHT_PER_WORKER)


def _ordered_bounded_map(
    pool: ProcessPoolExecutor, chunks: Iterable[_Chunk], max_pending: int
) -> Iterator[_TokenizedChunk]:
    # Pool.map would read all of `chunks` ahead (the whole corpus); keep only a few in flight.
    pending: deque[Future[_TokenizedChunk]] = deque()
    for chunk in chunks:
        pending.append(pool.submit(_tokenize_in_worker, chunk))
        if len(pending) >= max_pending:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass(frozen=True)
class _Position:
    """A place in one split's token stream: `offset` tokens into that split's part of chunk
    `chunk`."""

    chunk: int
    offset: int


@dataclass(frozen=True)
class _Checkpoint:
    """A split's state after its last completed shard: all that a restart needs."""

    shards: tuple[ShardInfo, ...] = ()
    position: _Position = _Position(0, 0)
    # `<unk>` ids in the shards: kept here so that a resumed build reports the whole build's.
    unknown_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: Any) -> _Checkpoint:
        return from_dict(cls, values, complete=True)  # written whole by `save_progress`


class _SplitWriter:
    """Cuts one split's token stream into samples and writes them into shards."""

    def __init__(
        self,
        out: storage.Directory,
        staging: Path,
        split: str,
        sample_len: int,
        dtype: np.dtype,
        samples_per_shard: int,
        unk_id: int,
        resume: _Checkpoint,
    ) -> None:
        self._out = out
        self._staging = staging  # where the shard being written lies until complete
        self._split = split
        self._sample_len = sample_len
        self._samples_per_shard = samples_per_shard
        self._unk_id = unk_id
        self.checkpoint = resume
        self._carry = np.empty(0, dtype)  # tokens short of a whole sample
        self._tar: ShardTarWriter | None = None
        self._shard_samples = 0
        self._shard_unknown_tokens = 0
        self._samples_done = sum(shard.samples for shard in resume.shards)

    @property
    def tokens_done(self) -> int:
        return sum(shard.tokens for shard in self.checkpoint.shards)

    def add(self, chunk_index: int, tokens: np.ndarray) -> bool:
        """Append one chunk's tokens; returns whether a shard was completed."""
        start = self.checkpoint.position
        skipped = start.offset if chunk_index == start.chunk else 0
        carried = len(self._carry)
        stream = np.concatenate([self._carry, tokens[skipped:]]) if carried else tokens[skipped:]
        n_samples = len(stream) // self._sample_len
        completed = False
        for i in range(n_samples):
            end = (i + 1) * self._sample_len
            self._write_sample(stream[end - self._sample_len : end])
            if self._shard_samples == self._samples_per_shard:
                # `end > carried`: a sample boundary after the first lies inside this chunk.
                self._close_shard(_Position(chunk_index, skipped + end - carried))
                completed = True
        self._carry = stream[n_samples * self._sample_len :]
        return completed

    def finish(self) -> SplitInfo:
        """Write the last, partly filled shard; the tail short of a sample is dropped."""
        if self._tar is not None:
            self._close_shard(self.checkpoint.position)
        return SplitInfo(shards=self.checkpoint.shards, dropped_tail_tokens=len(self._carry))

    def unknown_tokens(self) -> int:
        """`<unk>` ids among the split's tokens, once finished: its shards' and its tail's."""
        return self.checkpoint.unknown_tokens + self._count_unknown(self._carry)

    def _count_unknown(self, tokens: np.ndarray) -> int:
        return int(np.count_nonzero(tokens == self._unk_id))

    def _shard_name(self) -> str:
        return f"{self._split}-{len(self.checkpoint.shards):06d}.tar"

    def _partial_path(self) -> Path:
        return self._staging / f".{self._shard_name()}.partial"

    def _write_sample(self, sample: np.ndarray) -> None:
        if self._tar is None:
            self._tar = ShardTarWriter(self._partial_path())
        index = self._samples_done + self._shard_samples
        self._tar.write(f"{index:010d}.{SAMPLE_FIELD}", sample.tobytes())
        self._shard_samples += 1
        self._shard_unknown_tokens += self._count_unknown(sample)

    def _close_shard(self, position: _Position) -> None:
        assert self._tar is not None
        self._tar.close()
        partial = self._partial_path()
        shard = ShardInfo(
            name=self._shard_name(),
            samples=self._shard_samples,
            tokens=self._shard_samples * self._sample_len,
            sha256=file_sha256(partial),
        )
        self._out.put(partial, shard.name)
        self.checkpoint = _Checkpoint(
            (*self.checkpoint.shards, shard),
            position,
            self.checkpoint.unknown_tokens + self._shard_unknown_tokens,
        )
        self._tar = None
        self._samples_done += self._shard_samples
        self._shard_samples = self._shard_unknown_tokens = 0


@dataclass
class _UnknownTokens:
    """`<unk>` tokens among the tokens of a build: text lost to training and generation."""

    unknown: int = 0
    tokens: int = 0

    @property
    def rate(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    def log(self, warn_rate: float) -> None:
        line = f"{self.unknown} of {self.tokens} tokens are <unk> ({self.rate:.4%})"
        if self.rate > warn_rate:
            logger.warning(
                "%s, above %.4f%%: that text cannot come back out of the tokenizer; train it "
                "with byte fallback (the default of `moeut prep tokenizer`)",
                line,
                warn_rate * 100,
            )
        else:
            logger.info(line)

    def to_dict(self) -> dict[str, int]:
        return {"unknown": self.unknown, "tokens": self.tokens}


def _chunks(documents: Iterator[Document], starts: dict[str, _Position]) -> Iterator[_Chunk]:
    """Chunks of documents in input order, each naming the splits that still need it."""
    for index in itertools.count():
        texts, characters = [], 0
        for document in documents:
            texts.append(document.text)
            characters += len(document.text)
            if characters >= CHUNK_CHARACTERS:
                break
        if not texts:
            return
        splits = tuple(split for split, start in starts.items() if index >= start.chunk)
        if splits:
            yield _Chunk(index, texts, splits)


def _load_progress(
    out: storage.Directory, settings: dict[str, Any], splits: Sequence[str]
) -> dict[str, _Checkpoint]:
    """Checkpoints of an interrupted build of the same settings, or fresh ones."""
    out_dir = out.location
    progress_path = out.url(PROGRESS_NAME)
    if not out.exists(PROGRESS_NAME):
        if out.names(".tar"):
            raise BadInputError(
                f"{out_dir} holds shards but no {PROGRESS_NAME} or {MANIFEST_NAME}; "
                "build into an empty directory"
            )
        return {split: _Checkpoint() for split in splits}
    try:
        progress = json.loads(out.read_bytes(PROGRESS_NAME))
        _require_same_settings(out_dir, progress["settings"], settings)
        return {split: _Checkpoint.from_dict(progress["splits"][split]) for split in splits}
    except BadInputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise _damaged_build(
            out_dir, f"{progress_path} is damaged ({type(error).__name__}: {error})"
        ) from error


def _damaged_build(out_dir: str, problem: str) -> BadInputError:
    """The error for a build directory whose records cannot be trusted: only a rebuild helps."""
    return BadInputError(f"{problem}; delete {out_dir} and build again")


def _require_same_settings(out_dir: str, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    differing = sorted(k for k in wanted.keys() | found.keys() if found.get(k) != wanted.get(k))
    if differing:
        details = "; ".join(_change(k, found.get(k), wanted.get(k)) for k in differing)
        raise BadInputError(
            f"{out_dir} holds a build with different settings ({details}); "
            "rerun with the same settings or build into another directory"
        )


def _change(setting: str, before: Any, now: Any) -> str:
    """One setting's change, short enough for one line: of a list (the input files), its
    lengths and first differing entry."""
    if not (isinstance(before, list) and isinstance(now, list)):
        return f"{setting}: {before!r} before, {now!r} now"
    first = next(
        (i for i, (old, new) in enumerate(zip(before, now, strict=False)) if old != new),
        min(len(before), len(now)),
    )
    entry_before = before[first] if first < len(before) else "none"
    entry_now = now[first] if first < len(now) else "none"
    return (
        f"{setting}: {len(before)} entries before, {len(now)} now, the first difference at "
        f"entry {first}: {entry_before!r} before, {entry_now!r} now"
    )


def _output(out_dir: str | Path) -> storage.Directory:
    """The shard directory to write, created if local."""
    try:
        storage.check_location(str(out_dir))
        out = storage.Directory(out_dir)
    except ValueError as error:  # a read-only location, or one with a password
        raise BadInputError(str(error)) from error
    try:
        out.create()
    except NotADirectoryError as error:
        message = f"{out_dir} is not a directory; give a directory for the shards"
        raise BadInputError(message) from error
    return out


def _check_arguments(seq_len: int, workers: int, val_fraction: float) -> None:
    if seq_len < 1:
        raise BadInputError(f"seq_len must be positive, got {seq_len}")
    if workers < 1:
        raise BadInputError(f"workers must be at least 1, got {workers}")
    if not 0.0 <= val_fraction < 1.0:
        raise BadInputError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise BadInputError(f"tokenizer {path} not found")
    try:
        return Tokenizer(path)
    except ValueError as error:  # not a SentencePiece model, or one without `</s>`
        raise BadInputError(str(error)) from error


def _require_training_samples(train: SplitInfo, sample_len: int, report: ReadReport) -> None:
    if train.samples == 0:
        raise BadInputError(
            f"no training samples: the train split's {train.dropped_tail_tokens} tokens are "
            f"fewer than one sample of seq_len + 1 = {sample_len} tokens (use a smaller seq_len "
            f"or more text); {report.summary()}"
        )


def _remove_build(out: storage.Directory, splits: Iterable[SplitInfo]) -> None:
    """Delete the shards and the progress record of an unfinished build."""
    for split in splits:
        for shard in split.shards:
            out.remove(shard.name)
    out.remove(PROGRESS_NAME)


def build_shards(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer_path: str | Path,
    seq_len: int,
    *,
    shard_bytes: int = 256 << 20,
    val_fraction: float = 0.005,
    workers: int = 1,
    text_field: str = "text",
    text_unit: TextUnit = "file",
    text_extensions: Sequence[str] = (),
    max_bad_records: int | None = 1000,
    unknown_warn_rate: float = 1e-4,
    progress: bool = True,
    progress_every_seconds: float = 60.0,
) -> Manifest:
    """Tokenise `inputs` into webdataset shards of `seq_len + 1`-token samples in `out_dir`.

    `val_fraction` of the documents (chosen by a hash of their text) go to the `val` split, the
    rest to `train`. `shard_bytes` is the target size of a shard. Reruns of an interrupted build
    continue it; a rerun of a finished one returns its manifest. Returns the manifest.
    `progress`: a bar on a terminal, else a line every `progress_every_seconds`.
    `text_extensions` are read as plain text besides the known formats. The share of `<unk>`
    tokens in the build is reported, with a warning above `unknown_warn_rate`.
    """
    _check_arguments(seq_len, workers, val_fraction)
    tokenizer = _load_tokenizer(Path(tokenizer_path))
    sources = resolve_inputs(inputs, text_field, text_extensions)
    dtype = token_dtype(tokenizer.vocab_size)
    sample_len = seq_len + 1
    settings = {
        # Resolved, so that a rerun from another working directory is the same build.
        "sources": [[str(source.path.resolve()), source.path.stat().st_size] for source in sources],
        "tokenizer_sha256": tokenizer.sha256,
        "seq_len": seq_len,
        "samples_per_shard": samples_per_shard(shard_bytes, sample_len * dtype.itemsize),
        "val_fraction": val_fraction,
        "text_field": text_field,
        "text_unit": text_unit,
    }
    # How a build proceeds, not what it writes: an unfinished build made otherwise would resume
    # at another place, but a finished one is the same build.
    progress_settings = {
        **settings,
        "chunk_characters": CHUNK_CHARACTERS,
        # Which documents fill a chunk; builds that counted empty ones resume elsewhere.
        "empty_documents": "skipped",
    }
    out = _output(out_dir)
    if out.exists(MANIFEST_NAME):
        try:
            manifest = read_manifest(out.location)
        except ValueError as error:
            raise _damaged_build(out.location, str(error)) from error
        found = {key: manifest.build.get(key) for key in settings}  # not how it proceeded
        _require_same_settings(out.location, found, settings)
        return manifest
    split_names = (TRAIN, VALIDATION) if val_fraction > 0 else (TRAIN,)
    checkpoints = _load_progress(out, progress_settings, split_names)

    def save_progress() -> None:
        states = {split: writer.checkpoint.to_dict() for split, writer in writers.items()}
        record = json.dumps({"settings": progress_settings, "splits": states}, indent=1)
        out.write_bytes(PROGRESS_NAME, record.encode())

    # A shard is written locally and moved into place (renamed, or uploaded) once complete.
    scratch = tempfile.TemporaryDirectory(prefix="moeut-shards-")
    staging = out.staging_area(Path(scratch.name))
    writers = {
        split: _SplitWriter(
            out,
            staging,
            split,
            sample_len,
            dtype,
            settings["samples_per_shard"],
            tokenizer.unk_id,
            checkpoint,
        )
        for split, checkpoint in checkpoints.items()
    }
    save_progress()
    report = ReadReport(max_bad_records=max_bad_records)
    documents = iter_documents(sources, report, text_field=text_field, text_unit=text_unit)
    chunks = _chunks(documents, {split: c.position for split, c in checkpoints.items()})
    tokens_done = sum(writer.tokens_done for writer in writers.values())
    with (
        scratch,
        _tokenized(chunks, workers, (tokenizer.path, val_fraction, dtype)) as tokenized,
        Progress(
            total=None,
            initial=tokens_done,
            unit="tok",
            enabled=progress,
            every_steps=None,
            every_seconds=progress_every_seconds,
        ) as bar,
    ):
        for chunk in tokenized:
            completed = False
            for split, tokens in chunk.tokens.items():
                completed |= writers[split].add(chunk.index, tokens)
                bar.update(len(tokens))
            if completed:
                save_progress()

        splits = {split: writer.finish() for split, writer in writers.items()}
    unknown = _UnknownTokens(
        unknown=sum(writer.unknown_tokens() for writer in writers.values()),
        tokens=sum(split.tokens + split.dropped_tail_tokens for split in splits.values()),
    )
    try:
        require_documents(report, text_field)
        _require_training_samples(splits[TRAIN], sample_len, report)
    except BadInputError:
        # A build left behind would refuse the corrected rerun as one with other settings.
        _remove_build(out, splits.values())
        raise
    manifest = Manifest(
        seq_len=seq_len,
        dtype=dtype.str,
        tokenizer_sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size,
        eod_id=tokenizer.eod_id,
        splits=splits,
        sources=tuple(str(source.path) for source in sources),
        build=progress_settings,
        input_report={**report.to_dict(), "unknown_tokens": unknown.to_dict()},
    )
    write_manifest(out.location, manifest)  # last: it marks the build complete
    out.remove(PROGRESS_NAME)
    logger.info(report.summary())
    unknown.log(unknown_warn_rate)
    return manifest
