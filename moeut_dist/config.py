"""Model configuration dataclasses.

Every field has the spec's name for it in the comment; `validate()` runs at construction, so an
impossible model is rejected before any weight is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from moeut_dist.dataclass_dict import ConfigError, DictConvertible

__all__ = ["ConfigError", "DenseConfig", "MoEUTConfig"]

KernelBackend = Literal["auto", "torch", "triton"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class MoEUTConfig(DictConvertible):
    vocab_size: int
    d_model: int  # d
    n_layers: int  # L, total depth
    group_size: int  # G, distinct layers; the group repeats L / G times
    n_heads: int  # H
    head_dim: int  # dh
    n_experts: int  # E, σ-MoE experts per layer
    experts_per_token: int  # k
    expert_size: int = 128  # m
    att_n_experts: int = 1  # Ea, SwitchHead V/O experts per head
    att_experts_per_head: int = 2  # ka
    dropout: float = 0.0
    expert_dropout: float = 0.0  # σ-MoE: fraction of experts hidden from each token's choice
    att_expert_dropout: float = 0.0  # the same for SwitchHead's V/O experts (authors' code)
    entropy_reg: float = 0.01  # γ
    att_entropy_reg: float = 0.001  # δ
    rope_base: float = 10000.0
    kernel: KernelBackend = "auto"
    # Each layer compiled with torch.compile (inductor), the expert custom ops inside its graph
    # (the collectives of tensor and expert parallelism between its graphs).
    compile: bool = False

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "group_size",
            "n_heads",
            "head_dim",
            "n_experts",
            "experts_per_token",
            "expert_size",
            "att_n_experts",
        ):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _require(
            self.n_layers % self.group_size == 0,
            f"n_layers ({self.n_layers}) must be a multiple of group_size ({self.group_size})",
        )
        _require(
            self.experts_per_token <= self.n_experts,
            f"experts_per_token ({self.experts_per_token}) exceeds n_experts ({self.n_experts})",
        )
        if self.att_n_experts > 1:
            _require(
                0 < self.att_experts_per_head <= self.att_n_experts,
                f"att_experts_per_head ({self.att_experts_per_head}) must be in "
                f"1..att_n_experts ({self.att_n_experts})",
            )
        for name in ("dropout", "expert_dropout", "att_expert_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1)")
        _require(self.kernel in ("auto", "torch", "triton"), f"unknown kernel {self.kernel!r}")

    @property
    def n_repeats(self) -> int:
        """R = L / G: how many times the group of layers is applied."""
        return self.n_layers // self.group_size

    @property
    def rotary_dim(self) -> int:
        """Channels of each head rotated by RoPE: half the head, rounded down to even."""
        return (self.head_dim // 2) // 2 * 2

    @classmethod
    def from_profile(cls, name: str, **overrides: Any) -> MoEUTConfig:
        from moeut_dist.profiles import get as profile

        return profile(name, **overrides)


@dataclass(frozen=True)
class DenseConfig(DictConvertible):
    """The paper's pre-LN RoPE Transformer baseline, in the authors' published shapes.

    Attention projects d → `n_heads · head_dim` → d, which need not be d (dense-44M: 10 heads of
    width 41 in a model of width 412).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int
    d_ff: int  # feed-forward width: int(d · ff_mult) in the profiles
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _require(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")

    @property
    def rotary_dim(self) -> int:
        """Channels of each head rotated by RoPE: half the head, rounded down to even."""
        return (self.head_dim // 2) // 2 * 2
