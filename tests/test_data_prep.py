"""Corpus readers, tokenizer training and the shard writer (`data_prep`)."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep import cli, readers, shards
from data_prep.readers import BadInputError, ReadReport, iter_documents, resolve_inputs
from data_prep.shards import ShardTarWriter, build_shards, is_validation_document
from data_prep.synthetic import synthetic_documents, write_jsonl
from data_prep.tokenizer import train_tokenizer
from moeut_dist.data import Tokenizer, read_manifest, read_shard

SEQ_LEN = 32


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return synthetic_documents(600, seed=1, words_per_document=(20, 200))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, documents) -> list[Path]:
    """The documents in two inputs, plain and gzipped JSONL."""
    folder = tmp_path_factory.mktemp("corpus")
    first = write_jsonl(folder / "a.jsonl", documents[:300])
    second = folder / "b.jsonl.gz"
    with gzip.open(second, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in documents[300:])
    return [first, second]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus) -> Tokenizer:
    out = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    return train_tokenizer(corpus, out, vocab_size=400)


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def _stored_tokens(shard_dir: Path, split: str) -> np.ndarray:
    manifest = read_manifest(shard_dir)
    dtype = np.dtype(manifest.dtype)
    shards = manifest.split(split).shards
    return np.concatenate(
        [
            read_shard(
                shard_dir / s.name,
                s.samples,
                manifest.sample_len,
                dtype,
                vocab_size=manifest.vocab_size,
                sha256=s.sha256,
            )
            for s in shards
        ]
    ).reshape(-1)


def test_tokenizer_has_the_papers_settings(tokenizer):
    assert tokenizer.vocab_size == 400
    assert tokenizer.eod_id == 2  # SentencePiece's </s>
    digits = [tokenizer.decode([i]).strip() for i in tokenizer.encode("31415")]
    assert [d for d in digits if d] == list("31415")  # split_digits


def test_tokenizer_training_is_deterministic(tmp_path, corpus, tokenizer):
    again = train_tokenizer(corpus, tmp_path / "again.model", vocab_size=400)
    assert again.sha256 == tokenizer.sha256


def test_decoded_shards_are_the_input_tokens_in_order(tmp_path, documents, corpus, tokenizer):
    val_fraction = 0.2
    manifest = build_shards(
        corpus,
        tmp_path,
        tokenizer.path,
        SEQ_LEN,
        shard_bytes=30_000,
        val_fraction=val_fraction,
        progress=False,
    )
    assert manifest.tokenizer_sha256 == tokenizer.sha256
    assert manifest.input_report["documents"] == len(documents)
    for split, held_out in (("train", False), ("val", True)):
        texts = [t for t in documents if is_validation_document(t, val_fraction) == held_out]
        expected = list(itertools.chain.from_iterable(tokenizer.encode_documents(texts)))
        stored = _stored_tokens(tmp_path, split)
        info = manifest.split(split)
        assert len(stored) == info.tokens == len(expected) - info.dropped_tail_tokens
        assert info.dropped_tail_tokens < SEQ_LEN + 1
        assert stored.tolist() == expected[: len(stored)]
        assert len(info.shards) > 1
        assert {s.samples for s in info.shards[:-1]} == {manifest.build["samples_per_shard"]}


@pytest.fixture
def small_chunks(monkeypatch) -> int:
    """Chunks of a few documents, so that a small corpus makes many: the unit of work of the
    worker processes and of the position a build resumes from."""
    monkeypatch.setattr(shards, "CHUNK_CHARACTERS", 2_000)
    return shards.CHUNK_CHARACTERS


def test_shards_are_byte_identical_for_1_2_and_3_workers(tmp_path, corpus, tokenizer, small_chunks):
    for workers in (1, 2, 3):
        build_shards(
            corpus,
            tmp_path / f"w{workers}",
            tokenizer.path,
            SEQ_LEN,
            shard_bytes=30_000,
            val_fraction=0.1,
            workers=workers,
            progress=False,
        )
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2") == _files(tmp_path / "w3")
    assert len(_files(tmp_path / "w1")) > 10


_BUILD_SCRIPT = """
import sys
from data_prep import shards
shards.CHUNK_CHARACTERS = int(sys.argv.pop())
shards.build_shards(sys.argv[1:-2], sys.argv[-2], sys.argv[-1], 32, shard_bytes=20_000,
             val_fraction=0.1, progress=False)
