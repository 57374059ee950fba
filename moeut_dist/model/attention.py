"""SwitchHead attention: per-head mixtures of value and output projection experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeut_dist.config import MoEUTConfig
from moeut_dist.kernels import moe_linear
from moeut_dist.model.moe import linear_in_fp32, top_k_sigmoid_gates
from moeut_dist.model.rope import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys, values: [B, H, T_past, dh], RoPE applied


def attention_mask(
    n_queries: int, n_past: int, key_padding: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B|1, 1, Tq, Tk] mask (True = attend), or None for the plain causal case.

    `key_padding` is [B, n_past + n_queries], True/1 for real tokens. Each position may always
    attend to itself, so that a padded query row is never empty (softmax would give NaN).
    """
    if key_padding is None and n_past == 0:
        return None
    query_pos = torch.arange(n_past, n_past + n_queries, device=device)[:, None]
    key_pos = torch.arange(n_past + n_queries, device=device)[None, :]
    allowed = key_pos <= query_pos
    if key_padding is None:
        return allowed[None, None]
    return (allowed & key_padding[:, None, None, :].bool()) | (key_pos == query_pos)


def _head_pairs(
    experts: torch.Tensor, n_experts_per_head: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair form of a per-head selection `experts` [N, H, ka] (indices within each head).

    Returns the global expert slot (h·Ea + j), the token row n and the token-head row n·H + h
    of every pair.
    """
    n_tokens, n_heads, _ = experts.shape
    device = experts.device
    head = torch.arange(n_heads, device=device)[None, :, None]
    token = torch.arange(n_tokens, device=device)[:, None, None]
    slots = head * n_experts_per_head + experts
    token_rows = token.expand_as(experts)
    token_head_rows = token * n_heads + head.expand_as(experts)
    return slots.flatten(), token_rows.flatten(), token_head_rows.flatten()


class SwitchHead(nn.Module):
    """Multi-head attention whose V and O projections are sigmoid-gated mixtures of experts.

    Tensor parallelism gives a process the `n_heads` heads from `first_head` on; each head's
    experts and selectors live with the head.
    """

    def __init__(
        self, config: MoEUTConfig, n_heads: int | None = None, first_head: int = 0
    ) -> None:
        super().__init__()
        d, dh = config.d_model, config.head_dim
        self.n_heads = n_heads or config.n_heads
        self.first_head = first_head
        self.n_heads_total = config.n_heads
        self.head_dim = dh
        self.n_experts = config.att_n_experts
        self.experts_per_head = config.att_experts_per_head
        self.expert_dropout = config.att_expert_dropout
        self.backend = config.kernel
        inner = self.n_heads * dh
        self.q = nn.Linear(d, inner, bias=False)
        self.k = nn.Linear(d, inner, bias=False)
        if self.n_experts > 1:
            n_slots = self.n_heads * self.n_experts
            self.v = nn.Parameter(torch.empty(n_slots, d, dh))
            self.o = nn.Parameter(torch.empty(n_slots, dh, d))
            self.sel_v = nn.Parameter(torch.empty(n_slots, d))
        else:  # Linear weights: v [H·dh, d], o [d, H·dh]
            self.v = nn.Parameter(torch.empty(inner, d))
            self.o = nn.Parameter(torch.empty(d, inner))
        self.sel_o = nn.Parameter(torch.empty(self.n_heads * self.n_experts, d))
        self.rope = RotaryEmbedding(config.rotary_dim, config.rope_base)

    def reset_parameters(self, std_scale: float) -> None:
        d = self.q.in_features
        inner_total = self.n_heads_total * self.head_dim  # o's fan-in in the whole model
        for selector in (getattr(self, "sel_v", None), self.sel_o):
            if selector is not None:
                nn.init.normal_(selector, 0, std_scale / math.sqrt(d))
                self._renormalize_selector_rows(selector)
        for weight in (self.q.weight, self.k.weight, self.v):
            nn.init.normal_(weight, 0, std_scale / math.sqrt(d))
        nn.init.normal_(self.o, 0, std_scale / math.sqrt(inner_total))

    @staticmethod
    def _renormalize_selector_rows(weight: torch.Tensor) -> None:
        """Unit-norm rows, each scaled by its own pre-normalisation std over the overall std."""
        with torch.no_grad():
            row_std = weight.std(dim=-1, keepdim=True)
            weight.div_(weight.norm(dim=-1, keepdim=True))
            weight.mul_(row_std / weight.std())

    def _select(
        self, src: torch.Tensor, selector: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [B, T, H, Ea] (≥ fp32) and the top-ka gates/indices of each head."""
        logits = linear_in_fp32(src, selector)
        logits = logits.unflatten(-1, (self.n_heads, self.n_experts))
        dropped = None
        if self.training and self.expert_dropout > 0:
            # Drawn for every head of the model and then sliced: the masks of one process, for
            # whichever heads tensor parallelism gives this one.
            every_head = torch.rand(
                *logits.shape[:-2], self.n_heads_total, self.n_experts, device=logits.device
            )
            heads = slice(self.first_head, self.first_head + self.n_heads)
            dropped = every_head[..., heads, :] < self.expert_dropout
        gates, experts = top_k_sigmoid_gates(logits, self.experts_per_head, dropped)
        return logits, gates, experts

    def _project_values(
        self, v_src: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Σ_j gv_j · v_src @ v[h, j] for every head: [B, T, H, dh]."""
        batch, time, d = v_src.shape
        flat_experts = experts.reshape(batch * time, self.n_heads, -1)
        slots, token_rows, token_head_rows = _head_pairs(flat_experts, self.n_experts)
        out = moe_linear(
            v_src.reshape(-1, d),
            self.v,
            gates.flatten(),
            slots,
            token_rows,
            token_head_rows,
            batch * time * self.n_heads,
            backend=self.backend,
        )
        return out.view(batch, time, self.n_heads, self.head_dim)

    def _project_output(
        self, heads: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Σ_h Σ_j go_j · heads[h] @ o[h, j]: [B, T, d]."""
        batch, time = heads.shape[:2]
        flat_experts = experts.reshape(batch * time, self.n_heads, -1)
        slots, token_rows, token_head_rows = _head_pairs(flat_experts, self.n_experts)
        out = moe_linear(
            heads.reshape(-1, self.head_dim),
            self.o,
            gates.flatten(),
            slots,
            token_head_rows,
            token_rows,
            batch * time,
            backend=self.backend,
        )
        return out.view(batch, time, -1)

    def forward(
        self,
        q_src: torch.Tensor,
        k_src: torch.Tensor,
        v_src: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache, dict[str, torch.Tensor]]:
        """Returns the output [B, T, d], the updated KV cache and the selection logits."""
        batch, time, _ = q_src.shape
        scale = self.head_dim**-0.25  # on both q and k: scores carry 1/sqrt(dh)
        q = (self.q(q_src) * scale).view(batch, time, self.n_heads, -1).transpose(1, 2)
        k = (self.k(k_src) * scale).view(batch, time, self.n_heads, -1).transpose(1, 2)
        n_past = 0 if cache is None else cache[0].shape[2]
        q, k = self.rope(q, n_past), self.rope(k, n_past)

        selection_logits: dict[str, torch.Tensor] = {}
        if self.n_experts > 1:
            v_logits, v_gates, v_experts = self._select(k_src, self.sel_v)
            o_logits, o_gates, o_experts = self._select(q_src, self.sel_o)
            selection_logits = {"att_v": v_logits, "att_o": o_logits}
            v = self._project_values(v_src, v_gates, v_experts).transpose(1, 2)
        else:
            v = F.linear(v_src, self.v).view(batch, time, self.n_heads, -1).transpose(1, 2)

        if cache is not None:
            k = torch.cat((cache[0], k), dim=2)
            v = torch.cat((cache[1], v), dim=2)
        mask = attention_mask(time, n_past, key_padding, q.device)
        heads = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0
        ).transpose(1, 2)  # [B, T, H, dh]

        if self.n_experts > 1:
            out = self._project_output(heads, o_gates, o_experts)
        else:
            heads = heads * torch.sigmoid(F.linear(q_src, self.sel_o))[..., None]
            out = F.linear(heads.flatten(-2), self.o)
        return out, (k, v), selection_logits
