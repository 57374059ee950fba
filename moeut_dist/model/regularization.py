"""Entropy regularisation of expert selection (the spec's "Entropy regularisation").

For each sequence the selection distribution (softmax of the logits) is averaged over positions
and over the repeats of a layer, in log space; the loss is the negative entropy of that mean, so
it rewards spreading the *average* selection. Each layer application contributes a running
`logsumexp` over its positions, which keeps memory at [B, E] per application instead of stacking
[B, T, E] logits across depth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def summed_selection_probs(logits: torch.Tensor) -> torch.Tensor:
    """log Σ_t softmax(logits[:, t]) for logits [B, T, ..., E]: shape [B, ..., E]."""
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1)


def negative_mean_entropy(summed: list[torch.Tensor], n_positions: int) -> torch.Tensor:
    """−H of the mean selection distribution, averaged over the batch (and heads).

    `summed` holds `summed_selection_probs` of each application of one layer; `n_positions` is
    the sequence length, so the mean runs over positions × repeats.
    """
    log_mean = torch.logsumexp(torch.stack(summed), dim=0) - math.log(n_positions * len(summed))
    entropy = -(log_mean.exp() * log_mean).sum(-1)
    return -entropy.mean()