"""


def _has_checkpoint(shard_dir: Path) -> bool:
    try:
        progress = json.loads((shard_dir / "progress.json").read_text())
    except FileNotFoundError:
        return False
    return bool(progress["splits"]["train"]["shards"])


def test_killed_build_completes_on_rerun_with_identical_output(
    tmp_path, corpus, tokenizer, small_chunks
):
    # A bigger corpus, so that the build is still running when its first shard appears.
    big = write_jsonl(
        tmp_path / "big.jsonl", synthetic_documents(800, seed=2, words_per_document=(20, 200))
    )
    inputs = [*corpus, big]
    killed = tmp_path / "killed"
    command = [
        sys.executable,
        "-c",
        _BUILD_SCRIPT,
        *map(str, inputs),
        str(killed),
        str(tokenizer.path),
        str(small_chunks),
    ]
    build = subprocess.Popen(command)
    deadline = time.monotonic() + 60
    while not _has_checkpoint(killed) and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    assert _has_checkpoint(killed), "the build was killed before its first checkpoint"
    assert not (killed / "manifest.json").exists(), "the build finished before it was killed"

    build_shards(
        inputs, killed, tokenizer.path, 32, shard_bytes=20_000, val_fraction=0.1, progress=False
    )
    reference = tmp_path / "reference"
    build_shards(
        inputs, reference, tokenizer.path, 32, shard_bytes=20_000, val_fraction=0.1, progress=False
    )
    assert _files(killed) == _files(reference)


def test_rerun_of_a_finished_build_keeps_it(tmp_path, corpus, tokenizer):
    first = build_shards(corpus, tmp_path, tokenizer.path, SEQ_LEN, progress=False)
    files = _files(tmp_path)
    assert build_shards(corpus, tmp_path, tokenizer.path, SEQ_LEN, progress=False) == first
    assert _files(tmp_path) == files


def test_build_with_other_settings_into_the_same_directory_is_refused(tmp_path, corpus, tokenizer):
    build_shards(corpus, tmp_path, tokenizer.path, SEQ_LEN, progress=False)
    with pytest.raises(BadInputError, match=r"seq_len: 32 before, 64 now"):
        build_shards(corpus, tmp_path, tokenizer.path, 64, progress=False)


@pytest.mark.parametrize(
    ("content", "error"),
    [('{"settings": {"seq_len"', "JSONDecodeError"), ('{"splits": {}}', "KeyError: 'settings'")],
)
def test_damaged_progress_record_is_refused_by_name(tmp_path, corpus, tokenizer, content, error):
    build_shards(corpus, tmp_path, tokenizer.path, SEQ_LEN, progress=False)
    (tmp_path / "manifest.json").unlink()  # as if killed after its last shard
    (tmp_path / "progress.json").write_text(content)
    with pytest.raises(BadInputError, match=rf"progress.json is damaged \({error}"):
        build_shards(corpus, tmp_path, tokenizer.path, SEQ_LEN, progress=False)


def _write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_malformed_records_are_reported_with_locations(tmp_path, tokenizer):
    bad = _write_lines(
        tmp_path / "bad.jsonl",
        [
            b'{"text": "good one"}',
            b'{"text": "unterminated',
            b'{"body": "no text field"}',
            b"",
            b'{"text": 42}',
            b'{"text": "bad utf-8 \xff\xfe"}',
            b'{"text": "good two"}',
        ],
    )
    manifest = build_shards([bad], tmp_path / "shards", tokenizer.path, 4, progress=False)
    report = manifest.input_report
    assert report["documents"] == 2
    assert report["bad_records"] == {
        "invalid JSON": 1,
        "missing field 'text'": 1,
        "field 'text' is not a string": 1,
        "invalid UTF-8": 1,
    }
    assert report["examples"] == [
        f"{bad}:2: invalid JSON",
        f"{bad}:3: missing field 'text'",
        f"{bad}:5: field 'text' is not a string",
        f"{bad}:6: invalid UTF-8",
    ]
    with pytest.raises(BadInputError, match="more than 3 malformed records"):
        build_shards(
            [bad], tmp_path / "strict", tokenizer.path, 4, max_bad_records=3, progress=False
        )


def test_every_input_format_is_read(tmp_path):
    (tmp_path / "plain.txt").write_text("first line\nsecond line\n")
    with zstandard.open(tmp_path / "c.jsonl.zst", "wt") as f:
        f.write('{"content": "zst doc"}\n')
    pq.write_table(pa.table({"content": ["parquet doc", None]}), tmp_path / "d.parquet")
    (tmp_path / "ignored.csv").write_text("not an input\n")
    report = ReadReport()
    sources = resolve_inputs([tmp_path], text_field="content")
    texts = [d.text for d in iter_documents(sources, report, text_field="content")]
    assert texts == ["zst doc", "parquet doc", "first line\nsecond line\n"]
    assert report.examples == [f"{tmp_path / 'd.parquet'}:2: field 'content' is not a string"]
    by_line = iter_documents(
        resolve_inputs([str(tmp_path / "*.txt")]), ReadReport(), text_unit="line"
    )
    assert [(d.text, d.location) for d in by_line] == [
        ("first line", f"{tmp_path / 'plain.txt'}:1"),
        ("second line", f"{tmp_path / 'plain.txt'}:2"),
    ]


def test_json_is_an_array_of_records_or_json_lines(tmp_path):
    records = [{"text": "first"}, {"body": "no text"}, {"text": 7}, "not a record", {"text": "2nd"}]
    (tmp_path / "array.json").write_text("\n  " + json.dumps(records, indent=1))
    with gzip.open(tmp_path / "array.json.gz", "wt") as f:
        json.dump([{"text": "gzipped"}], f)
    (tmp_path / "lines.json").write_text('{"text": "line one"}\n{"text": "line two"}\n')
    report = ReadReport()
    documents = list(iter_documents(resolve_inputs([tmp_path]), report))
    array = tmp_path / "array.json"
    assert [(d.text, d.location) for d in documents] == [
        ("first", f"{array}:record 1"),
        ("2nd", f"{array}:record 5"),
        ("gzipped", f"{array}.gz:record 1"),
        ("line one", f"{tmp_path / 'lines.json'}:1"),
        ("line two", f"{tmp_path / 'lines.json'}:2"),
    ]
    assert report.examples == [
        f"{array}:record 2: missing field 'text'",
        f"{array}:record 3: field 'text' is not a string",
        f"{array}:record 4: missing field 'text'",
    ]


def test_invalid_json_array_is_named_not_a_traceback(tmp_path):
    (tmp_path / "cut.json").write_text('[{"text": "a"}, {"te')
    with pytest.raises(BadInputError, match=r"cut\.json: not a valid JSON array \(Unterminated"):
        list(iter_documents(resolve_inputs([tmp_path / "cut.json"]), ReadReport()))


def test_a_file_named_by_several_inputs_is_read_once(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", ["alpha"])
    second = write_jsonl(tmp_path / "b.jsonl", ["beta"])
    (tmp_path / "link.jsonl").symlink_to(first)
    other_spelling = f"{tmp_path}/../{tmp_path.name}/b.jsonl"
    inputs = [second, first, other_spelling, str(tmp_path / "*.jsonl"), tmp_path]
    assert [source.path for source in resolve_inputs(inputs)] == [second, first]


def test_prep_starts_without_importing_torch():
    """`moeut prep` and the data package export lazily: torch's import would cost each prep
    command more CPU time than reading a small corpus."""
    code = (
        "import sys; from moeut_dist.cli import main; import data_prep.cli; "
        "from moeut_dist.data import Tokenizer, read_manifest; from moeut_dist import ConfigError; "
        "print(sorted(m for m in ('torch', 'deepspeed', 'webdataset') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_paragraphs_are_documents(tmp_path):
    (tmp_path / "play.txt").write_text("\nHAMLET. To be,\nor not.\n\n\nOPHELIA. Good my lord.\n")
    paragraphs = iter_documents(
        resolve_inputs([tmp_path / "play.txt"]), ReadReport(), text_unit="paragraph"
    )
    assert [(d.text, d.location) for d in paragraphs] == [
        ("HAMLET. To be,\nor not.", f"{tmp_path / 'play.txt'}:2"),
        ("OPHELIA. Good my lord.", f"{tmp_path / 'play.txt'}:6"),
    ]


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 8, 13, 1 << 20])
def test_paragraphs_are_the_same_whatever_the_read_blocks(tmp_path, monkeypatch, block_bytes):
    """The reader cuts blocks at blank lines: a block boundary anywhere (inside a line, a
    CRLF, a blank line) changes no paragraph and no line number."""
    monkeypatch.setattr(readers, "_READ_BLOCK", block_bytes)
    path = tmp_path / "text.txt"
    path.write_bytes(
        b"\n \t\nFirst line,\r\nsecond line.\r\n\r\n\x0b\x0c\n"
        b"  indented\nx\n\n\n\nA line without blank lines around it ends the file \t"
    )
    documents = iter_documents(resolve_inputs([path]), ReadReport(), text_unit="paragraph")
    assert [(d.text, d.location.rsplit(":", 1)[1]) for d in documents] == [
        ("First line,\r\nsecond line.", "3"),
        ("  indented\nx", "7"),
        ("A line without blank lines around it ends the file \t", "12"),
    ]


def test_unusable_inputs_are_refused_before_reading(tmp_path):
    with pytest.raises(BadInputError, match=r"missing\.jsonl: no such file"):
        resolve_inputs([tmp_path / "missing.jsonl"])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(BadInputError, match=r"data\.csv: unknown input format"):
        resolve_inputs([tmp_path / "data.csv"])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(
        BadInputError, match=r"t.parquet: no column 'text'; its columns are \['body'\]"
    ):
        resolve_inputs([tmp_path / "t.parquet"])


def test_corrupt_compressed_inputs_are_named_not_a_traceback(tmp_path):
    lines = "".join(f'{{"text": "document {i}"}}\n' for i in range(2000)).encode()
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines)[:200])
    (tmp_path / "junk.jsonl.zst").write_bytes(b"not zstandard at all")
    for name in ("cut.jsonl.gz", "junk.jsonl.zst"):
        documents = iter_documents(resolve_inputs([tmp_path / name]), ReadReport())
        with pytest.raises(BadInputError, match=rf"{name}: unreadable after line \d+"):
            list(documents)


def _zstd_lines(count: int) -> bytes:
    """JSON Lines of `count` random, so hardly compressible, documents."""
    rng = random.Random(0)
    return "".join(
        json.dumps({"text": rng.randbytes(100).hex()}) + "\n" for _ in range(count)
    ).encode()


def test_truncated_zst_inputs_are_named_not_read_as_complete(tmp_path):
    lines = _zstd_lines(1000)
    one_frame = zstandard.ZstdCompressor().compress(lines)  # the frame header holds its size
    (tmp_path / "frame.jsonl.zst").write_bytes(one_frame[: len(one_frame) // 2])
    with zstandard.open(tmp_path / "stream.jsonl.zst", "wb") as f:  # a streamed frame
        f.write(lines)
    streamed = (tmp_path / "stream.jsonl.zst").read_bytes()
    (tmp_path / "stream.jsonl.zst").write_bytes(streamed[: len(streamed) // 2])
    for name in ("frame.jsonl.zst", "stream.jsonl.zst"):
        documents = iter_documents(resolve_inputs([tmp_path / name]), ReadReport())
        with pytest.raises(BadInputError, match=rf"{name}: unreadable after line \d+ .*zstd frame"):
            list(documents)


def test_zst_input_of_several_frames_is_read_whole(tmp_path):
    # The first frame is larger than one read of the compressed file, so the second starts
    # inside a later read.
    first, second = _zstd_lines(1500), b'{"text": "after the first frame"}\n'
    compress = zstandard.ZstdCompressor().compress
    (tmp_path / "frames.jsonl.zst").write_bytes(compress(first) + compress(second))
    documents = iter_documents(resolve_inputs([tmp_path / "frames.jsonl.zst"]), ReadReport())
    texts = [document.text for document in documents]
    assert len(texts) == 1501 and texts[-1] == "after the first frame"


def test_empty_documents_are_skipped_and_counted(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n")
    write_jsonl(tmp_path / "records.jsonl", ["", "text", " \t"])
    report = ReadReport()
    documents = iter_documents(resolve_inputs([tmp_path]), report, text_unit="file")
    assert [document.text for document in documents] == ["text"]
    assert report.to_dict()["empty_documents"] == 4
    assert report.summary().startswith("1 documents read, 4 empty documents skipped")


@pytest.mark.parametrize(
    ("write_inputs", "options", "reason"),
    [
        (
            lambda folder: write_jsonl(folder / "a.jsonl", ["some text", "more text"]),
            {"text_field": "body"},
            r"field 'body'\); 0 documents read, 2 malformed records skipped \(2 missing field",
        ),
        (
            lambda folder: (folder / "a.txt").write_text(" \n"),
            {},
            r"0 documents read, 1 empty documents skipped, no malformed records",
        ),
    ],
    ids=["wrong text field", "only empty files"],
)
def test_shards_without_documents_are_refused_and_leave_no_build(
    tmp_path, tokenizer, write_inputs, options, reason
):
    write_inputs(tmp_path)
    out = tmp_path / "shards"
    with pytest.raises(BadInputError, match=rf"^no documents in the inputs .*{reason}"):
        build_shards([tmp_path], out, tokenizer.path, SEQ_LEN, progress=False, **options)
    assert list(out.iterdir()) == []  # nothing that would refuse a corrected rerun


def test_shards_without_a_training_sample_are_refused_and_leave_no_build(
    tmp_path, documents, tokenizer
):
    corpus = write_jsonl(tmp_path / "small.jsonl", documents[:3])
    out = tmp_path / "shards"
    with pytest.raises(
        BadInputError,
        match=r"^no training samples: the train split's \d+ tokens are fewer than one sample "
        r"of seq_len \+ 1 = 100001 tokens .*; 3 documents read",
    ):
        build_shards([corpus], out, tokenizer.path, 100_000, progress=False)
    assert list(out.iterdir()) == []
    build_shards([corpus], out, tokenizer.path, 8, progress=False)  # a corrected rerun
    assert read_manifest(out).split("train").samples > 0


def test_shard_directory_inside_the_input_folder_is_not_an_input(tmp_path, documents, tokenizer):
    write_jsonl(tmp_path / "corpus.jsonl", documents[:20])
    out = tmp_path / "shards"
    first = build_shards([tmp_path], out, tokenizer.path, SEQ_LEN, progress=False)
    # As if killed between writing the manifest and deleting the progress record.
    (out / "progress.json").write_text("{}")
    assert build_shards([tmp_path], out, tokenizer.path, SEQ_LEN, progress=False) == first
    assert [Path(path).name for path, _ in first.build["sources"]] == ["corpus.jsonl"]
    # Nor is another build's directory there, for this build or for a tokenizer.
    second = build_shards([tmp_path], tmp_path / "second", tokenizer.path, SEQ_LEN, progress=False)
    assert second.build["sources"] == first.build["sources"]
    assert [s.path.name for s in resolve_inputs([tmp_path])] == ["corpus.jsonl"]


def test_rerun_from_another_working_directory_is_the_same_build(
    tmp_path, documents, tokenizer, monkeypatch
):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "corpus.jsonl", documents[:20])
    monkeypatch.chdir(tmp_path / "data")
    first = build_shards(["corpus.jsonl"], "../shards", tokenizer.path, SEQ_LEN, progress=False)
    monkeypatch.chdir(tmp_path)
    again = build_shards(["data/corpus.jsonl"], "shards", tokenizer.path, SEQ_LEN, progress=False)
    assert again == first


def test_unfinished_build_of_an_earlier_version_is_refused_not_resumed(
    tmp_path, documents, tokenizer
):
    """Earlier versions cut the input into chunks of 256 documents, counting empty ones: an
    interrupted build of theirs would resume at other documents."""
    write_jsonl(tmp_path / "corpus.jsonl", documents[:20])
    args = ([tmp_path / "corpus.jsonl"], tmp_path / "shards", tokenizer.path, SEQ_LEN)
    manifest = build_shards(*args, progress=False)
    earlier = {k: v for k, v in manifest.build.items() if k != "chunk_characters"}
    earlier |= {"documents_per_chunk": 256, "empty_documents": "counted"}
    (tmp_path / "shards" / "manifest.json").unlink()
    progress = {"settings": earlier, "splits": {"train": {}, "val": {}}}
    (tmp_path / "shards" / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(BadInputError, match=r"different settings.*chunk_characters"):
        build_shards(*args, progress=False)


def test_finished_build_of_an_earlier_version_is_kept(tmp_path, documents, tokenizer):
    """How a finished build cut its input into chunks does not change its shards."""
    write_jsonl(tmp_path / "corpus.jsonl", documents[:20])
    args = ([tmp_path / "corpus.jsonl"], tmp_path / "shards", tokenizer.path, SEQ_LEN)
    build_shards(*args, progress=False)
    recorded = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    del recorded["build"]["chunk_characters"]
    recorded["build"]["documents_per_chunk"] = 256
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(recorded))
    assert build_shards(*args, progress=False).build == recorded["build"]


def test_other_input_files_are_named_by_their_first_difference(tmp_path, documents, tokenizer):
    """A build of many files that differs in one: the error is a line, not every file's path."""
    inputs = []
    for index in range(40):
        write_jsonl(tmp_path / f"part{index:02d}.jsonl", documents[index : index + 1])
        inputs.append(tmp_path / f"part{index:02d}.jsonl")
    build_shards(inputs, tmp_path / "shards", tokenizer.path, SEQ_LEN, progress=False)
    (tmp_path / "extra.jsonl").write_text((tmp_path / "part00.jsonl").read_text())
    with pytest.raises(BadInputError) as raised:
        build_shards([*inputs[:7], tmp_path / "extra.jsonl", *inputs[7:]], tmp_path / "shards",
                     tokenizer.path, SEQ_LEN, progress=False)  # fmt: skip
    message = str(raised.value)
    assert "sources: 40 entries before, 41 now, the first difference at entry 7" in message
    assert "part07.jsonl" in message and "extra.jsonl" in message and len(message) < 600


