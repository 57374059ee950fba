"""The LM head and its loss: whoever holds the logits' layout computes the cross-entropy.

A model's LM head returns logits and knows how to turn them into the next-token loss; the
vocabulary-parallel head (`moeut_dist.parallel.tensor_parallel`) returns a vocabulary shard and
overrides `loss` with the cross-entropy over shards. Training code calls `model.lm_head.loss`
and never asks which head it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeut_dist.model.moe import at_least_fp32


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(at_least_fp32(logits.flatten(0, 1)), targets.flatten())


class LMHead(nn.Linear):
    """Linear(d, V) with a bias; `loss` is the cross-entropy of the logits it returned."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets)
