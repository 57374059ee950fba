"""`torch.library` custom ops for grouped expert compute, with fake implementations and autograd.

Four ops: `moeut::moe_linear`, `moeut::moe_mlp` and their backward ops. Registering the
backward as ops too keeps `torch.compile` (including AOT autograd) tracing through both passes
without graph breaks. Per device:

- CUDA: the Triton kernels of `triton_kernels`.
- CPU: the pure-PyTorch path (`reference` forward, an explicit per-expert backward), except
  while the Triton interpreter is on (`TRITON_INTERPRET=1`), where the Triton kernels run on CPU
  tensors: that is how they are tested without a GPU.

`deterministic` is an op argument, so the choice is visible to the compiler. When true, outputs
and input gradients are reduced per row in a fixed order instead of by atomic adds; weight
gradients never use atomics.
"""

from __future__ import annotations

from typing import Any

import torch

from moeut_dist.kernels import reference, triton_kernels


def _runs_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or triton_kernels.INTERPRETING


def _pairs_of_each_expert(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, ...]:
    order, counts = reference.group_by_expert(experts, n_experts)
    return order.split(counts)


def _pytorch_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_weight = torch.zeros_like(x), torch.zeros_like(weight)
    grad_gates = torch.empty_like(gates)
    for expert, pairs in enumerate(_pairs_of_each_expert(experts, weight.shape[0])):
        inputs, grads = x[in_rows[pairs]], grad_out[out_rows[pairs]]
        pair_gates = gates[pairs, None].to(x.dtype)
        back = grads @ weight[expert].T
        grad_gates[pairs] = (back * inputs).sum(1).to(gates.dtype)
        grad_x.index_add_(0, in_rows[pairs], back * pair_gates)
        grad_weight[expert] = inputs.T @ (grads * pair_gates)
    return grad_x, grad_weight, grad_gates


def _pytorch_mlp_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_up, grad_down = torch.zeros_like(x), torch.zeros_like(up), torch.zeros_like(down)
    grad_gates = torch.empty_like(gates)
    for expert, pairs in enumerate(_pairs_of_each_expert(experts, up.shape[0])):
        inputs, grads = x[rows[pairs]], grad_out[rows[pairs]]
        pair_gates = gates[pairs, None].to(x.dtype)
        pre = inputs @ up[expert]
        hidden = torch.relu(pre)
        grad_hidden = grads @ down[expert].T
        grad_gates[pairs] = (grad_hidden * hidden).sum(1).to(gates.dtype)
        grad_pre = grad_hidden * pair_gates * (pre > 0)
        grad_x.index_add_(0, rows[pairs], grad_pre @ up[expert].T)
        grad_up[expert] = inputs.T @ grad_pre
        grad_down[expert] = (hidden * pair_gates).T @ grads
    return grad_x, grad_up, grad_down, grad_gates


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
    deterministic: bool,
) -> torch.Tensor:
    """out[out_rows[p]] += gates[p] · x[in_rows[p]] @ weight[experts[p]]."""
    if _runs_triton(x):
        return triton_kernels.linear_forward(
            x, weight, gates, experts, in_rows, out_rows, n_out_rows, deterministic
        )
    return reference.moe_linear(x, weight, gates, experts, in_rows, out_rows, n_out_rows)


@moe_linear_op.register_fake
def _(x, weight, gates, experts, in_rows, out_rows, n_out_rows, deterministic):
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
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_gates) of `moeut::moe_linear`."""
    if _runs_triton(x):
        return triton_kernels.linear_backward(
            grad_out, x, weight, gates, experts, in_rows, out_rows, deterministic
        )
    return _pytorch_linear_backward(grad_out, x, weight, gates, experts, in_rows, out_rows)


@moe_linear_backward_op.register_fake
def _(grad_out, x, weight, gates, experts, in_rows, out_rows, deterministic):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(gates)


def _linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, gates, experts, in_rows, out_rows, _, deterministic = inputs
    ctx.save_for_backward(x, weight, gates, experts, in_rows, out_rows)
    ctx.deterministic = deterministic


def _linear_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    grad_x, grad_weight, grad_gates = moe_linear_backward_op(
        grad_out, *ctx.saved_tensors, ctx.deterministic
    )
    return grad_x, grad_weight, grad_gates, None, None, None, None, None


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
    deterministic: bool,
) -> torch.Tensor:
    """out[rows[p]] += gates[p] · relu(x[rows[p]] @ up[e]) @ down[e], e = experts[p]."""
    if _runs_triton(x):
        return triton_kernels.mlp_forward(x, up, down, gates, experts, rows, deterministic)
    return reference.moe_mlp(x, up, down, gates, experts, rows)


@moe_mlp_op.register_fake
def _(x, up, down, gates, experts, rows, deterministic):
    return x.new_empty(x.shape[0], down.shape[2])


@torch.library.custom_op("moeut::moe_mlp_backward", mutates_args=())
def moe_mlp_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_up, grad_down, grad_gates) of `moeut::moe_mlp`; recomputes the hidden layer."""
    if _runs_triton(x):
        return triton_kernels.mlp_backward(
            grad_out, x, up, down, gates, experts, rows, deterministic
        )
    return _pytorch_mlp_backward(grad_out, x, up, down, gates, experts, rows)


@moe_mlp_backward_op.register_fake
def _(grad_out, x, up, down, gates, experts, rows, deterministic):
    return (
        torch.empty_like(x),
        torch.empty_like(up),
        torch.empty_like(down),
        torch.empty_like(gates),
    )


def _mlp_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    # Only the inputs are kept: the [pairs, m] hidden activations are recomputed in backward.
    *tensors, deterministic = inputs
    ctx.save_for_backward(*tensors)
    ctx.deterministic = deterministic


def _mlp_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    grads = moe_mlp_backward_op(grad_out, *ctx.saved_tensors, ctx.deterministic)
    return *grads, None, None, None


moe_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)
