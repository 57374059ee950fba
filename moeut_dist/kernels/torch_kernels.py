"""Expert compute in plain PyTorch: the path of CPUs and any device without Triton.

The same four functions as `triton_kernels`, with the same contract, except that the σ-MoE
forward returns its hidden activations [P, m] for the backward (see `ops`): recomputing them
would cost one more matmul per expert, and these small matmuls are where the time goes.

The pairs are sorted by expert once per call and laid out per expert (`_layout`). When the
routing is balanced, as it normally is, each expert's rows are padded to the largest expert's
count and every product is one `bmm` over all experts. That parallelises across experts, where
a loop of ~40-row matmuls splits each tiny GEMM over the threads (and, on a busy machine, waits
for all of them once per expert). Padding rows read zeros and scatter into a discarded row, so
they change nothing. On one CPU thread a `bmm` is the same loop of matmuls plus the padding,
and a routing concentrated on a few experts would make the padded layout up to E times the
pairs: then the rows stay unpadded and each expert is one matmul over its contiguous segment.
Outputs and input gradients are scatter-added with `index_add_`, which is deterministic on CPU.

`torch.bincount(...).tolist()` sizes the layout: one host sync per call, which is inside the
custom op, hence invisible to `torch.compile` (no graph break, no recompile as routing changes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeut_dist.kernels.reference import group_by_expert

# The padded layout is used while it holds at most this many rows per pair. Balanced routings
# pad by 15-35 % at the MoEUT shapes; on 2 CPU threads a bmm ran 1.5-1.6× faster than the loop
# of per-expert matmuls it replaces (bench/kernels.py shapes), so more padding than that loses.
MAX_PADDING = 1.5


class _Sorted:
    """Pairs sorted by expert, unpadded: [P, ·], expert by expert. Per-pair data is in this
    order already, and each product is a loop of one matmul per expert."""

    def __init__(self, order: torch.Tensor, counts: list[int]) -> None:
        self.order, self.counts = order, counts

    def gather(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x[rows[p]] for every pair p, in layout order."""
        return x.index_select(0, rows[self.order])

    def scatter(self, values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
        """out[rows[p]] += values of pair p: [n_rows, w]."""
        out = values.new_zeros(n_rows, values.shape[-1])
        return out.index_add_(0, rows[self.order], values)

    def per_pair(self, sorted_values: torch.Tensor) -> torch.Tensor:
        """Values given per pair in sorted order, in layout order (zero at padding)."""
        return sorted_values

    def sorted(self, values: torch.Tensor) -> torch.Tensor:
        """The inverse of `per_pair`."""
        return values

    def matmul(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rows of expert e @ weight[e], for every e."""
        out = rows.new_empty(rows.shape[0], weight.shape[2])
        segments = rows.split(self.counts), weight.unbind(0), out.split(self.counts)
        for r, w, o in zip(*segments, strict=True):
            torch.mm(r, w, out=o)
        return out

    def weight_grad(self, rows: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(rows of expert e)ᵀ @ grads of expert e, for every e: [E, ·, ·]; zero for the
        experts without pairs (a matmul over no rows writes zeros)."""
        out = rows.new_empty(len(self.counts), rows.shape[1], grads.shape[1])
        segments = rows.split(self.counts), grads.split(self.counts), out.unbind(0)
        for r, g, o in zip(*segments, strict=True):
            torch.mm(r.T, g, out=o)
        return out


class _Padded:
    """[E, capacity, ·]: expert e's pairs fill the first counts[e] rows of block e in sorted
    order, the rest is padding that gathers a zero row and scatters into a discarded one. The
    same methods as `_Sorted`."""

    def __init__(self, order: torch.Tensor, counts: list[int], experts: torch.Tensor) -> None:
        self.order, self.counts = order, counts
        self.capacity = max(counts)
        sorted_experts = experts[order]
        count_tensor = torch.tensor(counts, device=experts.device)
        first_pair = count_tensor.cumsum(0) - count_tensor
        rank = torch.arange(len(order), device=experts.device) - first_pair[sorted_experts]
        self.slots = sorted_experts * self.capacity + rank  # of each sorted pair

    def _slot_rows(self, rows: torch.Tensor, padding_row: int) -> torch.Tensor:
        slot_rows = rows.new_full((len(self.counts) * self.capacity,), padding_row)
        slot_rows[self.slots] = rows[self.order]
        return slot_rows

    def gather(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with_zero_row = F.pad(x, (0, 0, 0, 1))
        gathered = with_zero_row.index_select(0, self._slot_rows(rows, x.shape[0]))
        return gathered.view(len(self.counts), self.capacity, x.shape[1])

    def scatter(self, values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
        out = values.new_zeros(n_rows + 1, values.shape[-1])
        out.index_add_(0, self._slot_rows(rows, n_rows), values.flatten(0, 1))
        return out[:n_rows]

    def per_pair(self, sorted_values: torch.Tensor) -> torch.Tensor:
        rest = sorted_values.shape[1:]
        padded = sorted_values.new_zeros(len(self.counts) * self.capacity, *rest)
        padded.index_copy_(0, self.slots, sorted_values)
        return padded.view(len(self.counts), self.capacity, *rest)

    def sorted(self, values: torch.Tensor) -> torch.Tensor:
        return values.flatten(0, 1).index_select(0, self.slots)

    def matmul(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.bmm(rows, weight)

    def weight_grad(self, rows: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return torch.bmm(rows.mT, grads)


Layout = _Sorted | _Padded


def _layout(experts: torch.Tensor, n_experts: int) -> Layout:
    order, counts = group_by_expert(experts, n_experts)
    batched = experts.device.type != "cpu" or torch.get_num_threads() > 1
    if batched and n_experts * max(counts) <= MAX_PADDING * len(order):
        return _Padded(order, counts, experts)
    return _Sorted(order, counts)


def _gates(layout: Layout, gates: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each pair's gate, in layout order, shaped to scale rows."""
    return layout.per_pair(gates[layout.order].to(dtype))[..., None]


def _gate_gradient(layout: Layout, gates: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    """The gates' gradient from row-wise dot products in layout order (padding is dropped)."""
    grad_gates = torch.empty_like(gates)
    grad_gates[layout.order] = layout.sorted(per_row.sum(-1)).to(gates.dtype)
    return grad_gates


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    n_out_rows: int,
) -> torch.Tensor:
    """out[out_rows[p]] += gates[p] · x[in_rows[p]] @ weight[experts[p]]."""
    layout = _layout(experts, weight.shape[0])
    products = layout.matmul(layout.gather(x, in_rows), weight)
    products.mul_(_gates(layout, gates, products.dtype))
    return layout.scatter(products, out_rows, n_out_rows)


def linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_gates) of `linear_forward`."""
    layout = _layout(experts, weight.shape[0])
    inputs = layout.gather(x, in_rows)
    grads = layout.gather(grad_out, out_rows)
    back = layout.matmul(grads, weight.mT)
    grad_gates = _gate_gradient(layout, gates, back * inputs)
    pair_gates = _gates(layout, gates, x.dtype)
    grad_weight = layout.weight_grad(inputs, grads.mul_(pair_gates))
    grad_x = layout.scatter(back.mul_(pair_gates), in_rows, x.shape[0])
    return grad_x, grad_weight, grad_gates


def mlp_forward(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, hidden): out[rows[p]] += gates[p] · relu(x[rows[p]] @ up[e]) @ down[e],
    e = experts[p], and the ReLU outputs [P, m] in sorted order, for the backward."""
    layout = _layout(experts, up.shape[0])
    hidden = layout.matmul(layout.gather(x, rows), up).relu_()
    # Gated before the down-projection: m values per pair to scale instead of d.
    products = layout.matmul(hidden * _gates(layout, gates, hidden.dtype), down)
    return layout.scatter(products, rows, x.shape[0]), layout.sorted(hidden)


def mlp_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
    hidden: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_up, grad_down, grad_gates) of `mlp_forward`, given its hidden output."""
    layout = _layout(experts, up.shape[0])
    inputs = layout.gather(x, rows)
    grads = layout.gather(grad_out, rows)
    hidden = layout.per_pair(hidden)
    grad_hidden = layout.matmul(grads, down.mT)
    grad_gates = _gate_gradient(layout, gates, grad_hidden * hidden)
    pair_gates = _gates(layout, gates, x.dtype)
    # ReLU's gradient mask read from its output (hidden > 0 ⇔ pre > 0), fused with the gating.
    grad_pre = torch.ops.aten.threshold_backward(grad_hidden.mul_(pair_gates), hidden, 0)
    grad_up = layout.weight_grad(inputs, grad_pre)
    grad_down = layout.weight_grad(hidden * pair_gates, grads)
    grad_x = layout.scatter(layout.matmul(grad_pre, up.mT), rows, x.shape[0])
    return grad_x, grad_up, grad_down, grad_gates
