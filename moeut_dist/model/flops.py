"""Model FLOPs per token, for MFU and benchmarks.

FLOPs count what a model computes per token, not its parameter count: for MoEUT the attention
projections, the selected V/O experts (`ka` per head), the selectors, causal attention scores,
the k selected σ-MoE experts, and the LM head. A backward costs two forwards; recomputation for
activation checkpointing is not model work and is not counted (the usual MFU convention).
"""

from __future__ import annotations

from moeut_dist.config import DenseConfig, MoEUTConfig


def _causal_scores(d_attention: int, seq_len: int) -> float:
    # On average a token attends to (seq_len + 1) / 2 positions, for scores and values.
    return 2 * (2 * d_attention) * (seq_len + 1) / 2


def forward_flops_per_token(config: MoEUTConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a length-`seq_len` sequence (multiply-add = 2 FLOPs)."""
    d, h, dh = config.d_model, config.n_heads, config.head_dim
    if config.att_n_experts > 1:
        value_and_output = 2 * (2 * d * dh * config.att_experts_per_head * h)
        selectors = 2 * (2 * d * h * config.att_n_experts)  # sel_v and sel_o
    else:
        value_and_output = 2 * (2 * d * h * dh)
        selectors = 2 * d * h  # the output gate
    query_key = 2 * (2 * d * h * dh)
    scores = _causal_scores(h * dh, seq_len)
    expert_selection = 2 * d * config.n_experts
    experts = config.experts_per_token * 2 * (2 * d * config.expert_size)
    layer = query_key + value_and_output + selectors + scores + expert_selection + experts
    return config.n_layers * layer + 2 * d * config.vocab_size


def training_flops_per_token(config: MoEUTConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(config, seq_len)


def dense_forward_flops_per_token(config: DenseConfig, seq_len: int) -> float:
    """The same count for the dense baseline: Q, K, V, O, the feed-forward and the LM head."""
    d = config.d_model
    layer = 2 * 4 * d * d + 2 * 2 * d * config.d_ff + _causal_scores(d, seq_len)
    return config.n_layers * layer + 2 * d * config.vocab_size
