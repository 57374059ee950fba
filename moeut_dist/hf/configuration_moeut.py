"""The transformers config of a MoEUT: our `MoEUTConfig`'s fields, flat, under `model_type`
"moeut". Exported directories carry this file (see `packaging`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedConfig

from moeut_dist.config import MoEUTConfig

MODEL_TYPE = "moeut"


class MoEUTHFConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    tie_word_embeddings: bool = False  # the LM head has weights of its own
    use_cache: bool = True

    @classmethod
    def from_moeut(cls, config: MoEUTConfig, **kwargs: Any) -> MoEUTHFConfig:
        return cls(**config.to_dict(), **kwargs)

    def to_moeut(self) -> MoEUTConfig:
        """Our config; an unknown or missing field is refused by `MoEUTConfig`."""
        names = [field.name for field in dataclasses.fields(MoEUTConfig)]
        return MoEUTConfig.from_dict(
            {name: getattr(self, name) for name in names if hasattr(self, name)}
        )

    @property
    def num_hidden_layers(self) -> int:
        """Layer applications, each with its own KV cache: L, not the G distinct layers."""
        return self.n_layers
