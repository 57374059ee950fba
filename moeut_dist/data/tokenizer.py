"""Run-time tokenizer: a SentencePiece model file plus the facts the rest of the stack needs.

Training the model is `data_prep`'s job; this wrapper is what shards, the trainer, generation
and evaluation share, so that "which tokenizer" always means "which file bytes" (its sha256).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_processor(path: Path, model_bytes: bytes) -> spm.SentencePieceProcessor:
    not_a_model = ValueError(f"{path} is not a SentencePiece model")
    # SentencePiece takes empty bytes (an empty protobuf message) for a model without pieces,
    # and reports bytes it cannot parse as a RuntimeError naming its own C++ source line.
    if not model_bytes:
        raise not_a_model
    try:
        return spm.SentencePieceProcessor(model_proto=model_bytes)
    except RuntimeError as error:
        raise not_a_model from error


class Tokenizer:
    """A loaded SentencePiece model.

    The end-of-document id is SentencePiece's end-of-sentence piece (`</s>`): documents are
    joined with it in the shards, and the model's vocabulary is sized from `vocab_size`.
    """

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        model_bytes = self.path.read_bytes()
        # Hash the bytes that are loaded, not the file again, so the two cannot disagree.
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._processor = _load_processor(self.path, model_bytes)
        if self._processor.eos_id() < 0:
            raise ValueError(f"{self.path}: tokenizer has no end-of-sentence piece for documents")

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def unk_id(self) -> int:
        """The id of `<unk>`: what text outside the vocabulary becomes without byte fallback."""
        return self._processor.unk_id()

    @property
    def eod_id(self) -> int:
        return self._processor.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without an end-of-document id."""
        return self._processor.encode(text)

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text followed by the end-of-document id, on the calling thread only.

        One thread, because parallelism is the caller's (one process per core).
        """
        return self._processor.encode(list(texts), add_eos=True, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode(list(ids))
