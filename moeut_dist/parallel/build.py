"""Build a MoEUT under a parallel layout, and move weights between full and sharded form.

The plain single-process model is built first (same seed → same weights on every rank and as in
one process), then parallelism is applied from outside: TP modules replace the attention,
embedding and LM head, σ-MoE keeps only its local experts and gets the expert-parallel
dispatcher, and the full weights are sharded into the new layout. `shard_state_dict` and
`gather_state_dict` convert between a full (single-process) state dict and this rank's shards;
`read_local_shards` reads this rank's part of a single-process weights file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open
from torch import nn

from moeut_dist.config import MoEUTConfig
from moeut_dist.model import MoEUTLM, lm_loss
from moeut_dist.parallel.expert_parallel import ExpertParallelDispatcher, ExpertPartition
from moeut_dist.parallel.layout import ParallelConfig, expert_group_name
from moeut_dist.parallel.shards import shard_rule
from moeut_dist.parallel.tensor_parallel import (
    TensorParallelSwitchHead,
    VocabParallelLMHead,
    vocab_parallel_embedding,
    vocab_parallel_lm_loss,
)


@dataclass(frozen=True)
class _Ranks:
    """This process's place in the megatron-core groups."""

    tp_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup

    @classmethod
    def current(cls) -> _Ranks:
        return cls(
            parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_expert_model_parallel_group(),
        )

    def partition(self, config: MoEUTConfig) -> ExpertPartition:
        return ExpertPartition(config.n_experts, self.ep_group.size())


