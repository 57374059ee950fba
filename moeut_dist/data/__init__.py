"""Tokenised shards at run time: the tokenizer, shard manifests, storage and the streaming
loader. Names are imported on first use (PEP 562): the loader needs torch, the data tools do
not."""

from moeut_dist.lazy_exports import lazy_getattr

# Exported name -> the module that defines it.
_EXPORTS = {
    "Manifest": "moeut_dist.data.manifest",
    "ManifestMismatchError": "moeut_dist.data.manifest",
    "ShardError": "moeut_dist.data.loader",
    "ShardInfo": "moeut_dist.data.manifest",
    "SplitInfo": "moeut_dist.data.manifest",
    "TokenLoader": "moeut_dist.data.loader",
    "Tokenizer": "moeut_dist.data.tokenizer",
    "file_sha256": "moeut_dist.data.tokenizer",
    "read_manifest": "moeut_dist.data.manifest",
    "read_shard": "moeut_dist.data.loader",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
