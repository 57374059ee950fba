"""Rotary position embedding on the leading channels of each head (rotate-half convention)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates channel pairs `(i, i + n/2)` of the first `n` channels; the rest pass through.

    The frequencies are recomputed per call (n/2 values) rather than stored, so the module has
    no state to save, shard or materialise.
    """

    def __init__(self, rotary_dim: int, base: float) -> None:
        super().__init__()
        if rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.base = base

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: [..., T, head_dim]; positions start at `offset` (the KV-cache length)."""
        if self.rotary_dim == 0:
            return x
        # Angles in at least fp32: bf16 positions would collide beyond a few hundred tokens.
        dtype = torch.promote_types(x.dtype, torch.float32)
        exponents = torch.arange(0, self.rotary_dim, 2, device=x.device, dtype=dtype)
        inv_freq = self.base ** (-exponents / self.rotary_dim)
        positions = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=dtype)
        angles = torch.outer(positions, inv_freq).repeat(1, 2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rotated, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        first, second = rotated.chunk(2, dim=-1)
        rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
        return torch.cat((rotated, passthrough), dim=-1)
