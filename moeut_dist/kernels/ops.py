"""`torch.library` custom ops for grouped expert compute, with fake implementations and autograd.

Four ops: `moeut::moe_linear`, `moeut::moe_mlp` and their backward ops. Registering the
backward as ops too keeps `torch.compile` (including AOT autograd) tracing through both passes
without graph breaks, and the data-dependent sizes of a routing (pairs per expert) stay inside
the ops, so a new routing never recompiles.

Autograd saves the inputs and the routing, and whatever else the implementation's forward
hands to its backward: each forward op returns it as extra outputs, which the backward op takes
back. The Triton kernels hand over nothing (they recompute the hidden layer; on a GPU memory is
what limits the batch) and return empty tensors. The PyTorch path hands over its layout of the
pairs (`plan`, int64 [pairs + 1]) and its narrow activations: σ-MoE's ReLU outputs, and a
projection's ungated products when its output is narrower than its input. They are in its
layout's rows (blocks per expert, padded), within `torch_kernels.kept_rows(pairs)` rows
so that their shape does not depend on the routing.

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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, products, plan): out[out_rows[p]] += gates[p] · x[in_rows[p]] @ weight[experts[p]];
    what the backward gets back (see the module's docstring)."""
    if triton:
        out = triton_kernels.linear_forward(
            x, weight, gates, experts, in_rows, out_rows, n_out_rows, deterministic
        )
        return out, x.new_empty(0, weight.shape[2]), experts.new_empty(0)
    return torch_kernels.linear_forward(x, weight, gates, experts, in_rows, out_rows, n_out_rows)


def _kept_rows(experts: torch.Tensor, keeps: bool) -> int:
    return torch_kernels.kept_rows(experts.shape[0]) if keeps else 0


def _plan_size(experts: torch.Tensor, triton: bool) -> int:
    return 0 if triton else experts.shape[0] + 1


@moe_linear_op.register_fake
def _(x, weight, gates, experts, in_rows, out_rows, n_out_rows, triton, deterministic):
    kept_rows = _kept_rows(experts, not triton and torch_kernels.keeps_products(weight))
    return (
        x.new_empty(n_out_rows, weight.shape[2]),
        x.new_empty(kept_rows, weight.shape[2]),
        experts.new_empty(_plan_size(experts, triton)),
    )


@torch.library.custom_op("moeut::moe_linear_backward", mutates_args=())
def moe_linear_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    products: torch.Tensor,
    plan: torch.Tensor,
    triton: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_gates) of `moeut::moe_linear`, given what it handed over."""
    if triton:
        return triton_kernels.linear_backward(
            grad_out, x, weight, gates, experts, in_rows, out_rows, deterministic
        )
    return torch_kernels.linear_backward(
        grad_out, x, weight, gates, experts, in_rows, out_rows, products, plan
    )


@moe_linear_backward_op.register_fake
def _(grad_out, x, weight, gates, experts, in_rows, out_rows, products, plan, *flags):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(gates)


def _linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    x, weight, gates, experts, in_rows, out_rows, _, triton, deterministic = inputs
    _, products, plan = output
    ctx.mark_non_differentiable(products, plan)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for outputs without one
    ctx.save_for_backward(x, weight, gates, experts, in_rows, out_rows, products, plan)
    ctx.flags = triton, deterministic


def _linear_backward(ctx: Any, grad_out: torch.Tensor | None, *_: Any) -> tuple[Any, ...]:
    if grad_out is None:  # no gradient reached the output (and none is materialised)
        return (None,) * 9
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, hidden, plan): out[rows[p]] += gates[p] · relu(x[rows[p]] @ up[e]) @ down[e],
    e = experts[p]; what the backward gets back (see the module's docstring)."""
    if triton:
        out = triton_kernels.mlp_forward(x, up, down, gates, experts, rows, deterministic)
        return out, x.new_empty(0, up.shape[2]), experts.new_empty(0)
    return torch_kernels.mlp_forward(x, up, down, gates, experts, rows)


@moe_mlp_op.register_fake
def _(x, up, down, gates, experts, rows, triton, deterministic):
    return (
        x.new_empty(x.shape[0], down.shape[2]),
        x.new_empty(_kept_rows(experts, not triton), up.shape[2]),
        experts.new_empty(_plan_size(experts, triton)),
    )


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
    plan: torch.Tensor,
    triton: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_up, grad_down, grad_gates) of `moeut::moe_mlp`, given what it handed over
    (the Triton path recomputes the hidden layer)."""
    if triton:
        return triton_kernels.mlp_backward(
            grad_out, x, up, down, gates, experts, rows, deterministic
        )
    return torch_kernels.mlp_backward(grad_out, x, up, down, gates, experts, rows, hidden, plan)


@moe_mlp_backward_op.register_fake
def _(grad_out, x, up, down, gates, experts, rows, hidden, plan, triton, deterministic):
    return (
        torch.empty_like(x),
        torch.empty_like(up),
        torch.empty_like(down),
        torch.empty_like(gates),
    )


def _mlp_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    *tensors, triton, deterministic = inputs
    _, hidden, plan = output
    ctx.mark_non_differentiable(hidden, plan)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for outputs without one
    ctx.save_for_backward(*tensors, hidden, plan)
    ctx.flags = triton, deterministic


def _mlp_backward(ctx: Any, grad_out: torch.Tensor | None, *_: Any) -> tuple[Any, ...]:
    if grad_out is None:  # no gradient reached the output (and none is materialised)
        return (None,) * 8
    grads = moe_mlp_backward_op(grad_out, *ctx.saved_tensors, *ctx.flags)
    return *grads, None, None, None, None


moe_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)
