"""Local expert compute: gather rows → per-expert matmul → gate-weighted scatter-add.

One contract, two implementations: Triton kernels for CUDA tensors and the pure-PyTorch
reference (`moeut_dist.kernels.reference`) for CPU tensors and as the test oracle. `backend`
chooses: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton".

Routing is given as pairs (see `reference`): the same form serves a single process (every token
with its k experts) and expert parallelism (the tokens a rank received, with only its local
experts), and it covers σ-MoE and both SwitchHead projections.
"""

from __future__ import annotations

from typing import Literal

import torch

from moeut_dist.kernels import reference

Backend = Literal["auto", "torch", "triton"]


def _use_triton(x: torch.Tensor, backend: Backend) -> bool:
    if backend == "auto":
        return x.is_cuda
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}; use 'auto', 'torch' or 'triton'")
    return backend == "triton"


def moe_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    n_out_rows: int,
    backend: Backend = "auto",
) -> torch.Tensor:
    """out[out_rows[p]] += gates[p] · x[in_rows[p]] @ weight[experts[p]], out: [n_out_rows, d_out].

    x: [N, d_in]; weight: [E, d_in, d_out]; gates: [P]; experts, in_rows, out_rows: [P] int64.
    """
    if _use_triton(x, backend):
        from moeut_dist.kernels import triton_ops

        return triton_ops.moe_linear(x, weight, gates, experts, in_rows, out_rows, n_out_rows)
    return reference.moe_linear(x, weight, gates, experts, in_rows, out_rows, n_out_rows)


def moe_mlp(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
    backend: Backend = "auto",
) -> torch.Tensor:
    """out[rows[p]] += gates[p] · relu(x[rows[p]] @ up[e]) @ down[e], e = experts[p].

    x: [N, d]; up: [E, d, m]; down: [E, m, d_out]; gates: [P]; experts, rows: [P] int64.
    Returns [N, d_out]; rows no pair refers to are zero.
    """
    if _use_triton(x, backend):
        from moeut_dist.kernels import triton_ops

        return triton_ops.moe_mlp(x, up, down, gates, experts, rows)
    return reference.moe_mlp(x, up, down, gates, experts, rows)
