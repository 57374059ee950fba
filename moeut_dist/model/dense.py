"""The paper's dense baseline: a pre-LN Transformer with RoPE, in the authors' shapes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moeut_dist.config import DenseConfig
from moeut_dist.model.attention import KVCache, attention_mask
from moeut_dist.model.lm_head import LMHead
from moeut_dist.model.moeut import MoEUTOutput
from moeut_dist.model.rope import RotaryEmbedding


class DenseAttention(nn.Module):
    """Causal multi-head attention, d → H·dh → d. Tensor parallelism gives a process `n_heads`
    of the model's heads (their rows of q, k, v and columns of o)."""

    def __init__(self, config: DenseConfig, n_heads: int | None = None) -> None:
        super().__init__()
        self.n_heads = n_heads or config.n_heads
        inner = self.n_heads * config.head_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.rope = RotaryEmbedding(config.rotary_dim, config.rope_base)

    def forward(
        self, x: torch.Tensor, key_padding: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[torch.Tensor, KVCache]:
        batch, time, _ = x.shape
        q, k, v = (
            proj(x).view(batch, time, self.n_heads, -1).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        n_past = 0 if cache is None else cache[0].shape[2]
        q, k = self.rope(q, n_past), self.rope(k, n_past)
        if cache is not None:
            k, v = torch.cat((cache[0], k), 2), torch.cat((cache[1], v), 2)
        mask = attention_mask(time, n_past, key_padding, x.device)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o(heads.transpose(1, 2).flatten(-2)), (k, v)


class FeedForward(nn.Module):
    """down(relu(up(x))), no biases; tensor parallelism gives a process `d_ff` of the units."""

    def __init__(self, config: DenseConfig, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = d_ff or config.d_ff
        self.up = nn.Linear(config.d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)))


class DenseLayer(nn.Module):
    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attention = DenseAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, key_padding: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[torch.Tensor, KVCache]:
        attended, new_cache = self.attention(self.ln1(x), key_padding, cache)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ffn(self.ln2(x))), new_cache


class DenseLM(nn.Module):
    """Same interface as `MoEUTLM`; `reg_loss` is always 0."""

    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DenseLayer(config) for _ in range(config.n_layers))
        self.out_norm = nn.LayerNorm(config.d_model)
        self.lm_head = LMHead(config.d_model, config.vocab_size)
        self.checkpoint_activations = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' pre-LN baseline initialisation: every layer's linear weight is drawn from
        N(0, 2 / (L · fan_in)), so that the residual stream's variance stays of order one through
        the depth; the embedding and the LM head keep PyTorch's defaults."""
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):
                std = math.sqrt(2.0 / (self.config.n_layers * module.in_features))
                nn.init.normal_(module.weight, 0, std)

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        use_cache: bool = False,
    ) -> MoEUTOutput:
        x = self.embedding(tokens)
        new_cache = []
        for index, layer in enumerate(self.layers):
            past = None if cache is None else cache[index]
            if self.checkpoint_activations and torch.is_grad_enabled():
                x, layer_cache = checkpoint(layer, x, attention_mask, past, use_reentrant=False)
            else:
                x, layer_cache = layer(x, attention_mask, past)
            new_cache.append(layer_cache)
        logits = self.lm_head(self.out_norm(x))
        reg_loss = torch.zeros((), device=logits.device)
        return MoEUTOutput(logits, reg_loss, new_cache if use_cache or cache is not None else None)
