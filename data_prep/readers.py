"""Corpus readers: plain text, JSON (optionally .gz / .zst) and Parquet, as one document stream.

Inputs are files, folders (searched recursively) or glob patterns, expanded in sorted order so
that the document order, and everything built from it, does not depend on the file system; a
file named twice is read once. A `.jsonl` file is JSON Lines; so is a `.json` file, unless it
starts with `[`: then it is one JSON array of records, read into memory whole.
Other files (source code, any plain text) are read as plain text when their extension is given
(`text_extensions`, `--ext`).
A malformed record (bad JSON, bad UTF-8, a missing or non-string text field) is skipped but
counted and reported with its `file:line` (`file:record N` in a JSON array); the run stops only
when their number exceeds the error budget. A plain-text document is decoded as a whole: bytes
that are not UTF-8 become U+FFFD and are counted, so a document is never spliced by dropping a
part of it. An empty or whitespace-only document is skipped and
counted too: it would only add an end-of-document token. Problems that would spoil the whole run
(a missing input, an unknown format, a Parquet file without the text column) are raised before
any document is read; an unreadable or truncated compressed file or an invalid JSON array, when
it is read.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from moeut_dist.data.manifest import MANIFEST_NAME, PROGRESS_NAME

TextUnit = Literal["file", "paragraph", "line"]

_COMPRESSIONS = (".gz", ".zst")
_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}
_MAX_EXAMPLES = 10
_JSON_WHITESPACE = b" \t\r\n"


class BadInputError(ValueError):
    """Input that cannot be used as asked: raised before expensive work, naming the problem."""


@dataclass(frozen=True)
class Document:
    text: str
    location: str  # "path:line" ("path:record N" in a JSON array, "path:row" in Parquet)


@dataclass(frozen=True)
class Source:
    path: Path
    format: str  # "text", "jsonl", "json" (an array or JSON Lines) or "parquet"


def normalized_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Extensions as suffixes (".py"), from "py", ".py" or "py,c,h"; sorted, each once."""
    names = (name.strip() for text in extensions for name in text.split(","))
    return tuple(sorted({name if name.startswith(".") else f".{name}" for name in names if name}))


@dataclass
class ReadReport:
    """Counts of documents read and records skipped, with the first few locations."""

    max_bad_records: int | None = 1000  # None: no limit
    documents: int = 0
    empty_documents: int = 0  # skipped: only whitespace
    undecodable_documents: int = 0  # plain-text documents with bytes that are not UTF-8
    undecodable_bytes: int = 0  # those bytes, each read as U+FFFD
    bad_records: Counter[str] = field(default_factory=Counter)  # reason -> count
    examples: list[str] = field(default_factory=list)  # "path:line: reason"

    @property
    def bad_total(self) -> int:
        return sum(self.bad_records.values())

    def record_bad(self, location: str, reason: str) -> None:
        self.bad_records[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{location}: {reason}")
        if self.max_bad_records is not None and self.bad_total > self.max_bad_records:
            raise BadInputError(
                f"more than {self.max_bad_records} malformed records (error budget exceeded); "
                f"{self.summary()}"
            )

    def record_undecodable(self, location: str, raw: bytes) -> None:
        """Count a document's bytes that are not UTF-8 (its text has U+FFFD in their place)."""
        self.undecodable_documents += 1
        self.undecodable_bytes += len(raw) - len(raw.decode("utf-8", "ignore").encode("utf-8"))
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{location}: bytes that are not UTF-8 (read as U+FFFD)")

    def summary(self) -> str:
        read = f"{self.documents} documents read"
        if self.empty_documents:
            read += f", {self.empty_documents} empty documents skipped"
        if self.undecodable_documents:
            read += (
                f", {self.undecodable_bytes} bytes that are not UTF-8 in "
                f"{self.undecodable_documents} documents read as U+FFFD"
            )
        examples = "".join(f"\n  {example}" for example in self.examples)
        if not self.bad_records:
            return f"{read}, no malformed records" + (
                f"; first ones:{examples}" if examples else ""
            )
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.bad_records.most_common())
        return (
            f"{read}, {self.bad_total} malformed records skipped ({reasons}); first ones:{examples}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "empty_documents": self.empty_documents,
            "undecodable_documents": self.undecodable_documents,
            "undecodable_bytes": self.undecodable_bytes,
            "bad_records": dict(self.bad_records),
            "examples": list(self.examples),
        }


