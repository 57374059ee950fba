"""The MoEUT language model: a group of G layers applied R = L/G times, peri-layernorm."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moeut_dist.config import MoEUTConfig
from moeut_dist.model.attention import KVCache, SwitchHead
from moeut_dist.model.lm_head import LMHead
from moeut_dist.model.moe import SigmaMoE
from moeut_dist.model.regularization import negative_mean_entropy, summed_selection_probs


@dataclass
class MoEUTOutput:
    logits: torch.Tensor  # [B, T, V]
    reg_loss: torch.Tensor  # scalar; 0 in eval
    cache: list[KVCache] | None  # one entry per layer application (L of them)


class MoEUTLayer(nn.Module):
    """x += Dropout(SwitchHead(LN1(x), LN1(x), x)); x += σ-MoE(x, select_in=LN2(x)).

    Only the inputs of projections that feed a sigmoid or softmax are normalised; the residual
    path, the values and the expert inputs stay un-normalised.
    """

    def __init__(self, config: MoEUTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.attention = SwitchHead(config)
        self.ffn = SigmaMoE(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, key_padding: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[torch.Tensor, KVCache, dict[str, torch.Tensor]]:
        """Returns x, the layer's KV cache and, per selector, log Σ_t softmax(logits)."""
        normed = self.ln1(x)
        attended, new_cache, logits = self.attention(normed, normed, x, key_padding, cache)
        x = x + self.dropout(attended)
        update, logits["ffn"] = self.ffn(x, self.ln2(x))
        # The regulariser's statistics are only needed (and only paid for) in training.
        stats = (
            {name: summed_selection_probs(value) for name, value in logits.items()}
            if self.training
            else {}
        )
        return x + update, new_cache, stats


class MoEUT(nn.Module):
    """The shared-layer stack: `layers` (G of them) applied in order, `n_repeats` times."""

    def __init__(self, config: MoEUTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MoEUTLayer(config) for _ in range(config.group_size))
        self.n_repeats = config.n_repeats
        self.checkpoint_activations = False
        if config.compile:
            for layer in self.layers:
                layer.compile()

    def forward(
        self,
        x: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> tuple[torch.Tensor, list[KVCache], list[dict[str, list[torch.Tensor]]]]:
        """Returns x, the per-application KV caches and, per group layer, selection statistics
        of every repeat (see `MoEUTLayer.forward`)."""
        new_cache: list[KVCache] = []
        stats: list[dict[str, list[torch.Tensor]]] = [{} for _ in self.layers]
        for repeat in range(self.n_repeats):
            for index, layer in enumerate(self.layers):
                past = None if cache is None else cache[repeat * len(self.layers) + index]
                if self.checkpoint_activations and torch.is_grad_enabled():
                    # RNG state is restored on recompute, so expert dropout re-routes identically.
                    x, layer_cache, layer_stats = checkpoint(
                        layer, x, key_padding, past, use_reentrant=False
                    )
                else:
                    x, layer_cache, layer_stats = layer(x, key_padding, past)
                new_cache.append(layer_cache)
                for name, value in layer_stats.items():
                    stats[index].setdefault(name, []).append(value)
        return x, new_cache, stats


class MoEUTLM(nn.Module):
    """tokens → Embedding → R × (group) → LayerNorm → Linear(d, V)."""

    def __init__(self, config: MoEUTConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.transformer = MoEUT(config)
        self.out_norm = nn.LayerNorm(config.d_model)
        self.lm_head = LMHead(config.d_model, config.vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The spec's initialisation; the LM head keeps PyTorch's default Linear init."""
        std_scale = math.sqrt(2.0 / self.config.n_layers)
        nn.init.normal_(self.embedding.weight, 0, 1 / math.sqrt(self.config.d_model))
        for layer in self.transformer.layers:
            layer.attention.reset_parameters(std_scale)
            layer.ffn.reset_parameters(std_scale)

    def regularization_loss(
        self, stats: list[dict[str, list[torch.Tensor]]], n_positions: int
    ) -> torch.Tensor:
        """γ·Σ_layers −H(σ-MoE selection) + δ·Σ_layers (−H(V selection) − H(O selection))."""
        coefficients = {
            "ffn": self.config.entropy_reg,
            "att_v": self.config.att_entropy_reg,
            "att_o": self.config.att_entropy_reg,
        }
        loss = torch.zeros((), device=self.lm_head.weight.device)
        for layer_stats in stats:
            for name, summed in layer_stats.items():
                loss = loss + coefficients[name] * negative_mean_entropy(summed, n_positions)
        return loss

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        use_cache: bool = False,
    ) -> MoEUTOutput:
        """tokens [B, T]; attention_mask [B, T_past + T], 1 for real tokens; `cache` from a
        previous call with `use_cache=True` continues decoding after it."""
        x = self.embedding(tokens)
        x, new_cache, stats = self.transformer(x, attention_mask, cache)
        logits = self.lm_head(self.out_norm(x))
        if self.training:
            reg_loss = self.regularization_loss(stats, tokens.shape[1])
        else:
            reg_loss = torch.zeros((), device=logits.device)
        return MoEUTOutput(logits, reg_loss, new_cache if use_cache or cache is not None else None)


def perplexity(mean_nll: float) -> float:
    """exp of a mean NLL in nats; inf where that would overflow (a diverged model)."""
    return math.inf if mean_nll > 700 else math.exp(mean_nll)
