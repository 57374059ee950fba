"""`moeut_dist.kernels` as an exported directory carries it: the PyTorch path only.

The Triton kernels need Triton and our custom ops; a directory that loads with torch and
transformers alone computes the experts with the reference implementation, which is also the
Triton kernels' test oracle. `packaging` puts this module in the place of `moeut_dist.kernels`,
so the functions take the same arguments and ignore the backend choice.
"""

from __future__ import annotations

from typing import Literal

import torch

from moeut_dist.kernels.reference import moe_linear as reference_moe_linear
from moeut_dist.kernels.reference import moe_mlp as reference_moe_mlp

Backend = Literal["auto", "torch", "triton"]


def moe_linear(
    x: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor,
    in_rows: torch.Tensor, out_rows: torch.Tensor, n_out_rows: int, backend: Backend = "auto",
    *, deterministic: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """`moeut_dist.kernels.moe_linear` on the PyTorch path (deterministic as it is)."""
    return reference_moe_linear(x, weight, gates, experts, in_rows, out_rows, n_out_rows)


def moe_mlp(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gates: torch.Tensor,
    experts: torch.Tensor, rows: torch.Tensor, backend: Backend = "auto",
    *, deterministic: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """`moeut_dist.kernels.moe_mlp` on the PyTorch path (deterministic as it is)."""
    return reference_moe_mlp(x, up, down, gates, experts, rows)
