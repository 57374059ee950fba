"""Autoregressive sampling with the KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # nucleus mass kept; 1 keeps every token
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings: {self}")


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
    logits = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    sampling: SamplingConfig,
    stop_token: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yields the next token [B] for each step; the prompt [B, T] is encoded once.

    Stops after `max_new_tokens`, or when every sequence has produced `stop_token`.
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
            token = next_token(out.logits[:, -1], sampling, generator)
            yield token
            if stop_token is not None:
                finished |= token == stop_token
                if finished.all():
                    return
            out = model(token[:, None], cache=out.cache)
    finally:
        model.train(was_training)
