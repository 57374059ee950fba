"""The parts of an architecture spec (see `moeut_dist.arch`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from moeut_dist.parallel.layout import ParallelConfig


@dataclass(frozen=True)
class ShardRule:
    axis: Literal["tensor", "expert"]  # split over the TP group, or over the EP group
    dim: int


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups `Architecture.parallelize` splits a model over."""

    tensor: Any  # torch.distributed.ProcessGroup
    expert: Any


@dataclass(frozen=True)
class ModelSummary:
    """What one training start reports about its model."""

    arch: str
    parameters: int
    active_parameters: int  # per token; a shared layer counts once, as in `parameters`
    forward_flops_per_token: float  # 2 × the paper's MACs per token, at the run's seq_len

    @property
    def training_flops_per_token(self) -> float:
        """Forward and backward (a backward costs two forwards); recomputation not counted."""
        return 3 * self.forward_flops_per_token

    def describe(self) -> str:
        return (
            f"{self.arch}: {self.parameters / 1e6:.2f}M parameters, "
            f"{self.active_parameters / 1e6:.2f}M active per token, "
            f"{self.forward_flops_per_token / 1e6:.2f} MFLOPs per token forward "
            f"({self.forward_flops_per_token / 2e6:.2f}M MACs)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "parameters": self.parameters,
            "active_parameters": self.active_parameters,
            "forward_flops_per_token": self.forward_flops_per_token,
        }


@dataclass(frozen=True)
class Architecture:
    name: str
    config_class: type
    model_class: Callable[[Any], nn.Module]
    profile: Callable[..., Any]  # profile(name, **overrides) -> config
    profile_names: Callable[[], list[str]]
    # Replace modules of a plain, fully built model for this rank's part of the layout.
    parallelize: Callable[[nn.Module, ParallelConfig, ParallelGroups], None]
    # How the parameter `name` (a full-model state-dict key) splits; None: replicated.
    shard_rule: Callable[[str, Any], ShardRule | None]
    parameters: Callable[[Any], int]
    active_parameters: Callable[[Any], int]
    forward_macs_per_token: Callable[[Any, int], float]
    n_experts: Callable[[Any], int]
    official_state_dict: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None

    def summary(self, config: Any, seq_len: int) -> ModelSummary:
        return ModelSummary(
            self.name,
            self.parameters(config),
            self.active_parameters(config),
            2 * self.forward_macs_per_token(config, seq_len),
        )