def test_missing_tokenizer_is_named(tmp_path, corpus):
    with pytest.raises(BadInputError, match=r"tokenizer .*missing\.model not found"):
        build_shards(corpus, tmp_path / "shards", tmp_path / "missing.model", SEQ_LEN)


@pytest.mark.parametrize("content", ["not a model", ""])
def test_file_that_is_not_a_tokenizer_is_named(tmp_path, corpus, content):
    (tmp_path / "corpus.model").write_text(content)
    with pytest.raises(ValueError, match=r"corpus\.model is not a SentencePiece model"):
        Tokenizer(tmp_path / "corpus.model")
    with pytest.raises(BadInputError, match=r"corpus\.model is not a SentencePiece model"):
        build_shards(corpus, tmp_path / "shards", tmp_path / "corpus.model", SEQ_LEN)


def test_too_large_vocabulary_is_bad_input_with_sentencepieces_reason(tmp_path, corpus):
    with pytest.raises(BadInputError, match=r"Vocabulary size too high \(100000\)\. .* <= \d+"):
        train_tokenizer(corpus, tmp_path / "tok.model", vocab_size=100_000)


def test_tokenizer_without_documents_is_refused_with_the_read_summary(tmp_path):
    corpus = write_jsonl(tmp_path / "a.jsonl", ["some text", "more text"], text_field="body")
    with pytest.raises(
        BadInputError,
        match=r"^no documents in the inputs .*; 0 documents read, 2 malformed records skipped",
    ):
        train_tokenizer([corpus], tmp_path / "tok.model", vocab_size=50)