def _local_index(
    name: str, shape: Sequence[int], config: MoEUTConfig, ranks: _Ranks
) -> tuple[slice, ...]:
    """Where this rank's shard lies in the full tensor `name` of `shape`: TP ranks take
    `torch.chunk`'s pieces, EP ranks their experts; () for a replicated tensor."""
    rule = shard_rule(name, config)
    if rule is None:
        return ()
    if rule.axis == "tensor":
        size, rank = shape[rule.dim], ranks.tp_group.rank()
        chunk = -(-size // ranks.tp_group.size())
        rows = slice(rank * chunk, min(size, (rank + 1) * chunk))
    else:
        experts = ranks.partition(config).local_range(ranks.ep_group.rank())
        rows = slice(experts.start, experts.stop)
    return (slice(None),) * rule.dim + (rows,)


def shard_state_dict(full: dict[str, torch.Tensor], config: MoEUTConfig) -> dict[str, torch.Tensor]:
    """This rank's slice of every tensor in a full (single-process) state dict."""
    ranks = _Ranks.current()
    return {
        name: tensor[_local_index(name, tensor.shape, config, ranks)].clone()
        for name, tensor in full.items()
    }


def read_local_shards(path: str | os.PathLike, config: MoEUTConfig) -> dict[str, torch.Tensor]:
    """`shard_state_dict` of the full tensors in the safetensors file `path`, reading only this
    rank's slices from disk."""
    ranks = _Ranks.current()
    with safe_open(path, framework="pt") as file:
        local = {}
        for name in file.keys():  # noqa: SIM118 -- safe_open is not iterable
            full = file.get_slice(name)
            index = _local_index(name, full.get_shape(), config, ranks)
            local[name] = full[index] if index else file.get_tensor(name)
        return local


def _all_gather_uneven(tensor: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Concatenate along dim 0 shards of `counts[r]` rows from every rank of `group`."""
    padded = tensor.new_zeros(max(counts), *tensor.shape[1:])
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    return torch.cat([shard[:count] for shard, count in zip(gathered, counts, strict=True)])


@torch.no_grad()
def gather_full(local: dict[str, torch.Tensor], config: MoEUTConfig) -> dict[str, torch.Tensor]:
    """Full tensors from this rank's shards, keyed like a state dict (weights or gradients);
    on every rank, a collective over TP and EP."""
    ranks = _Ranks.current()
    expert_counts = ranks.partition(config).counts()
    full = {}
    for name, tensor in local.items():
        rule = shard_rule(name, config)
        if rule is None:
            full[name] = tensor.clone()
        elif rule.axis == "tensor":
            moved = tensor.movedim(rule.dim, 0)
            counts = [moved.shape[0]] * ranks.tp_group.size()
            full[name] = _all_gather_uneven(moved, counts, ranks.tp_group).movedim(0, rule.dim)
        else:
            full[name] = _all_gather_uneven(tensor, expert_counts, ranks.ep_group)
    return full


def gather_state_dict(model: MoEUTLM) -> dict[str, torch.Tensor]:
    """The full single-process state dict of a parallelised model, on every rank."""
    return gather_full(model.state_dict(), model.config)


def _apply_tensor_parallel(model: MoEUTLM, tp_group) -> None:
    config = model.config
    model.embedding = vocab_parallel_embedding(config, tp_group.size())
    model.lm_head = VocabParallelLMHead(config.d_model, config.vocab_size, tp_group)
    for layer in model.transformer.layers:
        layer.attention = TensorParallelSwitchHead(config, tp_group)


def _apply_expert_parallel(model: MoEUTLM, ranks: _Ranks) -> None:
    config = model.config
    partition = ranks.partition(config)
    n_local = partition.counts()[ranks.ep_group.rank()]
    for layer in model.transformer.layers:
        ffn = layer.ffn
        ffn.keys = nn.Parameter(ffn.keys.new_empty(n_local, *ffn.keys.shape[1:]))
        ffn.values = nn.Parameter(ffn.values.new_empty(n_local, *ffn.values.shape[1:]))
        ffn.dispatcher = ExpertParallelDispatcher(
            partition, ranks.ep_group, ranks.tp_group, config.kernel
        )


def _mark_parameters(model: MoEUTLM, parallel: ParallelConfig) -> None:
    """Attributes DeepSpeed and the gradient-norm code read: TP shards carry
    `tensor_model_parallel`; experts are reduced over their expert-data-parallel group."""
    for name, param in model.named_parameters():
        rule = shard_rule(name, model.config)
        if rule is not None and rule.axis == "tensor" and parallel.tensor > 1:
            param.tensor_model_parallel = True
        if rule is not None and rule.axis == "expert":
            param.allreduce = False
            param.group_name = expert_group_name(parallel)


def parallelize(model: MoEUTLM, parallel: ParallelConfig) -> MoEUTLM:
    """Apply `parallel` (groups from `layout.initialize`) to a plain, fully built model."""
    full = model.state_dict()
    dtype = model.embedding.weight.dtype
    ranks = _Ranks.current()
    if parallel.tensor > 1:
        _apply_tensor_parallel(model, ranks.tp_group)
    if parallel.tensor > 1 or parallel.expert > 1:
        _apply_expert_parallel(model, ranks)
    model.to(dtype)
    model.load_state_dict(shard_state_dict(full, model.config))
    _mark_parameters(model, parallel)
    model.transformer.checkpoint_activations = parallel.checkpoint_activations
    return model


def build_model(config: MoEUTConfig, parallel: ParallelConfig, seed: int = 0) -> MoEUTLM:
    """The model with the weights `MoEUTLM(config)` gets after `torch.manual_seed(seed)`,
    sharded for this rank. Call after `layout.initialize(parallel, config)`."""
    parallel.validate(config, dist.get_world_size())
    torch.manual_seed(seed)
    return parallelize(MoEUTLM(config), parallel)


class ParallelLoss(NamedTuple):
    total: torch.Tensor  # this rank's LM + regularisation loss, to call backward on
    lm: torch.Tensor  # detached, mean over this rank's sequences
    reg: torch.Tensor  # detached, mean over this rank's sequences


def parallel_lm_loss(model: MoEUTLM, tokens: torch.Tensor) -> ParallelLoss:
    """Next-token loss of `tokens` [B, T + 1] (this data-parallel rank's share of the batch).

    Under any layout `total` is what one process would compute on this rank's sequences; the
    data-parallel mean of the gradients (DeepSpeed) makes it the global batch's. The logged
    parts stay on the device, unreduced (no host sync): `collectives.data_parallel_mean` gives
    the global batch's, once for as many of them as the caller has collected.
    """
    output = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    if isinstance(model.lm_head, VocabParallelLMHead):
        lm = vocab_parallel_lm_loss(output.logits, targets)
    else:
        lm = lm_loss(output.logits, targets)
    return ParallelLoss(lm + output.reg_loss, lm.detach().float(), output.reg_loss.detach().float())