def require_documents(report: ReadReport, text_field: str) -> None:
    """Refuse a read that found no documents, saying what was read and what to check."""
    if report.documents == 0:
        raise BadInputError(
            "no documents in the inputs (check that they hold text, and JSON and Parquet "
            f"records in the field {text_field!r}); {report.summary()}"
        )


def _format_of(path: Path, text_extensions: Sequence[str] = ()) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    if not suffixes:
        return None
    return _FORMATS.get(suffixes[-1]) or ("text" if suffixes[-1] in text_extensions else None)


def _is_shard_build_record(path: Path) -> bool:
    """A shard build's own manifest or progress file (beside its shards, or mid-build): JSON, but
    not text to read, when a folder scan meets a shard directory inside the corpus."""
    directory = path.parent
    return path.name in (MANIFEST_NAME, PROGRESS_NAME) and (
        (directory / PROGRESS_NAME).is_file() or any(directory.glob("*.tar"))
    )


def _expand_one(item: str | Path, text_extensions: Sequence[str]) -> list[Path]:
    path = Path(item)
    if path.is_file():
        if _format_of(path, text_extensions) is None:
            raise BadInputError(
                f"{path}: unknown input format (expected one of {sorted(_FORMATS)}"
                f", optionally with {' or '.join(_COMPRESSIONS)}; read other plain text with "
                f"--ext {path.suffix.lstrip('.') or 'EXT'})"
            )
        return [path]
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        candidates = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
    files = [
        p
        for p in candidates
        if p.is_file()
        and _format_of(p, text_extensions) is not None
        and not _is_shard_build_record(p)
    ]
    if not files:
        raise BadInputError(f"{item}: no such file, or no readable input files in it")
    return files


def resolve_inputs(
    inputs: Sequence[str | Path], text_field: str = "text", text_extensions: Sequence[str] = ()
) -> list[Source]:
    """Expand files, folders and globs into sources, checking each can be read as asked.

    Files ending in one of `text_extensions` (".py", ".c", ...) are read as plain text. Folders
    and globs never yield a shard build's manifest or progress file: a shard directory, this
    build's or another's, may lie inside the corpus folder.
    """
    if not inputs:
        raise BadInputError("no inputs given")
    text_extensions = normalized_extensions(text_extensions)
    expanded = (path for item in inputs for path in _expand_one(item, text_extensions))
    paths = _first_of_each_file(expanded)
    sources = [Source(path, _format_of(path, text_extensions)) for path in paths]
    for source in sources:
        if source.format == "parquet":
            _check_parquet_column(source.path, text_field)
    return sources


def _first_of_each_file(paths: Iterable[Path]) -> list[Path]:
    """`paths` in order, without the later names of a file already named (overlapping inputs,
    links): by real path."""
    first_by_file: dict[Path, Path] = {}
    for path in paths:
        first_by_file.setdefault(path.resolve(), path)
    return list(first_by_file.values())


def _check_parquet_column(path: Path, text_field: str) -> None:
    import pyarrow.parquet as pq

    try:
        columns = pq.ParquetFile(path).schema_arrow.names
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise BadInputError(f"{path}: not a readable Parquet file ({error})") from error
    if text_field not in columns:
        raise BadInputError(f"{path}: no column {text_field!r}; its columns are {columns}")


