"""σ-MoE feed-forward: sigmoid-gated top-k selection over many small ReLU experts."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from moeut_dist.config import MoEUTConfig
from moeut_dist.kernels import Backend, moe_mlp


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32, or fp64 if it is already: for the sigmoid, top-k and losses."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def linear_in_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ computed in (at least) fp32, whatever the model's dtype or autocast say: the
    spec's SwitchHead selection, where bf16 logits would make top-k ties common."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return nn.functional.linear(x.to(dtype), weight.to(dtype))


def top_k_sigmoid_gates(
    logits: torch.Tensor, k: int, dropped: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates and indices of the k largest sigmoid(logits) along the last dim.

    The gates are not renormalised. Expert dropout hides the experts `dropped` marks (a boolean
    mask shaped like `logits`) from the choice; the gates of the chosen ones are unaffected.
    """
    probs = torch.sigmoid(logits)
    with torch.no_grad():
        candidates = probs if dropped is None else probs.masked_fill(dropped, float("-inf"))
        indices = candidates.topk(k, dim=-1, sorted=False).indices
    return probs.gather(-1, indices), indices


class ExpertDispatcher(Protocol):
    """Computes Σ_j gates[n, j] · expert_{experts[n, j]}(x[n]) for every token n.

    The local implementation runs every expert in this process; the expert-parallel one
    (`moeut_dist.parallel`) sends tokens to the ranks that own their experts.
    """

    def __call__(
        self,
        x: torch.Tensor,
        gates: torch.Tensor,
        experts: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor: ...


class LocalDispatcher:
    def __init__(self, backend: Backend = "auto") -> None:
        self.backend = backend

    def __call__(
        self,
        x: torch.Tensor,
        gates: torch.Tensor,
        experts: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        n_tokens, k = experts.shape
        rows = torch.arange(n_tokens, device=x.device).repeat_interleave(k)
        return moe_mlp(
            x, keys, values, gates.flatten(), experts.flatten(), rows, backend=self.backend
        )


class SigmaMoE(nn.Module):
    """y = Σ_{e ∈ topk(σ(s))} σ(s)_e · relu(x @ keys[e]) @ values[e], s = select_in @ expert_selᵀ.

    `keys`/`values` hold the experts this process owns (all of them unless expert parallelism
    partitions them); `expert_sel` always scores every expert. After `count_expert_usage()`,
    `expert_usage` counts how often each expert is selected in training forwards (all repeats of
    the layer; a forward recomputed for activation checkpointing counts again, which leaves the
    shares unchanged); without it the layer counts nothing.
    """

    def __init__(self, config: MoEUTConfig) -> None:
        super().__init__()
        d, n_experts, m = config.d_model, config.n_experts, config.expert_size
        self.k = config.experts_per_token
        self.expert_dropout = config.expert_dropout
        self.keys = nn.Parameter(torch.empty(n_experts, d, m))
        self.values = nn.Parameter(torch.empty(n_experts, m, d))
        self.expert_sel = nn.Parameter(torch.empty(n_experts, d))
        self.dispatcher: ExpertDispatcher = LocalDispatcher(config.kernel)
        self.expert_usage: torch.Tensor | None = None

    def count_expert_usage(self) -> None:
        """Start counting selections per expert into `expert_usage` (zero it to restart), on the
        device the layer is on now."""
        self.expert_usage = torch.zeros(
            self.expert_sel.shape[0], dtype=torch.float64, device=self.expert_sel.device
        )

    def reset_parameters(self, std_scale: float) -> None:
        d = self.expert_sel.shape[1]
        n_experts, m = self.expert_sel.shape[0], self.keys.shape[2]
        nn.init.normal_(self.expert_sel, 0, std_scale / math.sqrt(d))
        with torch.no_grad():  # unit-norm rows, rescaled to keep the tensor's overall std
            std = self.expert_sel.std()
            self.expert_sel.div_(self.expert_sel.norm(dim=-1, keepdim=True))
            self.expert_sel.mul_(std / self.expert_sel.std())
        nn.init.normal_(self.keys, 0, std_scale / math.sqrt(d))
        nn.init.normal_(self.values, 0, std_scale / math.sqrt(n_experts * m))

    def forward(
        self, expert_in: torch.Tensor, select_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output [B, T, d] and the selection logits [B, T, E] (≥ fp32)."""
        # The product runs in the model's dtype, as in the authors' code (in bf16, ties at the
        # top-k boundary occur and topk breaks them deterministically); an fp32 product with
        # E outputs would cost about a tenth of the experts' FLOPs at fp32 speed.
        logits = at_least_fp32(nn.functional.linear(select_in, self.expert_sel))
        dropped = None
        if self.training and self.expert_dropout > 0:
            dropped = torch.rand_like(logits) < self.expert_dropout
        gates, experts = top_k_sigmoid_gates(logits, self.k, dropped)
        if self.training and self.expert_usage is not None:
            flat = experts.flatten()
            # index_add_, unlike bincount, needs no host sync to size its output.
            self.expert_usage.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        d = expert_in.shape[-1]
        out = self.dispatcher(
            expert_in.reshape(-1, d),
            gates.reshape(-1, self.k),
            experts.reshape(-1, self.k),
            self.keys,
            self.values,
        )
        return out.view_as(expert_in), logits
