"""Tensor parallelism with megatron-core: SwitchHead split by heads, vocabulary-parallel ends.

A TP rank holds `n_heads / TP` whole heads: their Q/K rows and each head's V/O experts and
selectors. Its inputs enter through `copy_to_tensor_model_parallel_region` (backward: all-reduce
of the input gradient) and its partial output leaves through
`reduce_from_tensor_model_parallel_region` (forward: all-reduce). The selection logits are
all-gathered over heads so that every TP rank computes the regulariser over all heads, exactly as
one process would; its gradient for a rank's own heads is then that rank's slice.

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
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch import nn

from moeut_dist.config import MoEUTConfig
from moeut_dist.model.attention import KVCache, SwitchHead
from moeut_dist.model.moe import at_least_fp32
from moeut_dist.parallel.collectives import gather_last_dim


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
        copied = {}  # q_src and k_src are usually one tensor: all-reduce its gradient once

        def enter(x: torch.Tensor) -> torch.Tensor:
            if id(x) not in copied:
                copied[id(x)] = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
            return copied[id(x)]

        partial, new_cache, logits = super().forward(
            enter(q_src), enter(k_src), enter(v_src), key_padding, cache
        )
        out = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        return out, new_cache, {name: self._all_heads(value) for name, value in logits.items()}

    def _all_heads(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, T, H_local, Ea] → [B, T, H, Ea], heads in rank order."""
        gathered = gather_last_dim(logits.flatten(-2), self.tp_group)
        return gathered.unflatten(-1, (-1, self.n_experts))


class VocabParallelLMHead(nn.Linear):
    """Linear(d, V / TP) over this rank's vocabulary rows; returns vocabulary-sharded logits."""

    def __init__(self, d_model: int, vocab_size: int, tp_group) -> None:
        super().__init__(d_model, vocab_size // tp_group.size())
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            copy_to_tensor_model_parallel_region(x, group=self.tp_group), self.weight, self.bias
        )


def vocab_parallel_embedding(config: MoEUTConfig, tp_size: int) -> VocabParallelEmbedding:
    """megatron-core's embedding over this rank's vocabulary rows (weights are loaded later)."""
    megatron_config = ModelParallelConfig(
        tensor_model_parallel_size=tp_size, use_cpu_initialization=True
    )
    return VocabParallelEmbedding(
        config.vocab_size, config.d_model, init_method=nn.init.zeros_, config=megatron_config
    )


def vocab_parallel_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from vocabulary-sharded logits [B, T, V / TP]."""
    # megatron-core's cross-entropy overwrites fp32 input in place (with exp(logits − max)); a
    # caller's fp32 logits are copied first, 16-bit ones are copied by the upcast anyway.
    upcast = at_least_fp32(logits)
    if upcast is logits:
        upcast = logits.clone()
    return vocab_parallel_cross_entropy(upcast, targets).mean()
