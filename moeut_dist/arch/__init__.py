"""One spec per model architecture: everything the stack knows about a model family.

The trainer, the parallel layer, checkpoints and export never name a model class: they look up
the `Architecture` of a config (`of(config)`) or of a name (`get("dense")`) and use its parts:

- `config_class`, `model_class`, `profile`/`profile_names`: what the model is and how to build it;
- `parallelize`: the module replacement that applies tensor and expert parallelism;
- `shard_rule`: how each parameter (by its full-model state-dict name) splits over the layout,
  which sharding, gathering, ZeRO's parameter groups, checkpoints and export all follow;
- `parameters`, `active_parameters`, `forward_macs_per_token`: the model summary and MFU;
- `n_experts`: the σ-MoE experts per layer that expert parallelism partitions (0: none);
- `official_state_dict`: the authors' export names, where the family has them.

A new family (the paper's non-shared σ-MoE baseline, say) is one new module here and one line in
`ARCHITECTURES`. This package stays light (no megatron-core or DeepSpeed at import time), since a
single-process export uses the shard rules.
"""

from __future__ import annotations

from typing import Any

from moeut_dist.arch.dense import DENSE
from moeut_dist.arch.moeut import MOEUT
from moeut_dist.arch.spec import Architecture, ModelSummary, ParallelGroups, ShardRule
from moeut_dist.config import ConfigError, DenseConfig, MoEUTConfig

ARCHITECTURES: dict[str, Architecture] = {spec.name: spec for spec in (MOEUT, DENSE)}
ModelConfig = MoEUTConfig | DenseConfig  # the config of any registered architecture

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ModelConfig",
    "ModelSummary",
    "ParallelGroups",
    "ShardRule",
    "get",
    "of",
    "shard_rule",
]


def get(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown model.arch {name!r}; choose one of {list(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def of(config: Any) -> Architecture:
    """The architecture whose config `config` is."""
    for spec in ARCHITECTURES.values():
        if type(config) is spec.config_class:
            return spec
    raise TypeError(f"{type(config).__name__} is the config of no registered architecture")


def shard_rule(name: str, config: Any) -> ShardRule | None:
    """How the parameter `name` of the model that `config` describes splits over a layout."""
    return of(config).shard_rule(name, config)
