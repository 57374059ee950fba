"""Local expert compute: gather rows → per-expert matmul → gate-weighted scatter-add.

One contract, two implementations behind the same `torch.library` custom ops (`ops`): the Triton
kernels (`triton_kernels`) and the PyTorch ones (`torch_kernels`); `reference`, plain autograd
over per-expert matmuls, is the test oracle. `backend` chooses, here and nowhere else
(`use_triton`): "auto" (Triton on CUDA tensors, PyTorch elsewhere), "torch", or "triton" (on CPU
tensors only under the Triton interpreter, `TRITON_INTERPRET=1`).

Routing is given as pairs (see `reference`): the same form serves a single process (every token
with its k experts) and expert parallelism (the tokens a rank received, with only its local
experts), and it covers σ-MoE and both SwitchHead projections.

Determinism: the Triton path's weight gradients never use atomics. Outputs and input gradients
are scatter-added with fp32 atomics (fast; the summation order, hence the last bits, may vary run
to run) unless `deterministic=True`, or `deterministic=None` (the default) while
`torch.use_deterministic_algorithms(True)` is in effect: then they are reduced per row in a fixed
order and repeated runs, in any process, are bitwise identical. That costs a `[pairs, d_out]` fp32
buffer per call (4 GiB for a σ-MoE layer at the 244M shapes: 64k tokens, k = 16, d = 1024).
"""

from __future__ import annotations

from typing import Literal

import torch

from moeut_dist.kernels import ops, triton_kernels

Backend = Literal["auto", "torch", "triton"]


def use_triton(x: torch.Tensor, backend: Backend) -> bool:
    """Whether `backend` runs the Triton kernels on tensors like `x`."""
    if backend == "auto":  # float64 stays on the reference path: the kernels target 16/32-bit
        return x.is_cuda and x.dtype != torch.float64
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}; use 'auto', 'torch' or 'triton'")
    if backend == "triton" and not (x.is_cuda or triton_kernels.INTERPRETING):
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU"
        )
    return backend == "triton"


def _same_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels multiply tensors of one dtype: under autocast, that of autocast (as for any
    matmul); otherwise mixed inputs are a caller error."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) for t in tensors)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        names = sorted(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise ValueError(f"expert inputs and weights must share a dtype, got {names}")
    return tensors


def _resolve_deterministic(deterministic: bool | None) -> bool:
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    return deterministic


def moe_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    n_out_rows: int,
    backend: Backend = "auto",
    *,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """out[out_rows[p]] += gates[p] · x[in_rows[p]] @ weight[experts[p]], out: [n_out_rows, d_out].

    x: [N, d_in]; weight: [E, d_in, d_out]; gates: [P]; experts, in_rows, out_rows: [P] int64.
    """
    triton = use_triton(x, backend)
    x, weight = _same_dtype(x, weight)
    out, _, _ = ops.moe_linear_op(
        x, weight, gates, experts, in_rows, out_rows, n_out_rows,
        triton, _resolve_deterministic(deterministic),
    )  # fmt: skip
    return out


def moe_mlp(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
    backend: Backend = "auto",
    *,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """out[rows[p]] += gates[p] · relu(x[rows[p]] @ up[e]) @ down[e], e = experts[p].

    x: [N, d]; up: [E, d, m]; down: [E, m, d_out]; gates: [P]; experts, rows: [P] int64.
    Returns [N, d_out]; rows no pair refers to are zero. For backward the Triton path keeps no
    [P, m] hidden activations (it recomputes them), the PyTorch path keeps them (see `ops`).
    """
    triton = use_triton(x, backend)
    x, up, down = _same_dtype(x, up, down)
    out, _, _ = ops.moe_mlp_op(
        x, up, down, gates, experts, rows, triton, _resolve_deterministic(deterministic)
    )
    return out
