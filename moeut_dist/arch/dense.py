"""The dense baseline spec: a pre-LN RoPE Transformer (`moeut_dist.model.dense`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeut_dist import profiles
from moeut_dist.arch.spec import Architecture, ParallelGroups, ShardRule
from moeut_dist.config import DenseConfig
from moeut_dist.model import DenseLM

if TYPE_CHECKING:
    from moeut_dist.parallel.layout import ParallelConfig

# Megatron's split: column-parallel into the heads / hidden units, row-parallel out of them.
_COLUMN_PARALLEL = (
    "attention.q.weight",
    "attention.k.weight",
    "attention.v.weight",
    "ffn.up.weight",
)
_ROW_PARALLEL = ("attention.o.weight", "ffn.down.weight")


def shard_rule(name: str, config: DenseConfig) -> ShardRule | None:
    if name in ("embedding.weight", "lm_head.weight", "lm_head.bias"):
        return ShardRule("tensor", 0)  # vocabulary rows
    if name.endswith(_COLUMN_PARALLEL):
        return ShardRule("tensor", 0)
    if name.endswith(_ROW_PARALLEL):
        return ShardRule("tensor", 1)
    return None


def parallelize(model: DenseLM, parallel: ParallelConfig, groups: ParallelGroups) -> None:
    """Attention split by heads, the feed-forward by hidden units (as `torch.chunk` splits
    d_ff, which need not divide), vocabulary-parallel ends. No experts: no expert parallelism."""
    # megatron-core is imported only by processes that parallelise (see `moeut_dist.arch`).
    from moeut_dist.parallel.tensor_parallel import (
        TensorParallelDenseAttention,
        TensorParallelFeedForward,
        make_vocabulary_parallel,
    )

    if parallel.tensor > 1:
        make_vocabulary_parallel(model, groups.tensor)
        for layer in model.layers:
            layer.attention = TensorParallelDenseAttention(model.config, groups.tensor)
            layer.ffn = TensorParallelFeedForward(model.config, groups.tensor)
    model.checkpoint_activations = parallel.checkpoint_activations


def parameters(config: DenseConfig) -> int:
    """Exact parameter count of `DenseLM(config)` (embedding and LM head included)."""
    d, inner = config.d_model, config.n_heads * config.head_dim
    layer = 4 * d * inner + 2 * d * config.d_ff + 4 * d
    return config.n_layers * layer + 2 * config.vocab_size * d + config.vocab_size + 2 * d


def forward_macs_per_token(config: DenseConfig, seq_len: int) -> float:
    """Multiply-accumulates of one token's forward pass, counted as the paper counts them: Q, K,
    V and O projections, attention scores and the weighted sum over the whole length-`seq_len`
    context (no discount for the causal mask) and the feed-forward, in every layer; the LM head."""
    d, inner = config.d_model, config.n_heads * config.head_dim
    layer = 4 * d * inner + 2 * inner * seq_len + 2 * d * config.d_ff
    return config.n_layers * layer + d * config.vocab_size


DENSE = Architecture(
    name="dense",
    config_class=DenseConfig,
    model_class=DenseLM,
    profile=profiles.get_dense,
    profile_names=profiles.dense_names,
    parallelize=parallelize,
    shard_rule=shard_rule,
    parameters=parameters,
    active_parameters=parameters,  # every parameter takes part in every token's pass
    forward_macs_per_token=forward_macs_per_token,
    n_experts=lambda config: 0,
)
