"""The transformers model of a MoEUT: `moeut_dist.model.MoEUTLM` behind `PreTrainedModel` and
`GenerationMixin`. Exported directories carry this file (see `packaging`).

The KV cache is transformers' `Cache` (a `DynamicCache` from `generate()`): one cache layer per
layer application (L of them; the G shared layers are applied L/G times, each application with
keys and values of its own), holding keys and values as our attention keeps them, [B, H, T, dh]
with RoPE applied. `attention_mask` covers the past and the new tokens, so left-padded batches
work: RoPE depends only on the distance between positions, so shifting a row's positions by its
padding changes nothing but rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from moeut_dist.hf.configuration_moeut import MoEUTHFConfig
from moeut_dist.model import MoEUTLM


class MoEUTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoEUTHFConfig
    base_model_prefix = "model"
    _supports_sdpa = True

    def __init__(self, config: MoEUTHFConfig) -> None:
        super().__init__(config)
        self.model = MoEUTLM(config.to_moeut())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """`MoEUTLM` initialises itself (the spec's scheme); transformers' generic one would not
        be the model's."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embedding

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """`labels` [B, T] are the inputs (shifted here), -100 where no loss is wanted."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = None
        if cache is not None and cache.get_seq_length() > 0:
            past = [(layer.keys, layer.values) for layer in cache.layers]
        out = self.model(input_ids, attention_mask, past, use_cache=cache is not None)
        if cache is not None:
            new_tokens = input_ids.shape[1]
            for index, (keys, values) in enumerate(out.cache):
                cache.update(keys[:, :, -new_tokens:], values[:, :, -new_tokens:], index)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].flatten(0, 1).float()
            loss = F.cross_entropy(logits, labels[:, 1:].flatten().to(logits.device))
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, cache=cache)
