"""Tokenised shards at run time: the tokenizer, shard manifests and the streaming loader."""

from moeut_dist.data.loader import ReadSettings, ShardError, TokenLoader, read_shard
from moeut_dist.data.manifest import (
    Manifest,
    ManifestMismatchError,
    ShardInfo,
    SplitInfo,
    read_manifest,
)
from moeut_dist.data.tokenizer import Tokenizer, file_sha256

__all__ = [
    "Manifest",
    "ManifestMismatchError",
    "ReadSettings",
    "ShardError",
    "ShardInfo",
    "SplitInfo",
    "TokenLoader",
    "Tokenizer",
    "file_sha256",
    "read_manifest",
    "read_shard",
]
