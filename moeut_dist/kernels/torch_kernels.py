"""Expert compute in plain PyTorch: the path of CPUs and any device without Triton.

The same four functions as `triton_kernels`, with the same contract: the forward keeps nothing
(the custom ops in `ops` save only the inputs and the routing), and the backward recomputes the
gathered rows and hidden activations. The pairs are sorted by expert once per call; each expert
is then one dense matmul over a contiguous segment, written with `out=` into a buffer allocated
once for all experts, and each expert's weight gradient goes straight into its slice of the
preallocated gradient (no per-expert tensors to stack). Outputs and input gradients are
scatter-added with `index_add_`, which is deterministic on CPU.

`torch.bincount(...).tolist()` sizes the segments: one host sync per call, which is inside the
custom op, hence invisible to `torch.compile` (no graph break, no recompile as routing changes).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moeut_dist.kernels.reference import group_by_expert


class _Segments:
    """Pairs grouped by expert: `order` sorts them, `spans` are (expert, start, end) of every
    expert that has pairs, in sorted position."""

    def __init__(self, experts: torch.Tensor, n_experts: int) -> None:
        self.order, counts = group_by_expert(experts, n_experts)
        self.spans: list[tuple[int, int, int]] = []
        start = 0
        for expert, count in enumerate(counts):
            if count:
                self.spans.append((expert, start, start + count))
            start += count

    def __iter__(self) -> Iterator[tuple[int, slice]]:
        return ((expert, slice(start, end)) for expert, start, end in self.spans)

    def weight_gradient(self, weight: torch.Tensor) -> torch.Tensor:
        """An uninitialised gradient for `weight` [E, ...], zero for the experts without pairs:
        the others are written whole (a full-size zero fill costs as much as a small matmul)."""
        grad = torch.empty_like(weight)
        for expert in set(range(weight.shape[0])).difference(e for e, _, _ in self.spans):
            grad[expert].zero_()
        return grad


def _sorted_gates(gates: torch.Tensor, order: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return gates[order, None].to(dtype)


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    n_out_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, inputs): out[out_rows[p]] += gates[p] · x[in_rows[p]] @ weight[experts[p]], and the
    gathered input rows [P, d_in] in sorted order, kept for the backward."""
    segments = _Segments(experts, weight.shape[0])
    inputs = x.index_select(0, in_rows[segments.order])
    products = inputs.new_empty(inputs.shape[0], weight.shape[2])
    for expert, pairs in segments:
        torch.mm(inputs[pairs], weight[expert], out=products[pairs])
    products.mul_(_sorted_gates(gates, segments.order, products.dtype))
    out = x.new_zeros(n_out_rows, weight.shape[2])
    return out.index_add_(0, out_rows[segments.order], products), inputs


def linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    inputs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_gates) of `linear_forward`, given the inputs it returned."""
    segments = _Segments(experts, weight.shape[0])
    grads = grad_out.index_select(0, out_rows[segments.order])
    back = inputs.new_empty(inputs.shape)
    for expert, pairs in segments:
        torch.mm(grads[pairs], weight[expert].T, out=back[pairs])
    grad_gates = torch.empty_like(gates)
    grad_gates[segments.order] = (back * inputs).sum(1).to(gates.dtype)
    pair_gates = _sorted_gates(gates, segments.order, x.dtype)
    back.mul_(pair_gates)
    grads.mul_(pair_gates)
    grad_weight = segments.weight_gradient(weight)
    for expert, pairs in segments:
        torch.mm(inputs[pairs].T, grads[pairs], out=grad_weight[expert])
    grad_x = torch.zeros_like(x).index_add_(0, in_rows[segments.order], back)
    return grad_x, grad_weight, grad_gates


def mlp_forward(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, inputs, hidden): out[rows[p]] += gates[p] · relu(x[rows[p]] @ up[e]) @ down[e],
    e = experts[p], and what the backward needs, in sorted order: the gathered input rows
    [P, d] and the ReLU outputs [P, m]."""
    segments = _Segments(experts, up.shape[0])
    sorted_rows = rows[segments.order]
    inputs = x.index_select(0, sorted_rows)
    hidden = inputs.new_empty(inputs.shape[0], up.shape[2])
    for expert, pairs in segments:
        torch.mm(inputs[pairs], up[expert], out=hidden[pairs])
    hidden.relu_()
    # Gated before the down-projection: m values per pair to scale instead of d.
    gated_hidden = hidden * _sorted_gates(gates, segments.order, hidden.dtype)
    products = inputs.new_empty(inputs.shape[0], down.shape[2])
    for expert, pairs in segments:
        torch.mm(gated_hidden[pairs], down[expert], out=products[pairs])
    out = x.new_zeros(x.shape[0], down.shape[2])
    return out.index_add_(0, sorted_rows, products), inputs, hidden


def mlp_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
    inputs: torch.Tensor,
    hidden: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_up, grad_down, grad_gates) of `mlp_forward`, given the inputs and hidden
    activations it returned."""
    segments = _Segments(experts, up.shape[0])
    sorted_rows = rows[segments.order]
    grads = grad_out.index_select(0, sorted_rows)
    grad_hidden = hidden.new_empty(hidden.shape)
    for expert, pairs in segments:
        torch.mm(grads[pairs], down[expert].T, out=grad_hidden[pairs])
    grad_gates = torch.empty_like(gates)
    grad_gates[segments.order] = (grad_hidden * hidden).sum(1).to(gates.dtype)
    pair_gates = _sorted_gates(gates, segments.order, x.dtype)
    # ReLU's gradient mask read from its output (hidden > 0 ⇔ pre > 0), fused with the gating.
    grad_pre = torch.ops.aten.threshold_backward(grad_hidden.mul_(pair_gates), hidden, 0)
    gated_hidden = hidden * pair_gates
    grad_inputs = inputs.new_empty(inputs.shape)
    grad_up, grad_down = segments.weight_gradient(up), segments.weight_gradient(down)
    for expert, pairs in segments:
        torch.mm(grad_pre[pairs], up[expert].T, out=grad_inputs[pairs])
        torch.mm(inputs[pairs].T, grad_pre[pairs], out=grad_up[expert])
        torch.mm(gated_hidden[pairs].T, grads[pairs], out=grad_down[expert])
    grad_x = torch.zeros_like(x).index_add_(0, sorted_rows, grad_inputs)
    return grad_x, grad_up, grad_down, grad_gates