def _open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        # The raw reader has no lines and no small reads; buffering adds them.
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a `.zst` file of one or more frames.

    python-zstandard's own reader ends quietly where a truncated file ends; this one raises
    EOFError if the file ends inside a frame, as gzip does.
    """

    def __init__(self, path: Path) -> None:
        import zstandard

        self._decompressor = zstandard.ZstdDecompressor()
        self._input_size = zstandard.DECOMPRESSION_RECOMMENDED_INPUT_SIZE
        self._compressed = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._frame: Any = None  # the current frame's decompressobj; None before the first
        self._pending = memoryview(b"")  # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        while not self._pending:
            compressed = self._compressed.read(self._input_size)
            if not compressed:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("compressed file ended before the end of a zstd frame")
                return 0
            self._pending = memoryview(self._decompress(compressed))
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _decompress(self, compressed: bytes) -> bytes:
        # A decompressobj reads one frame; the bytes after its end start the next frame.
        parts = []
        while compressed:
            if self._frame is None or self._frame.eof:
                self._frame = self._decompressor.decompressobj()
            parts.append(self._frame.decompress(compressed))
            compressed = self._frame.unused_data if self._frame.eof else b""
        return b"".join(parts)

    def close(self) -> None:
        self._compressed.close()
        super().close()


def _read_errors(path: Path) -> tuple[type[Exception], ...]:
    """What reading a corrupt or truncated (compressed) input raises."""
    if path.suffix == ".zst":
        import zstandard

        return (OSError, EOFError, zstandard.ZstdError)
    return (OSError, EOFError)


@contextmanager
def _reading(path: Path, where: Callable[[], str]) -> Iterator[None]:
    """Name `path` when it fails while read (corrupt or truncated), instead of a traceback;
    `where` says how far the read got (" after line 12")."""
    try:
        yield
    except _read_errors(path) as error:
        raise BadInputError(
            f"{path}: unreadable{where()} (corrupt or truncated? {error})"
        ) from error


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    number = 0
    with _reading(path, lambda: f" after line {number}"), _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            yield number, raw


def _decoded_lines(path: Path, report: ReadReport) -> Iterator[tuple[int, str]]:
    """Lines of a file of records, each a record: one that is not UTF-8 is reported bad."""
    for number, raw in _raw_lines(path):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError:
            report.record_bad(f"{path}:{number}", "invalid UTF-8")


def _record_document(
    record: Any, location: str, text_field: str, report: ReadReport
) -> Document | None:
    """The document of one JSON record, or None once the reason there is none is reported."""
    text = record.get(text_field) if isinstance(record, dict) else None
    if isinstance(text, str):
        return Document(text, location)
    if not isinstance(record, dict) or text_field not in record:
        report.record_bad(location, f"missing field {text_field!r}")
    else:
        report.record_bad(location, f"field {text_field!r} is not a string")
    return None


def _jsonl_documents(path: Path, text_field: str, report: ReadReport) -> Iterator[Document]:
    for number, line in _decoded_lines(path, report):
        if not line.strip():
            continue
        location = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            report.record_bad(location, "invalid JSON")
            continue
        if document := _record_document(record, location, text_field, report):
            yield document


def _json_array(path: Path) -> list[Any] | None:
    """The records of a file holding one JSON array; None if its first byte that is not JSON
    whitespace is not `[` (then it is JSON Lines)."""
    try:
        with _open_binary(path) as f:
            head = _through_first_content_byte(f)
            if not head.endswith(b"["):
                return None
            content = head + f.read()
    except _read_errors(path) as error:
        raise BadInputError(f"{path}: unreadable (corrupt or truncated? {error})") from error
    try:
        return json.loads(content)
    except ValueError as error:  # bad JSON or bad UTF-8 anywhere spoils the whole array
        raise BadInputError(f"{path}: not a valid JSON array ({error})") from error


def _through_first_content_byte(stream: IO[bytes]) -> bytes:
    """The bytes read from `stream` up to and including the first that is not JSON whitespace."""
    head = bytearray()
    while byte := stream.read(1):
        head += byte
        if byte not in _JSON_WHITESPACE:
            break
    return bytes(head)


def _json_documents(path: Path, text_field: str, report: ReadReport) -> Iterator[Document]:
    records = _json_array(path)
    if records is None:
        yield from _jsonl_documents(path, text_field, report)
        return
    for number, record in enumerate(records, start=1):
        if document := _record_document(record, f"{path}:record {number}", text_field, report):
            yield document


def _text_document(raw: bytes, location: str, report: ReadReport) -> Document:
    """A plain-text document decoded whole: bytes that are not UTF-8 become U+FFFD, counted."""
    try:
        return Document(raw.decode("utf-8"), location)
    except UnicodeDecodeError:
        report.record_undecodable(location, raw)
        return Document(raw.decode("utf-8", "replace"), location)


def _text_documents(path: Path, unit: TextUnit, report: ReadReport) -> Iterator[Document]:
    if unit == "file":
        with _reading(path, str), _open_binary(path) as f:
            raw = f.read()
        yield _text_document(raw, f"{path}:1", report)
    elif unit == "line":
        for number, raw in _raw_lines(path):
            if raw.strip():
                yield _text_document(raw.rstrip(b"\r\n"), f"{path}:{number}", report)
    else:
        yield from _paragraphs(path, report)


def _paragraphs(path: Path, report: ReadReport) -> Iterator[Document]:
    """Runs of non-blank lines, each a document located at its first line.

    Read a block at a time and cut by regular expression, not line by line: on short paragraphs
    (a play's speeches) a Python loop over lines costs as much as a tenth of tokenising them.
    A block is used up to its last blank line; the rest waits for the next block.
    """
    first_line = 1  # the number of the line that `pending` starts with
    pending = b""
    name = str(path)
    with _reading(path, lambda: f" after line {first_line}"), _open_binary(path) as f:
        while True:
            block = f.read(_READ_BLOCK)
            data = pending + block
            cut = _end_of_last_blank_line(data, len(pending)) if block else len(data)
            complete, pending = data[:cut], data[cut:]
            position = 0
            for paragraph in _PARAGRAPH.finditer(complete):
                first_line += complete.count(b"\n", position, paragraph.start())
                position = paragraph.start()
                text = paragraph.group().rstrip(b"\r\n")
                yield _text_document(text, f"{name}:{first_line}", report)
            first_line += complete.count(b"\n", position)
            if not block:
                return


# A paragraph: lines (ended by a newline or the end of the text) that each hold a byte that is
# not ASCII whitespace; a blank line is one without, as `bytes.isspace` sees it.
_PARAGRAPH = re.compile(rb"(?:[^\n]*\S[^\n]*(?:\n|\Z))+")
_READ_BLOCK = 1 << 20


def _end_of_last_blank_line(data: bytes, start: int) -> int:
    """The index just past the last blank line of `data` whose newline lies at or after
    `start`, or 0 if there is none (`data[:start]` was searched before)."""
    end = data.rfind(b"\n")
    while end >= start:
        begin = data.rfind(b"\n", 0, end) + 1
        if not data[begin:end].strip():
            return end + 1
        end = begin - 1
    return 0


def _parquet_documents(path: Path, text_field: str, report: ReadReport) -> Iterator[Document]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield Document(text, f"{path}:{row}")
            else:
                report.record_bad(f"{path}:{row}", f"field {text_field!r} is not a string")


def iter_documents(
    sources: Sequence[Source],
    report: ReadReport,
    *,
    text_field: str = "text",
    text_unit: TextUnit = "file",
) -> Iterator[Document]:
    """Documents of all sources in order; malformed records go to `report` instead.

    `text_unit` says what a document is in a plain text file: the whole file, each paragraph
    (a run of non-blank lines; a play's speeches, a book's paragraphs) or each non-blank line.
    JSON, JSONL and Parquet hold one document per record, in `text_field`. Documents that are
    empty or only whitespace are counted in `report`, not yielded.
    """
    for source in sources:
        if source.format == "jsonl":
            documents = _jsonl_documents(source.path, text_field, report)
        elif source.format == "json":
            documents = _json_documents(source.path, text_field, report)
        elif source.format == "parquet":
            documents = _parquet_documents(source.path, text_field, report)
        else:
            documents = _text_documents(source.path, text_unit, report)
        for document in documents:
            if not document.text or document.text.isspace():  # no stripped copy
                report.empty_documents += 1
                continue
            report.documents += 1
            yield document