@pytest.mark.parametrize("vocab_size", [-1, 0, 4])
def test_too_small_vocabulary_is_refused_before_reading(tmp_path, vocab_size):
    with pytest.raises(BadInputError, match=rf"^vocab_size must be at least 5 .*got {vocab_size}$"):
        train_tokenizer(
            [tmp_path / "not read.jsonl"], tmp_path / "tok.model", vocab_size=vocab_size
        )


def test_malformed_records_beyond_the_budget_stop_tokenizer_training(tmp_path):
    bad = _write_lines(tmp_path / "bad.jsonl", [b'{"text": "good"}', b"{", b"{", b"{"])
    with pytest.raises(BadInputError, match="more than 2 malformed records"):
        train_tokenizer([bad], tmp_path / "tok.model", vocab_size=50, max_bad_records=2)


def test_damaged_manifest_of_a_finished_build_is_named(tmp_path, corpus, tokenizer):
    build_shards(corpus, tmp_path, tokenizer.path, SEQ_LEN, progress=False)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(BadInputError, match=r"manifest\.json is damaged: .*; delete"):
        build_shards(corpus, tmp_path, tokenizer.path, SEQ_LEN, progress=False)


def test_cli_builds_shards(tmp_path, corpus, tokenizer, capsys):
    parser = cli.argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "prep",
            "shards",
            *map(str, corpus),
            "--tokenizer",
            str(tokenizer.path),
            "--out",
            str(tmp_path),
            "--seq-len",
            "16",
            "--shard-size",
            "64KB",
            "--no-progress",
        ]
    )
    assert args.handler(args) == 0
    assert "train:" in capsys.readouterr().out
    assert read_manifest(tmp_path).seq_len == 16
    args = parser.parse_args(["prep", "tokenizer", str(tmp_path / "none.jsonl"), "--out", "x"])
    assert args.handler(args) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    args = parser.parse_args(
        ["prep", "tokenizer", *map(str, corpus), "--out", "x", "--vocab-size", "100000"]
    )
    assert args.handler(args) == 2
    assert "moeut prep tokenizer: SentencePiece cannot train on 600 documents: Vocabulary size" in (
        capsys.readouterr().err
    )
    assert cli.parse_size("1GiB") == 1 << 30 and cli.parse_size("512") == 512


