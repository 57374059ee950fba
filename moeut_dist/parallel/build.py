"""Build a model under a parallel layout, and move weights between full and sharded form.

The plain single-process model is built first (same seed → same weights on every rank and as in
one process), then its architecture's `parallelize` (`moeut_dist.arch`) replaces modules from
outside, and the full weights are sharded into the new layout by the architecture's shard
rules. `shard_state_dict` and `gather_state_dict` convert between a full (single-process) state
dict and this rank's shards; `read_local_shards` reads this rank's part of a single-process
weights file.
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

from moeut_dist import arch
from moeut_dist.arch import ModelConfig, ParallelGroups
from moeut_dist.parallel.expert_parallel import ExpertPartition
from moeut_dist.parallel.layout import ParallelConfig, expert_group_name
from moeut_dist.parallel.shards import tensor_shard_range


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

    def partition(self, config: ModelConfig) -> ExpertPartition:
        return ExpertPartition(arch.of(config).n_experts(config), self.ep_group.size())

    def tensor_rows(self, size: int) -> range:
        return tensor_shard_range(size, self.tp_group.size(), self.tp_group.rank())


def _local_index(
    name: str, shape: Sequence[int], config: ModelConfig, ranks: _Ranks
) -> tuple[slice, ...]:
    """Where this rank's shard lies in the full tensor `name` of `shape`: TP ranks take
    `torch.chunk`'s pieces, EP ranks their experts; () for a replicated tensor."""
    rule = arch.shard_rule(name, config)
    if rule is None:
        return ()
    if rule.axis == "tensor":
        rows = ranks.tensor_rows(shape[rule.dim])
    else:
        rows = ranks.partition(config).local_range(ranks.ep_group.rank())
    return (slice(None),) * rule.dim + (slice(rows.start, rows.stop),)


def local_index(name: str, shape: Sequence[int], config: ModelConfig) -> tuple[slice, ...]:
    """Where this rank's shard of the full tensor `name` of `shape` lies (() if replicated)."""
    return _local_index(name, shape, config, _Ranks.current())


def shard_state_dict(full: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """This rank's slice of every tensor in a full (single-process) state dict."""
    ranks = _Ranks.current()
    return {
        name: tensor[_local_index(name, tensor.shape, config, ranks)].clone()
        for name, tensor in full.items()
    }


def read_local_shards(path: str | os.PathLike, config: ModelConfig) -> dict[str, torch.Tensor]:
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


def _row_counts(rows: int, group) -> list[int]:
    """Every rank's number of rows (shards split by `torch.chunk` may differ in length)."""
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(group.size())]
    dist.all_gather(counts, torch.tensor([rows]), group=group)
    return [int(count) for count in counts]


@torch.no_grad()
def gather_full(local: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Full tensors from this rank's shards, keyed like a state dict (weights or gradients);
    on every rank, a collective over TP and EP."""
    ranks = _Ranks.current()
    expert_counts = ranks.partition(config).counts()
    full = {}
    for name, tensor in local.items():
        rule = arch.shard_rule(name, config)
        if rule is None:
            full[name] = tensor.clone()
        elif rule.axis == "tensor":
            moved = tensor.movedim(rule.dim, 0)
            counts = _row_counts(moved.shape[0], ranks.tp_group)
            full[name] = _all_gather_uneven(moved, counts, ranks.tp_group).movedim(0, rule.dim)
        else:
            full[name] = _all_gather_uneven(tensor, expert_counts, ranks.ep_group)
    return full


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full single-process state dict of a parallelised model, on every rank."""
    return gather_full(model.state_dict(), model.config)


def _mark_parameters(model: nn.Module, parallel: ParallelConfig) -> None:
    """Attributes DeepSpeed and the gradient-norm code read: TP shards carry
    `tensor_model_parallel`; experts are reduced over their expert-data-parallel group."""
    for name, param in model.named_parameters():
        rule = arch.shard_rule(name, model.config)
        if rule is not None and rule.axis == "tensor" and parallel.tensor > 1:
            param.tensor_model_parallel = True
        if rule is not None and rule.axis == "expert":
            param.allreduce = False
            param.group_name = expert_group_name(parallel)


def parallelize(model: nn.Module, parallel: ParallelConfig) -> nn.Module:
    """Apply `parallel` (groups from `layout.initialize`) to a plain, fully built model."""
    full = model.state_dict()
    dtype = model.embedding.weight.dtype
    ranks = _Ranks.current()
    arch.of(model.config).parallelize(
        model, parallel, ParallelGroups(tensor=ranks.tp_group, expert=ranks.ep_group)
    )
    model.to(dtype)
    model.load_state_dict(shard_state_dict(full, model.config))
    _mark_parameters(model, parallel)
    return model


def build_model(config: ModelConfig, parallel: ParallelConfig, seed: int = 0) -> nn.Module:
    """The model with the weights its architecture's `model_class(config)` gets after
    `torch.manual_seed(seed)`, sharded for this rank. Call after `layout.initialize`."""
    parallel.validate(config, dist.get_world_size())
    torch.manual_seed(seed)
    return parallelize(arch.of(config).model_class(config), parallel)


class ParallelLoss(NamedTuple):
    total: torch.Tensor  # this rank's LM + regularisation loss, to call backward on
    lm: torch.Tensor  # detached, mean over this rank's sequences
    reg: torch.Tensor  # detached, mean over this rank's sequences


def parallel_lm_loss(model: nn.Module, tokens: torch.Tensor) -> ParallelLoss:
    """Next-token loss of `tokens` [B, T + 1] (this data-parallel rank's share of the batch).

    Under any layout `total` is what one process would compute on this rank's sequences; the
    data-parallel mean of the gradients (DeepSpeed) makes it the global batch's. The logged
    parts stay on the device, unreduced (no host sync): `collectives.data_parallel_mean` gives
    the global batch's, once for as many of them as the caller has collected.
    """
    output = model(tokens[:, :-1])
    lm = model.lm_head.loss(output.logits, tokens[:, 1:])
    return ParallelLoss(lm + output.reg_loss, lm.detach().float(), output.reg_loss.detach().float())
