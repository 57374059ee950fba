"""Triton kernels for grouped expert compute, and the host code that routes and launches them.

Every kernel works on the same schedule: pairs are sorted by expert once, and the sorted list is
cut into blocks of at most `BLOCK_M` pairs that all belong to one expert. A program takes one
block, gathers the input rows its pairs name, multiplies them by that expert's matrix and either
scatter-adds the gated result into the output rows (fp32 atomics: fast, order-dependent rounding)
or, in deterministic mode, stores one row per pair that `_segment_sum_kernel` then reduces per
output row in a fixed order. Weight gradients are per-expert reductions done by one program per
output tile, so they never need atomics and are deterministic in both modes. Autotuning picks
only output tiles, warps and stages, never a reduction chunk, so it cannot change the rounding
from one process to the next.

Per-pair buffers (deterministic outputs, the σ-MoE backward's hidden gradients) are indexed by
pair id, not by sorted position, so any kernel can read them back through an identity row map.

The σ-MoE forward (`_mlp_forward_kernel`) keeps each block's hidden activations
`relu(x @ up[e])` in registers between the up and the down projection: the `[pairs, m]` hidden
tensor is never written to memory, and the backward recomputes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRETING:
    from moeut_dist.kernels import _interpreter_compat

    _interpreter_compat.install()

# Pairs per program. The routing schedule depends on it, so it is fixed per process rather than
# autotuned; the interpreter uses small blocks so that tiny tests still span several blocks.
BLOCK_M = 16 if INTERPRETING else 64
# Reduction chunks: along the inner dimension of a product (BLOCK_K) and over an expert's pairs
# in a weight gradient (BLOCK_P). They set the order of floating-point sums, so they are fixed
# rather than autotuned: a timing-dependent choice could round differently in another process.
BLOCK_K = 16 if INTERPRETING else 64
BLOCK_P = 16 if INTERPRETING else 32


def _configs(
    names: tuple[str, ...], tiles: list[tuple[int, ...]], warps_stages: list[tuple[int, int]]
) -> list[triton.Config]:
    if INTERPRETING:
        return [triton.Config(dict.fromkeys(names, 16), num_warps=1)]
    return [
        triton.Config(dict(zip(names, tile, strict=True)), num_warps=w, num_stages=s)
        for tile in tiles
        for w, s in warps_stages
    ]


_GEMM_CONFIGS = _configs(("BLOCK_N",), [(64,), (128,)], [(4, 3), (8, 3)])
_MLP_BACKWARD_CONFIGS = _configs((), [()], [(4, 3), (8, 3)])
_WEIGHT_GRAD_CONFIGS = _configs(
    ("BLOCK_I", "BLOCK_J"), [(64, 64), (128, 64), (128, 128), (64, 128)], [(4, 3), (8, 3)]
)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_block(order_ptr, block_expert_ptr, block_start_ptr, block_end_ptr, BLOCK_M: tl.constexpr):
    """This program's pairs (ids, validity mask), their expert, and how many there are (0 for
    the padding blocks of the static grid)."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    start = tl.load(block_start_ptr + block)
    end = tl.load(block_end_ptr + block)
    positions = start + tl.arange(0, BLOCK_M)
    pair_mask = positions < end
    pairs = tl.load(order_ptr + positions, mask=pair_mask, other=0)
    return pairs, pair_mask, expert, end - start


@triton.jit
def _gathered_matmul(
    acc,
    a_ptr,
    a_rows,
    row_mask,
    stride_a,
    w_ptr,
    stride_wk,
    stride_wn,
    offs_n,
    n_mask,
    K,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc += A[a_rows, :K] @ W[:K, offs_n]: the inner loop every block kernel shares."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_a + offs_k[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _write_rows(
    out_ptr, stride_out, pairs, out_rows, pair_mask, offs_n, n_mask, values, ATOMIC: tl.constexpr
):
    """Scatter-add `values` into out[out_rows], or store them at out[pairs] for a later fixed-order
    reduction."""
    mask = pair_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + out_rows[:, None] * stride_out + offs_n[None, :], values, mask=mask)
    else:
        tl.store(out_ptr + pairs[:, None] * stride_out + offs_n[None, :], values, mask=mask)