def test_cli_refuses_unusable_output_paths_in_one_line(tmp_path, corpus, tokenizer, capsys):
    parser = cli.argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    commands = {
        "is a directory; give the model file to write": [
            "tokenizer", *map(str, corpus), "--out", str(tmp_path), "--vocab-size", "400",
        ],
        "is not a directory; give a directory for the shards": [
            "shards", *map(str, corpus), "--tokenizer", str(tokenizer.path),
            "--out", str(a_file), "--seq-len", "16", "--no-progress",
        ],
        "vocab_size must be at least 5": [
            "tokenizer", *map(str, corpus), "--out", str(tmp_path / "t.model"), "--vocab-size", "0",
        ],
    }  # fmt: skip
    for problem, command in commands.items():
        args = parser.parse_args(["prep", *command])
        assert args.handler(args) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"moeut prep {command[0]}: ") and problem in error
        assert error.count("\n") == 1


def test_shard_tar_writer_writes_what_webdataset_writes(tmp_path):
    import webdataset

    samples = [(f"{i:010d}.tokens", bytes(range(i, i + 37))) for i in range(30)]
    # Another size, and names that need a pax header: none of the writer's templates fit.
    samples += [("0000000030.tokens", b"x" * 600), (f"{'a' * 120}.tokens", b"y"), ("é.tokens", b"")]
    reference = webdataset.TarWriter(
        str(tmp_path / "webdataset.tar"), encoder=False, mtime=0, user="moeut", group="moeut"
    )
    ours = ShardTarWriter(tmp_path / "ours.tar")
    for name, data in samples:
        key, field = name.split(".")
        reference.write({"__key__": key, field: data})
        ours.write(name, data)
    reference.close()
    ours.close()
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "webdataset.tar").read_bytes()


