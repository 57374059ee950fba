"""The manifest of a shard directory: what each shard holds and what it was built with.

A shard is a webdataset tar file. Each sample is one tar member `<key>.tokens` whose bytes are
`seq_len + 1` token ids as a little-endian unsigned integer array (`dtype`), so a reader turns
a sample into numbers with one `np.frombuffer` call. `manifest.json` lists the shards of each
split in build order with their sample counts, which is what lets a loader skip whole shards
when it resumes, and records the tokenizer's sha256 and `seq_len` so that shards are never read
with a tokenizer or context length they were not built for. Each shard's sha256 is recorded too;
the loader checks it as it reads the shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeut_dist.atomic_files import write_json_atomically
from moeut_dist.dataclass_dict import from_dict, to_dict

MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"  # an unfinished build's position (`data_prep.shards`)
FORMAT = "moeut-token-shards/1"
SAMPLE_FIELD = "tokens"


class ManifestMismatchError(ValueError):
    """Shards built with a different tokenizer or sequence length than the run expects."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype holding every id of a vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the shard directory
    samples: int
    tokens: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    shards: tuple[ShardInfo, ...]
    # Tokens after the last full sample of the split: fewer than one sample, so not stored.
    dropped_tail_tokens: int = 0

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def tokens(self) -> int:
        return sum(shard.tokens for shard in self.shards)


@dataclass(frozen=True)
class Manifest:
    seq_len: int
    dtype: str  # numpy dtype string of the stored ids, e.g. "<u2"
    tokenizer_sha256: str
    vocab_size: int
    eod_id: int
    splits: dict[str, SplitInfo]
    sources: tuple[str, ...] = ()
    # Build settings and reader statistics; informational, and used to recognise a rerun.
    build: dict[str, Any] = field(default_factory=dict)
    input_report: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def sample_len(self) -> int:
        """Tokens per stored sample: inputs and their shifted-by-one targets."""
        return self.seq_len + 1

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            # A ValueError: the name comes from the user (`--split`), not from our code.
            raise ValueError(f"the manifest has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def check_compatible(self, *, seq_len: int, tokenizer_sha256: str) -> None:
        """Refuse shards built for another tokenizer or sequence length, naming both values."""
        if tokenizer_sha256 != self.tokenizer_sha256:
            raise ManifestMismatchError(
                f"shards were built with tokenizer sha256 {self.tokenizer_sha256}, but this run's "
                f"tokenizer has sha256 {tokenizer_sha256}"
            )
        if seq_len != self.seq_len:
            raise ManifestMismatchError(
                f"shards were built with seq_len {self.seq_len}, but this run uses "
                f"seq_len {seq_len}"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: Any) -> Manifest:
        """The manifest in decoded JSON, or a ValueError naming what is wrong with it."""
        if isinstance(values, dict) and values.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {values.get('format')!r}, expected {FORMAT}")
        # Our own writer writes every field: a missing one means damage, not a default.
        return from_dict(cls, values, complete=True)


def write_manifest(shard_dir: str | Path, manifest: Manifest) -> None:
    write_json_atomically(Path(shard_dir) / MANIFEST_NAME, manifest.to_dict())


def read_manifest(shard_dir: str | Path) -> Manifest:
    """The manifest of a complete shard directory."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {shard_dir} is not a shard directory or its build has not finished"
        )
    try:
        return Manifest.from_dict(json.loads(path.read_bytes()))
    except ValueError as error:  # invalid JSON, UTF-8 or contents
        raise ValueError(f"{path} is damaged: {error}") from error
