"""Autoregressive sampling with the KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

# The seeds `torch.Generator.manual_seed` takes as they are (it wraps negative ones around).
_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # nucleus mass kept; 1 keeps every token
    seed: int | None = None

    def __post_init__(self) -> None:
        for valid, problem in (
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (
                math.isfinite(self.temperature) and self.temperature >= 0,
                f"temperature must be finite and >= 0 (0: greedy), got {self.temperature}",
            ),
            (self.top_k >= 0, f"top_k must be >= 0 (0: keep every token), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (
                self.seed is None or 0 <= self.seed <= _MAX_SEED,
                f"seed must be in 0..2**64 - 1, got {self.seed}",
            ),
        ):
            if not valid:
                raise ValueError(problem)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf ([B, V])."""
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token [B] from the last position's logits [B, V]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(
        _divide_by_temperature(logits, sampling.temperature), sampling.top_k, sampling.top_p
    )
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _divide_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits / temperature` ([B, V]) in float64, without NaN or +inf for any temperature > 0.

    The largest logit is moved to 0 first (the softmax stays the same), so a tiny temperature
    sends the others towards -inf, which is greedy, instead of sending the largest to +inf
    (inf - inf is NaN in the softmax); and in float64 no positive Python float rounds to 0.
    """
    logits = logits.double()
    return (logits - logits.amax(-1, keepdim=True)) / temperature


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    sampling: SamplingConfig,
    stop_token: int | None = None,
    vocab_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yields the next token [B] for each step; the prompt [B, T] is encoded once.

    Stops after `max_new_tokens`, or when every sequence has produced `stop_token`. Only ids
    below `vocab_size` (default: every id of the model) are produced: give the tokenizer's
    size, since a model's vocabulary may be padded past it (e.g. for tensor parallelism to
    divide it) and the padding ids stand for no text.
    """
    was_training = model.training
    model.eval()
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(sampling.seed)
    try:
        out = model(prompt, use_cache=True)
        finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for _ in range(sampling.max_new_tokens):
            token = next_token(out.logits[:, -1, :vocab_size], sampling, generator)
            yield token
            if stop_token is not None:
                finished |= token == stop_token
                if finished.all():
                    return
            out = model(token[:, None], cache=out.cache)
    finally:
        model.train(was_training)