def test_files_of_given_extensions_are_read_as_plain_text(tmp_path):
    (tmp_path / "code").mkdir()
    for name in ("a.py", "b.c", "c.txt", "d.csv"):
        (tmp_path / "code" / name).write_text(f"contents of {name}\n")
    assert [s.path.name for s in resolve_inputs([tmp_path / "code"])] == ["c.txt"]
    sources = resolve_inputs([tmp_path / "code"], text_extensions=["py,.c"])
    assert [(s.path.name, s.format) for s in sources] == [
        ("a.py", "text"),
        ("b.c", "text"),
        ("c.txt", "text"),
    ]
    with pytest.raises(BadInputError, match=r"a\.py: unknown input format .*--ext py\)"):
        resolve_inputs([tmp_path / "code" / "a.py"])


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("paragraph", ["good one", "bad \ufffd line\nnext line", "last"]),
        ("line", ["good one", "bad \ufffd line", "next line", "last"]),
        ("file", ["good one\n\nbad \ufffd line\nnext line\n\nlast\n"]),
    ],
)
def test_undecodable_bytes_are_counted_per_document_never_spliced(tmp_path, unit, expected):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"good one\n\nbad \xff line\nnext line\n\nlast\n")
    report = ReadReport()
    documents = list(iter_documents(resolve_inputs([path]), report, text_unit=unit))
    assert [d.text for d in documents] == expected
    assert (report.undecodable_documents, report.undecodable_bytes) == (1, 1)
    assert "1 bytes that are not UTF-8 in 1 documents read as U+FFFD" in report.summary()


