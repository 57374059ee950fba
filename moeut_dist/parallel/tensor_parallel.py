"""Tensor parallelism with megatron-core: attention split by heads, vocabulary-parallel ends.

A TP rank holds `n_heads / TP` whole heads: their Q/K rows and each head's V/O experts and
selectors. Its inputs enter through megatron-core's `copy_to_tensor_model_parallel_region`
(backward: all-reduce of the input gradient) and its partial output leaves through
`reduce_from_tensor_model_parallel_region` (forward: all-reduce), both as `collectives` wraps
them. The selection logits are all-gathered over heads so that every TP rank computes the
regulariser over all heads, exactly as one process would; its gradient for a rank's own heads
is then that rank's slice.

The dense baseline's attention is split the same way (each head's rows of Q, K, V and columns of
O), and its feed-forward Megatron's way: column-parallel up-projection, row-parallel
down-projection, one all-reduce of the output (the hidden units are split as `torch.chunk` splits
them, so d_ff need not divide by the TP size).

The embedding is megatron-core's `VocabParallelEmbedding`. The LM head is a plain column-parallel
linear over this rank's vocabulary rows (megatron-core's `ColumnParallelLinear` allocates on
`torch.cuda.current_device()` and fuses CUDA-only gradient paths, so it cannot run on gloo/CPU),
and the loss is megatron-core's `vocab_parallel_cross_entropy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn

from moeut_dist.config import DenseConfig, MoEUTConfig
from moeut_dist.model.attention import KVCache, SwitchHead
from moeut_dist.model.dense import DenseAttention, FeedForward
from moeut_dist.model.lm_head import LMHead
from moeut_dist.model.moe import at_least_fp32
from moeut_dist.parallel.collectives import (
    copy_to_tensor_region,
    gather_last_dim,
    reduce_from_tensor_region,
)
from moeut_dist.parallel.shards import tensor_shard_range


class TensorParallelSwitchHead(SwitchHead):
    """SwitchHead over this rank's `n_heads / tp_size` heads; the output is the full sum."""

    def __init__(self, config: MoEUTConfig, tp_group) -> None:
        n_heads = config.n_heads // tp_group.size()
        super().__init__(config, n_heads, first_head=tp_group.rank() * n_heads)
        self.tp_group = tp_group

    def forward(
        self,
        q_src: torch.Tensor,
        k_src: torch.Tensor,
        v_src: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache, dict[str, torch.Tensor]]:
        # The sources are usually one or two tensors: each enters (its gradient all-reduced)
        # once. Compared by identity, which torch.compile guards without recompiling per call.
        entered: list[tuple[torch.Tensor, torch.Tensor]] = []

        def enter(x: torch.Tensor) -> torch.Tensor:
            for source, copy in entered:
                if source is x:
                    return copy
            entered.append((x, copy_to_tensor_region(x, self.tp_group)))
            return entered[-1][1]

        partial, new_cache, logits = super().forward(
            enter(q_src), enter(k_src), enter(v_src), key_padding, cache
        )
        out = reduce_from_tensor_region(partial, self.tp_group)
        return out, new_cache, {name: self._all_heads(value) for name, value in logits.items()}

    def _all_heads(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, T, H_local, Ea] → [B, T, H, Ea], heads in rank order."""
        gathered = gather_last_dim(logits.flatten(-2), self.tp_group)
        return gathered.unflatten(-1, (-1, self.n_experts))


class TensorParallelDenseAttention(DenseAttention):
    """Dense attention over this rank's `n_heads / tp_size` heads; the output is the full sum."""

    def __init__(self, config: DenseConfig, tp_group) -> None:
        super().__init__(config, config.n_heads // tp_group.size())
        self.tp_group = tp_group

    def forward(
        self, x: torch.Tensor, key_padding: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[torch.Tensor, KVCache]:
        x = copy_to_tensor_region(x, self.tp_group)
        partial, new_cache = super().forward(x, key_padding, cache)
        return reduce_from_tensor_region(partial, self.tp_group), new_cache


class TensorParallelFeedForward(FeedForward):
    """The feed-forward over this rank's hidden units; the output is the full sum."""

    def __init__(self, config: DenseConfig, tp_group) -> None:
        units = tensor_shard_range(config.d_ff, tp_group.size(), tp_group.rank())
        super().__init__(config, len(units))
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = super().forward(copy_to_tensor_region(x, self.tp_group))
        return reduce_from_tensor_region(partial, self.tp_group)


class VocabParallelLMHead(LMHead):
    """Linear(d, V / TP) over this rank's vocabulary rows; returns vocabulary-sharded logits,
    whose loss is megatron-core's vocabulary-parallel cross-entropy."""

    def __init__(self, d_model: int, vocab_size: int, tp_group) -> None:
        super().__init__(d_model, vocab_size // tp_group.size())
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_region(x, self.tp_group), self.weight, self.bias)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy from vocabulary-sharded logits [B, T, V / TP]."""
        # megatron-core's cross-entropy overwrites fp32 input in place (with exp(logits − max));
        # a caller's fp32 logits are copied first, 16-bit ones are copied by the upcast anyway.
        upcast = at_least_fp32(logits)
        if upcast is logits:
            upcast = logits.clone()
        return vocab_parallel_cross_entropy(upcast, targets).mean()


def make_vocabulary_parallel(model: nn.Module, tp_group) -> None:
    """Replace `model.embedding` with megatron-core's vocabulary-parallel embedding and
    `model.lm_head` with `VocabParallelLMHead` (weights are loaded later)."""
    vocab_size, d_model = model.embedding.weight.shape
    megatron_config = ModelParallelConfig(
        tensor_model_parallel_size=tp_group.size(), use_cpu_initialization=True
    )
    model.embedding = VocabParallelEmbedding(
        vocab_size, d_model, init_method=nn.init.zeros_, config=megatron_config
    )
    model.lm_head = VocabParallelLMHead(d_model, vocab_size, tp_group)
