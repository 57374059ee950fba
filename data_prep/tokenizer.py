"""SentencePiece tokenizer training on a corpus, with the paper's settings as defaults."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import sentencepiece as spm

from data_prep.readers import (
    BadInputError,
    ReadReport,
    TextUnit,
    iter_documents,
    require_documents,
    resolve_inputs,
)
from moeut_dist.atomic_files import write_atomically
from moeut_dist.data.tokenizer import Tokenizer

# SentencePiece's special pieces (<unk>, <s>, </s>), the word boundary (▁) and one character:
# below this no corpus can be trained on, and SentencePiece says so without saying why.
_MIN_VOCAB_SIZE = 5

logger = logging.getLogger(__name__)


def _sentences(documents: Iterator[str], failures: list[Exception]) -> Iterator[str]:
    """Non-blank lines of each document: SentencePiece's unit of training input.

    An error while reading ends up in `failures` too: SentencePiece would turn it into a
    RuntimeError holding its traceback as text.
    """
    try:
        for text in documents:
            for line in text.splitlines():
                if line.strip():
                    yield line
    except Exception as error:
        failures.append(error)
        raise


def _sentencepiece_reason(error: RuntimeError) -> str:
    """SentencePiece's explanation without the C++ check before it: "INTERNAL: file.cc(744)
    [check] explanation"; the whole message when there is no explanation."""
    _, _, reason = str(error).partition("] ")
    return reason.strip() or str(error).strip()


def _check_arguments(out_path: Path, vocab_size: int) -> None:
    if out_path.is_dir():
        raise BadInputError(f"{out_path} is a directory; give the model file to write")
    if vocab_size < _MIN_VOCAB_SIZE:
        raise BadInputError(
            f"vocab_size must be at least {_MIN_VOCAB_SIZE} (SentencePiece's <unk>, <s> and </s>,"
            f" the word boundary and a character), got {vocab_size}"
        )


def train_tokenizer(
    inputs: Sequence[str | Path],
    out_path: str | Path,
    *,
    vocab_size: int = 8000,
    model_type: Literal["bpe", "unigram"] = "bpe",
    split_digits: bool = True,
    byte_fallback: bool = False,
    max_sentences: int = 2_000_000,
    character_coverage: float = 0.9995,
    text_field: str = "text",
    text_unit: TextUnit = "file",
    max_bad_records: int | None = 1000,
    seed: int = 0,
    threads: int | None = None,
) -> Tokenizer:
    """Train a SentencePiece model on the documents of `inputs` and write it to `out_path`.

    SentencePiece samples `max_sentences` lines uniformly from the whole corpus (reservoir
    sampling, seeded by `seed`), so memory stays bounded on large corpora. The end-of-document id
    is the model's `</s>`. The file is written atomically; returns it loaded.
    """
    out_path = Path(out_path)
    _check_arguments(out_path, vocab_size)
    sources = resolve_inputs(inputs, text_field)
    report = ReadReport(max_bad_records=max_bad_records)
    documents = iter_documents(sources, report, text_field=text_field, text_unit=text_unit)
    model = io.BytesIO()
    reading_failures: list[Exception] = []
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences((d.text for d in documents), reading_failures),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            split_digits=split_digits,
            byte_fallback=byte_fallback,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            character_coverage=character_coverage,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        if reading_failures:
            raise reading_failures[0] from None
        require_documents(report, text_field)
        raise BadInputError(
            f"SentencePiece cannot train on {report.documents} documents: "
            f"{_sentencepiece_reason(error)}"
        ) from error
    logger.info(report.summary())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out_path, lambda p: p.write_bytes(model.getvalue()))
    return Tokenizer(out_path)