def test_default_tokenizer_represents_every_character(tmp_path, corpus, tokenizer):
    """Byte fallback: characters the training text never had come back out, none as <unk>."""
    text = 'Zebra #42 = "ΩΣ" — 猫 🙂 \\x7f'
    assert tokenizer.unk_id not in tokenizer.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    without = train_tokenizer(
        corpus, tmp_path / "no-fallback.model", vocab_size=400, byte_fallback=False
    )
    assert without.unk_id in without.encode(text)


def test_shard_build_reports_the_unknown_token_rate(tmp_path, corpus, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="data_prep.shards")
    strange = write_jsonl(tmp_path / "strange.jsonl", ["猫猫猫 🙂🙂 ΩΣ"] * 20)
    build_shards(
        [strange], tmp_path / "ours", tokenizer.path, SEQ_LEN, val_fraction=0, progress=False
    )
    assert any(r.getMessage().startswith("0 of ") for r in caplog.records)
    caplog.clear()
    without = train_tokenizer(
        corpus, tmp_path / "no-fallback.model", vocab_size=400, byte_fallback=False
    )
    manifest = build_shards(
        [strange], tmp_path / "theirs", without.path, 4, val_fraction=0, progress=False
    )
    unknown = manifest.input_report["unknown_tokens"]
    assert unknown["unknown"] > 0
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith(
        f"{unknown['unknown']} of {unknown['tokens']} tokens are <unk>"
    )
