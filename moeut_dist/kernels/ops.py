"""`torch.library` custom ops for grouped expert compute, with fake implementations and autograd.

Four ops: `moeut::moe_linear`, `moeut::moe_mlp` and their backward ops. Registering the
backward as ops too keeps `torch.compile` (including AOT autograd) tracing through both passes
without graph breaks, and the data-dependent sizes of a routing (pairs per expert) stay inside
the ops, so a new routing never recompiles.

Autograd saves the inputs and the routing, and for σ-MoE whatever hidden activations the
implementation keeps: the forward op returns them as a second output, which the backward op
takes back. The Triton kernels keep none (they recompute the hidden layer; on a GPU memory is
what limits the batch) and return an empty [0, m]; the PyTorch path keeps its [P, m] ReLU
outputs, since recomputing them would cost one more per-expert matmul.

`triton` chooses the implementation (`kernels.use_triton` decides it, the one place that does):
the Triton kernels of `triton_kernels` (CUDA, or CPU under `TRITON_INTERPRET=1`, which is how
they are tested without a GPU), or the PyTorch ones of `torch_kernels`. `deterministic` is an op
argument too, so the choice is visible to the compiler: when true, the Triton kernels reduce
outputs and input gradients per row in a fixed order instead of by atomic adds (weight
gradients never use atomics; the PyTorch path is deterministic on CPU either way).
"""

from __future__ import annotations

from typing import Any

import torch

from moeut_dist.kernels import torch_kernels, triton_kernels

# ----------------------------------------------------------------------------------------------
# moe_linear
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moeut::moe_linear", mutates_args=())
def moe_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    n_out_rows: int,
    triton: bool,
    deterministic: bool,
) -> torch.Tensor:
    """out[out_rows[p]] += gates[p] · x[in_rows[p]] @ weight[experts[p]]."""
    if triton:
        return triton_kernels.linear_forward(
            x, weight, gates, experts, in_rows, out_rows, n_out_rows, deterministic
        )
    return torch_kernels.linear_forward(x, weight, gates, experts, in_rows, out_rows, n_out_rows)


@moe_linear_op.register_fake
def _(x, weight, gates, experts, in_rows, out_rows, n_out_rows, triton, deterministic):
    return x.new_empty(n_out_rows, weight.shape[2])


@torch.library.custom_op("moeut::moe_linear_backward", mutates_args=())
def moe_linear_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    triton: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_gates) of `moeut::moe_linear`."""
    if triton:
        return triton_kernels.linear_backward(
            grad_out, x, weight, gates, experts, in_rows, out_rows, deterministic
        )
    return torch_kernels.linear_backward(grad_out, x, weight, gates, experts, in_rows, out_rows)


@moe_linear_backward_op.register_fake
def _(grad_out, x, weight, gates, experts, in_rows, out_rows, triton, deterministic):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(gates)


def _linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, gates, experts, in_rows, out_rows, _, triton, deterministic = inputs
    ctx.save_for_backward(x, weight, gates, experts, in_rows, out_rows)
    ctx.flags = triton, deterministic


def _linear_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    grad_x, grad_weight, grad_gates = moe_linear_backward_op(
        grad_out, *ctx.saved_tensors, *ctx.flags
    )
    return grad_x, grad_weight, grad_gates, None, None, None, None, None, None


moe_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ----------------------------------------------------------------------------------------------
# moe_mlp
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moeut::moe_mlp", mutates_args=())
def moe_mlp_op(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
    triton: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, hidden): out[rows[p]] += gates[p] · relu(x[rows[p]] @ up[e]) @ down[e],
    e = experts[p]; hidden is what the backward gets back: [P, m] (PyTorch) or [0, m] (Triton)."""
    if triton:
        out = triton_kernels.mlp_forward(x, up, down, gates, experts, rows, deterministic)
        return out, x.new_empty(0, up.shape[2])
    return torch_kernels.mlp_forward(x, up, down, gates, experts, rows)


@moe_mlp_op.register_fake
def _(x, up, down, gates, experts, rows, triton, deterministic):
    kept_rows = 0 if triton else experts.shape[0]
    return x.new_empty(x.shape[0], down.shape[2]), x.new_empty(kept_rows, up.shape[2])


@torch.library.custom_op("moeut::moe_mlp_backward", mutates_args=())
def moe_mlp_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
    hidden: torch.Tensor,
    triton: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_up, grad_down, grad_gates) of `moeut::moe_mlp`, given the hidden output it
    returned (the Triton path recomputes the hidden layer)."""
    if triton:
        return triton_kernels.mlp_backward(
            grad_out, x, up, down, gates, experts, rows, deterministic
        )
    return torch_kernels.mlp_backward(grad_out, x, up, down, gates, experts, rows, hidden)


@moe_mlp_backward_op.register_fake
def _(grad_out, x, up, down, gates, experts, rows, hidden, triton, deterministic):
    return (
        torch.empty_like(x),
        torch.empty_like(up),
        torch.empty_like(down),
        torch.empty_like(gates),
    )


def _mlp_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    *tensors, triton, deterministic = inputs
    hidden = output[1]
    ctx.mark_non_differentiable(hidden)
    ctx.save_for_backward(*tensors, hidden)
    ctx.flags = triton, deterministic


def _mlp_backward(ctx: Any, grad_out: torch.Tensor, _: Any) -> tuple[Any, ...]:
    grads = moe_mlp_backward_op(grad_out, *ctx.saved_tensors, *ctx.flags)
    return *grads, None, None, None, None


moe_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)