@triton.autotune(
    configs=_GEMM_CONFIGS, key=["K", "N_OUT", "GATE_GRAD", "ATOMIC"], reset_to_zero=["out_ptr"]
)
@triton.jit
def _scatter_linear_kernel(
    a_ptr,
    a_rows_ptr,
    w_ptr,
    gates_ptr,
    out_ptr,
    out_rows_ptr,
    dot_ptr,
    dot_rows_ptr,
    gate_grad_ptr,
    order_ptr,
    block_expert_ptr,
    block_start_ptr,
    block_end_ptr,
    K,
    N_OUT,
    stride_a,
    stride_we,
    stride_wk,
    stride_wn,
    stride_out,
    stride_dot,
    SCALE_BY_GATE: tl.constexpr,
    GATE_GRAD: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per pair p of expert e: r = A[a_rows[p]] @ W[e]; out[out_rows[p]] += gates[p] · r.

    With GATE_GRAD also gate_grad[p] = r · D[dot_rows[p]], which is dL/dgate for the backward of
    a gated linear map when A is the output gradient, W the transposed weight and D its input.
    """
    pairs, pair_mask, expert, n_pairs = _load_block(
        order_ptr, block_expert_ptr, block_start_ptr, block_end_ptr, BLOCK_M
    )
    if n_pairs <= 0:
        return
    a_rows = tl.load(a_rows_ptr + pairs, mask=pair_mask, other=0)
    out_rows = tl.load(out_rows_ptr + pairs, mask=pair_mask, other=0)
    if SCALE_BY_GATE:
        gates = tl.load(gates_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    if GATE_GRAD:
        dot_rows = tl.load(dot_rows_ptr + pairs, mask=pair_mask, other=0)
        gate_grad = tl.zeros([BLOCK_M], dtype=tl.float32)
    w_ptr += expert * stride_we
    for n0 in range(0, N_OUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N_OUT
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _gathered_matmul(
            acc, a_ptr, a_rows, pair_mask, stride_a, w_ptr, stride_wk, stride_wn, offs_n, n_mask,
            K, BLOCK_K, PRECISION,
        )  # fmt: skip
        if GATE_GRAD:
            d = tl.load(
                dot_ptr + dot_rows[:, None] * stride_dot + offs_n[None, :],
                mask=pair_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            gate_grad += tl.sum(acc * d.to(tl.float32), axis=1)
        if SCALE_BY_GATE:
            acc *= gates[:, None]
        _write_rows(out_ptr, stride_out, pairs, out_rows, pair_mask, offs_n, n_mask, acc, ATOMIC)
    if GATE_GRAD:
        tl.store(gate_grad_ptr + pairs, gate_grad, mask=pair_mask)


@triton.autotune(configs=_GEMM_CONFIGS, key=["D_IN", "D_OUT", "HIDDEN"], reset_to_zero=["out_ptr"])
@triton.jit
def _mlp_forward_kernel(
    x_ptr,
    rows_ptr,
    up_ptr,
    down_ptr,
    gates_ptr,
    out_ptr,
    order_ptr,
    block_expert_ptr,
    block_start_ptr,
    block_end_ptr,
    D_IN,
    D_OUT,
    HIDDEN,
    stride_x,
    stride_ue,
    stride_uk,
    stride_un,
    stride_de,
    stride_dk,
    stride_dn,
    stride_out,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[rows[p]] += gates[p] · relu(x[rows[p]] @ up[e]) @ down[e], hidden kept in registers."""
    pairs, pair_mask, expert, n_pairs = _load_block(
        order_ptr, block_expert_ptr, block_start_ptr, block_end_ptr, BLOCK_M
    )
    if n_pairs <= 0:
        return
    rows = tl.load(rows_ptr + pairs, mask=pair_mask, other=0)
    gates = tl.load(gates_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HIDDEN
    up_ptr += expert * stride_ue
    down_ptr += expert * stride_de
    hidden = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    hidden = _gathered_matmul(
        hidden, x_ptr, rows, pair_mask, stride_x, up_ptr, stride_uk, stride_un, offs_h, h_mask,
        D_IN, BLOCK_K, PRECISION,
    )  # fmt: skip
    # Gating the hidden rows instead of the outputs costs BLOCK_H multiplies instead of D_OUT.
    hidden = (tl.maximum(hidden, 0.0) * gates[:, None]).to(down_ptr.dtype.element_ty)
    for n0 in range(0, D_OUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < D_OUT
        w = tl.load(
            down_ptr + offs_h[:, None] * stride_dk + offs_n[None, :] * stride_dn,
            mask=h_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(hidden, w, input_precision=PRECISION)
        _write_rows(out_ptr, stride_out, pairs, rows, pair_mask, offs_n, n_mask, acc, ATOMIC)


@triton.autotune(configs=_MLP_BACKWARD_CONFIGS, key=["D_IN", "D_OUT", "HIDDEN"])
@triton.jit
def _mlp_hidden_grad_kernel(
    x_ptr,
    grad_out_ptr,
    rows_ptr,
    up_ptr,
    down_ptr,
    gates_ptr,
    grad_pre_ptr,
    gated_hidden_ptr,
    gate_grad_ptr,
    order_ptr,
    block_expert_ptr,
    block_start_ptr,
    block_end_ptr,
    D_IN,
    D_OUT,
    HIDDEN,
    stride_x,
    stride_g,
    stride_ue,
    stride_uk,
    stride_un,
    stride_de,
    stride_dk,
    stride_dn,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """σ-MoE backward, per pair: recompute pre = x @ up[e], then with dh = dy @ down[e]ᵀ write
    grad_pre = g · dh · [pre > 0], gated_hidden = g · relu(pre) and gate_grad = dh · relu(pre)."""
    pairs, pair_mask, expert, n_pairs = _load_block(
        order_ptr, block_expert_ptr, block_start_ptr, block_end_ptr, BLOCK_M
    )
    if n_pairs <= 0:
        return
    rows = tl.load(rows_ptr + pairs, mask=pair_mask, other=0)
    gates = tl.load(gates_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HIDDEN
    pre = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    pre = _gathered_matmul(
        pre, x_ptr, rows, pair_mask, stride_x, up_ptr + expert * stride_ue, stride_uk, stride_un,
        offs_h, h_mask, D_IN, BLOCK_K, PRECISION,
    )  # fmt: skip
    # down[e]ᵀ: walk down's output dimension as the reduction axis.
    grad_hidden = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    grad_hidden = _gathered_matmul(
        grad_hidden, grad_out_ptr, rows, pair_mask, stride_g, down_ptr + expert * stride_de,
        stride_dn, stride_dk, offs_h, h_mask, D_OUT, BLOCK_K, PRECISION,
    )  # fmt: skip
    hidden = tl.maximum(pre, 0.0)
    tl.store(gate_grad_ptr + pairs, tl.sum(grad_hidden * hidden, axis=1), mask=pair_mask)
    mask = pair_mask[:, None] & h_mask[None, :]
    offsets = pairs[:, None] * HIDDEN + offs_h[None, :]
    grad_pre = tl.where(pre > 0.0, grad_hidden * gates[:, None], 0.0)
    tl.store(grad_pre_ptr + offsets, grad_pre, mask=mask)
    # The down projection's input rounded exactly as in the forward, for its weight gradient.
    gated_hidden = (hidden * gates[:, None]).to(down_ptr.dtype.element_ty)
    tl.store(gated_hidden_ptr + offsets, gated_hidden, mask=mask)


@triton.autotune(configs=_WEIGHT_GRAD_CONFIGS, key=["DIM_I", "DIM_J"])
@triton.jit
def _expert_weight_grad_kernel(
    a_ptr,
    a_rows_ptr,
    b_ptr,
    b_rows_ptr,
    gates_ptr,
    grad_w_ptr,
    order_ptr,
    expert_start_ptr,
    DIM_I,
    DIM_J,
    stride_a,
    stride_b,
    stride_we,
    stride_wi,
    stride_wj,
    SCALE_BY_GATE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """grad_w[e] = Σ_{p of expert e} A[a_rows[p]]ᵀ ⊗ (gates[p] ·) B[b_rows[p]].

    One program owns one tile of one expert's gradient and walks that expert's pairs in sorted
    order, so the result is deterministic; experts without pairs get exact zeros.
    """
    expert = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = offs_i < DIM_I
    j_mask = offs_j < DIM_J
    start = tl.load(expert_start_ptr + expert)
    end = tl.load(expert_start_ptr + expert + 1)
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        positions = p0 + tl.arange(0, BLOCK_P)
        pair_mask = positions < end
        pairs = tl.load(order_ptr + positions, mask=pair_mask, other=0)
        a_rows = tl.load(a_rows_ptr + pairs, mask=pair_mask, other=0)
        b_rows = tl.load(b_rows_ptr + pairs, mask=pair_mask, other=0)
        a_t = tl.load(
            a_ptr + a_rows[None, :] * stride_a + offs_i[:, None],
            mask=i_mask[:, None] & pair_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + b_rows[:, None] * stride_b + offs_j[None, :],
            mask=pair_mask[:, None] & j_mask[None, :],
            other=0.0,
        )
        if SCALE_BY_GATE:
            gates = tl.load(gates_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * gates[:, None]).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a_t, b, acc, input_precision=PRECISION)
    grad_w_ptr += expert.to(tl.int64) * stride_we
    tl.store(
        grad_w_ptr + offs_i[:, None] * stride_wi + offs_j[None, :] * stride_wj,
        acc,
        mask=i_mask[:, None] & j_mask[None, :],
    )


@triton.jit
def _segment_sum_kernel(
    values_ptr,
    order_ptr,
    segment_start_ptr,
    out_ptr,
    WIDTH,
    stride_values,
    stride_out,
    BLOCK_N: tl.constexpr,
):
    """out[r] = Σ values[order[i]] for i in [segment_start[r], segment_start[r + 1]), in order."""
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < WIDTH
    start = tl.load(segment_start_ptr + row)
    end = tl.load(segment_start_ptr + row + 1)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(start, end):
        pair = tl.load(order_ptr + i)
        acc += tl.load(values_ptr + pair * stride_values + offs_n, mask=n_mask, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + offs_n, acc, mask=n_mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Schedule:
    """Pairs sorted by expert and cut into single-expert blocks, built without a host sync."""

    order: torch.Tensor  # [P] pair ids sorted by expert (stable)
    expert_start: torch.Tensor  # [E + 1] offsets of each expert's run in `order`
    block_expert: torch.Tensor  # [B] expert of each block
    block_start: torch.Tensor  # [B] first sorted position of each block
    block_end: torch.Tensor  # [B] one past its last; == block_start for padding blocks

    @property
    def n_blocks(self) -> int:
        return self.block_expert.shape[0]


def _schedule(experts: torch.Tensor, n_experts: int) -> _Schedule:
    n_pairs = experts.shape[0]
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=n_experts)
    expert_end = counts.cumsum(0)
    expert_start = torch.cat([expert_end.new_zeros(1), expert_end])
    blocks_per_expert = (counts + BLOCK_M - 1) // BLOCK_M
    blocks_end = blocks_per_expert.cumsum(0)
    # Each expert with pairs leaves at most one block partly filled: a bound known without a sync.
    max_blocks = triton.cdiv(n_pairs, BLOCK_M) + min(n_experts, n_pairs)
    block = torch.arange(max_blocks, device=experts.device)
    block_expert = torch.searchsorted(blocks_end, block, right=True)
    used = block_expert < n_experts
    block_expert = block_expert.clamp_(max=n_experts - 1)
    first_block = blocks_end[block_expert] - blocks_per_expert[block_expert]
    block_start = expert_start[block_expert] + (block - first_block) * BLOCK_M
    block_end = torch.minimum(block_start + BLOCK_M, expert_end[block_expert])
    block_start = torch.where(used, block_start, 0)
    block_end = torch.where(used, block_end, 0)
    return _Schedule(order, expert_start, block_expert, block_start, block_end)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (no TF32), as the tests' 1e-5 tolerance and users of
    # fp32 expect; for 16-bit inputs the setting has no effect.
    return "ieee" if dtype == torch.float32 else "tf32"


def _pair_output(
    n_pairs: int, n_out_rows: int, width: int, like: torch.Tensor, deterministic: bool
) -> torch.Tensor:
    """Where block kernels write: an fp32 scatter-add target, or one row per pair to reduce."""
    if deterministic:
        return like.new_empty(n_pairs, width, dtype=torch.float32)
    return like.new_zeros(n_out_rows, width, dtype=torch.float32)


def _reduce_pairs(
    written: torch.Tensor,
    out_rows: torch.Tensor,
    n_out_rows: int,
    dtype: torch.dtype,
    deterministic: bool,
) -> torch.Tensor:
    """The [n_out_rows, width] result in `dtype` from what `_pair_output` received."""
    if not deterministic:
        return written.to(dtype)
    order = torch.argsort(out_rows, stable=True)
    row_end = torch.bincount(out_rows, minlength=n_out_rows).cumsum(0)
    row_start = torch.cat([row_end.new_zeros(1), row_end])
    width = written.shape[1]
    out = written.new_empty(n_out_rows, width, dtype=dtype)
    if n_out_rows > 0 and width > 0:
        block_n = 16 if INTERPRETING else 256
        grid = (n_out_rows, triton.cdiv(width, block_n))
        _segment_sum_kernel[grid](
            written, order, row_start, out, width, written.stride(0), out.stride(0),
            BLOCK_N=block_n,
        )  # fmt: skip
    return out


def _scatter_linear(
    a: torch.Tensor,
    a_rows: torch.Tensor,
    weight: torch.Tensor,
    weight_in_dim: int,
    gates: torch.Tensor | None,
    out_rows: torch.Tensor,
    n_out_rows: int,
    schedule: _Schedule,
    deterministic: bool,
    gate_grad_against: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out[out_rows[p]] += gates[p] · a[a_rows[p]] @ W[e], where W[e] is weight[e] read with
    `weight_in_dim` (1 or 2) as its input dimension; optionally also the gate gradient
    r_p · D[dot_rows[p]] for `gate_grad_against = (D, dot_rows)`."""
    n_pairs = a_rows.shape[0]
    out_dim = 3 - weight_in_dim
    k, n_out = weight.shape[weight_in_dim], weight.shape[out_dim]
    written = _pair_output(n_pairs, n_out_rows, n_out, a, deterministic)
    gate_grad = a.new_empty(n_pairs, dtype=torch.float32) if gate_grad_against else None
    dot, dot_rows = gate_grad_against if gate_grad_against else (a, a_rows)
    if n_pairs > 0:
        _scatter_linear_kernel[(schedule.n_blocks,)](
            a, a_rows, weight, gates if gates is not None else a, written, out_rows,
            dot, dot_rows, gate_grad if gate_grad is not None else written,
            schedule.order, schedule.block_expert, schedule.block_start, schedule.block_end,
            k, n_out, a.stride(0), weight.stride(0), weight.stride(weight_in_dim),
            weight.stride(out_dim), written.stride(0), dot.stride(0),
            SCALE_BY_GATE=gates is not None, GATE_GRAD=gate_grad is not None,
            ATOMIC=not deterministic, PRECISION=_dot_precision(a.dtype), BLOCK_M=BLOCK_M,
            BLOCK_K=BLOCK_K,
        )  # fmt: skip
    out = _reduce_pairs(written, out_rows, n_out_rows, a.dtype, deterministic)
    return out, gate_grad


def _expert_weight_grad(
    a: torch.Tensor,
    a_rows: torch.Tensor,
    b: torch.Tensor,
    b_rows: torch.Tensor,
    gates: torch.Tensor | None,
    weight: torch.Tensor,
    schedule: _Schedule,
) -> torch.Tensor:
    """grad[e] = Σ_{p of e} a[a_rows[p]]ᵀ (gates[p] ·) b[b_rows[p]], shaped like weight."""
    n_experts, dim_i, dim_j = weight.shape
    grad = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    grid = lambda meta: (
        n_experts,
        triton.cdiv(dim_i, meta["BLOCK_I"]),
        triton.cdiv(dim_j, meta["BLOCK_J"]),
    )
    _expert_weight_grad_kernel[grid](
        a, a_rows, b, b_rows, gates if gates is not None else a, grad, schedule.order,
        schedule.expert_start, dim_i, dim_j, a.stride(0), b.stride(0), grad.stride(0),
        grad.stride(1), grad.stride(2), SCALE_BY_GATE=gates is not None,
        PRECISION=_dot_precision(a.dtype), BLOCK_P=BLOCK_P,
    )  # fmt: skip
    return grad


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    n_out_rows: int,
    deterministic: bool,
) -> torch.Tensor:
    schedule = _schedule(experts, weight.shape[0])
    out, _ = _scatter_linear(
        x.contiguous(), in_rows, weight, 1, gates, out_rows, n_out_rows, schedule, deterministic
    )
    return out


def linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_gates) of `linear_forward`."""
    schedule = _schedule(experts, weight.shape[0])
    x, grad_out = x.contiguous(), grad_out.contiguous()
    grad_x, grad_gates = _scatter_linear(
        grad_out, out_rows, weight, 2, gates, in_rows, x.shape[0], schedule, deterministic,
        gate_grad_against=(x, in_rows),
    )  # fmt: skip
    grad_weight = _expert_weight_grad(x, in_rows, grad_out, out_rows, gates, weight, schedule)
    return grad_x, grad_weight, grad_gates.to(gates.dtype)


def _mlp_launch_args(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> tuple[tuple[int, ...], dict[str, object]]:
    strides = (*up.stride(), *down.stride())
    meta = dict(
        PRECISION=_dot_precision(x.dtype),
        BLOCK_M=BLOCK_M,
        BLOCK_H=max(16, triton.next_power_of_2(up.shape[2])),
        BLOCK_K=BLOCK_K,
    )
    return (x.shape[1], down.shape[2], up.shape[2], x.stride(0), *strides), meta


def mlp_forward(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
    deterministic: bool,
) -> torch.Tensor:
    x = x.contiguous()
    n_pairs, n_rows = rows.shape[0], x.shape[0]
    schedule = _schedule(experts, up.shape[0])
    written = _pair_output(n_pairs, n_rows, down.shape[2], x, deterministic)
    if n_pairs > 0:
        (d_in, d_out, hidden, stride_x, *w_strides), meta = _mlp_launch_args(x, up, down)
        _mlp_forward_kernel[(schedule.n_blocks,)](
            x, rows, up, down, gates, written, schedule.order, schedule.block_expert,
            schedule.block_start, schedule.block_end, d_in, d_out, hidden, stride_x, *w_strides,
            written.stride(0), ATOMIC=not deterministic, **meta,
        )  # fmt: skip
    return _reduce_pairs(written, rows, n_rows, x.dtype, deterministic)


def mlp_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_up, grad_down, grad_gates) of `mlp_forward`, recomputing the hidden layer."""
    x, grad_out = x.contiguous(), grad_out.contiguous()
    n_pairs, hidden = rows.shape[0], up.shape[2]
    schedule = _schedule(experts, up.shape[0])
    # Backward-only temporaries, one row per pair: gradient at the pre-activation, and the gated
    # hidden activation that the down projection's weight gradient needs.
    grad_pre = x.new_empty(n_pairs, hidden)
    gated_hidden = x.new_empty(n_pairs, hidden)
    grad_gates = x.new_empty(n_pairs, dtype=torch.float32)
    if n_pairs > 0:
        (d_in, d_out, _, stride_x, *w_strides), meta = _mlp_launch_args(x, up, down)
        _mlp_hidden_grad_kernel[(schedule.n_blocks,)](
            x, grad_out, rows, up, down, gates, grad_pre, gated_hidden, grad_gates,
            schedule.order, schedule.block_expert, schedule.block_start, schedule.block_end,
            d_in, d_out, hidden, stride_x, grad_out.stride(0), *w_strides, **meta,
        )  # fmt: skip
    pair_ids = torch.arange(n_pairs, device=x.device)
    grad_x, _ = _scatter_linear(
        grad_pre, pair_ids, up, 2, None, rows, x.shape[0], schedule, deterministic
    )
    grad_up = _expert_weight_grad(x, rows, grad_pre, pair_ids, None, up, schedule)
    grad_down = _expert_weight_grad(gated_hidden, pair_ids, grad_out, rows, None, down, schedule)
    return grad_x, grad_up, grad_down, grad_gates.to(gates.dtype)
