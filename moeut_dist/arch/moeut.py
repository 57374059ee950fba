"""The MoEUT spec: shared groups of SwitchHead + σ-MoE layers (`moeut_dist.model.moeut`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moeut_dist import profiles
from moeut_dist.arch.spec import Architecture, ParallelGroups, ShardRule
from moeut_dist.config import MoEUTConfig
from moeut_dist.model import MoEUTLM

if TYPE_CHECKING:
    from moeut_dist.parallel.layout import ParallelConfig


def shard_rule(name: str, config: MoEUTConfig) -> ShardRule | None:
    if name in ("embedding.weight", "lm_head.weight", "lm_head.bias"):
        return ShardRule("tensor", 0)  # vocabulary rows
    module, _, leaf = name.rpartition(".")
    if module.endswith(".ffn") and leaf in ("keys", "values"):
        return ShardRule("expert", 0)
    if module.endswith(".attention") and leaf in ("v", "o", "sel_v", "sel_o"):
        # Head h owns rows h·Ea … h·Ea+Ea−1 (Ea == 1: v rows h·dh…, o columns h·dh…).
        return ShardRule("tensor", 1 if leaf == "o" and config.att_n_experts == 1 else 0)
    if module.endswith((".attention.q", ".attention.k")):
        return ShardRule("tensor", 0)
    return None


def parallelize(model: MoEUTLM, parallel: ParallelConfig, groups: ParallelGroups) -> None:
    """SwitchHead split by heads and vocabulary-parallel ends over TP; σ-MoE keeps this rank's
    experts and sends tokens to the others' (TP folded into EP)."""
    # megatron-core is imported only by processes that parallelise (see `moeut_dist.arch`).
    from moeut_dist.parallel.expert_parallel import ExpertParallelDispatcher, ExpertPartition
    from moeut_dist.parallel.tensor_parallel import (
        TensorParallelSwitchHead,
        make_vocabulary_parallel,
    )

    config = model.config
    if parallel.tensor > 1:
        make_vocabulary_parallel(model, groups.tensor)
        for layer in model.transformer.layers:
            layer.attention = TensorParallelSwitchHead(config, groups.tensor)
    if parallel.tensor > 1 or parallel.expert > 1:
        partition = ExpertPartition(config.n_experts, groups.expert.size())
        n_local = partition.counts()[groups.expert.rank()]
        for layer in model.transformer.layers:
            ffn = layer.ffn
            ffn.keys = nn.Parameter(ffn.keys.new_empty(n_local, *ffn.keys.shape[1:]))
            ffn.values = nn.Parameter(ffn.values.new_empty(n_local, *ffn.values.shape[1:]))
            ffn.dispatcher = ExpertParallelDispatcher(
                partition, groups.expert, groups.tensor, config.kernel
            )
    model.transformer.checkpoint_activations = parallel.checkpoint_activations


def parameters(config: MoEUTConfig) -> int:
    """Exact parameter count of `MoEUTLM(config)` (embedding and LM head included)."""
    d, h, dh, ea = config.d_model, config.n_heads, config.head_dim, config.att_n_experts
    attention = 2 * d * h * dh + 2 * h * ea * d * dh + (2 if ea > 1 else 1) * h * ea * d
    ffn = 2 * config.n_experts * d * config.expert_size + config.n_experts * d
    layer = attention + ffn + 4 * d
    return config.group_size * layer + _outside_layers(config)


def active_parameters(config: MoEUTConfig) -> int:
    """Parameters one token's pass multiplies with in each group layer: every selector, Q and K,
    the `ka` selected V/O experts of each head and the `k` selected σ-MoE experts; plus the
    embedding, LM head and norms. A shared layer counts once, as in `parameters`."""
    d, h, dh, ea = config.d_model, config.n_heads, config.head_dim, config.att_n_experts
    if ea > 1:
        attention = 2 * d * h * dh + 2 * h * config.att_experts_per_head * d * dh + 2 * h * ea * d
    else:
        attention = 4 * d * h * dh + h * d
    ffn = 2 * config.experts_per_token * d * config.expert_size + config.n_experts * d
    layer = attention + ffn + 4 * d
    return config.group_size * layer + _outside_layers(config)


def _outside_layers(config: MoEUTConfig) -> int:
    """Embedding, LM head (with its bias) and the final norm."""
    return 2 * config.vocab_size * config.d_model + config.vocab_size + 2 * config.d_model


def forward_macs_per_token(config: MoEUTConfig, seq_len: int) -> float:
    """Multiply-accumulates of one token's forward pass, counted as the paper counts them:
    Q/K projections, the selected V/O experts (`ka` per head) and the selectors, the attention
    scores and weighted sum over the whole length-`seq_len` context (no discount for the causal
    mask), σ-MoE selection over every expert and the `k` selected experts, for every one of the
    L layer applications, and the LM head. Expert computation not selected costs nothing."""
    d, h, dh = config.d_model, config.n_heads, config.head_dim
    if config.att_n_experts > 1:
        value_and_output = 2 * d * dh * config.att_experts_per_head * h
        selectors = 2 * d * h * config.att_n_experts  # sel_v and sel_o
    else:
        value_and_output = 2 * d * h * dh
        selectors = d * h  # the output gate
    query_key = 2 * d * h * dh
    attention = 2 * h * dh * seq_len  # scores and the weighted sum of values
    expert_selection = d * config.n_experts
    experts = config.experts_per_token * 2 * d * config.expert_size
    layer = query_key + value_and_output + selectors + attention + expert_selection + experts
    return config.n_layers * layer + d * config.vocab_size


def to_official_state_dict(model: MoEUTLM) -> dict[str, torch.Tensor]:
    """The authors' key layout; loads into their `MoEUTLM` with `strict=False` (their code also
    expects its stored RoPE frequencies, which it recomputes identically at construction)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


MOEUT = Architecture(
    name="moeut",
    config_class=MoEUTConfig,
    model_class=MoEUTLM,
    profile=profiles.get,
    profile_names=profiles.moeut_names,
    parallelize=parallelize,
    shard_rule=shard_rule,
    parameters=parameters,
    active_parameters=active_parameters,
    forward_macs_per_token=forward_macs_per_token,
    n_experts=lambda config: config.n_experts,
    official_state_dict=to_official_state_dict,
)
