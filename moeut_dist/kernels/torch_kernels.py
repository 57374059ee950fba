"""Expert compute in plain PyTorch: the path of CPUs and any device without Triton.

The same four operations as `triton_kernels`, and two things more that the forward hands to
the backward (see `ops`): its layout of the pairs, so that the backward does not sort again,
and the narrow activations that make the backward cheaper than recomputing them: σ-MoE's ReLU
outputs (recomputing them would cost one more matmul per expert, and these small matmuls are
where the time goes), and the ungated products of a projection whose output is narrower than
its input (SwitchHead's V: its gate gradient is then a dot product over d_out, not d_in).

The pairs are laid out per expert once per forward (`_layout`). When the routing is balanced,
as it normally is, each expert's rows are padded to the largest expert's count and every
product is one `bmm` over all experts. That parallelises across experts, where a loop of
~40-row matmuls splits each tiny GEMM over the threads (and, on a busy machine, waits for all
of them once per expert). Padding rows read zeros and scatter into a discarded row, so they
change nothing. On one CPU thread a `bmm` is the same loop of matmuls plus the padding, and a
routing concentrated on a few experts would make the padded layout up to E times the pairs:
then the rows stay unpadded and each expert is one matmul over its contiguous segment.
Outputs and input gradients are scatter-added with `index_add_`, which is deterministic on CPU.

Gates scale whichever side of a product is narrower (σ-MoE: the m hidden units, not the d
outputs), so every elementwise pass runs over the narrow rows.

`torch.bincount(...).tolist()` sizes the layout: one host sync per call, which is inside the
custom op, hence invisible to `torch.compile` (no graph break, no recompile as routing changes).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

# The padded layout is used while it holds at most this many rows per pair. Balanced routings
# pad by 15-45 % at the MoEUT shapes; on 2 CPU threads a bmm ran 1.5-1.6× faster than the loop
# of per-expert matmuls it replaces (bench/kernels.py shapes), so more padding than that loses.
MAX_PADDING = 1.5


def kept_rows(n_pairs: int) -> int:
    """Rows of the activations a forward keeps for its backward: as many as any layout of
    `n_pairs` pairs may have, so that their shape does not depend on the routing (a
    routing-dependent shape would break `torch.compile`'s graph at every expert op)."""
    return max(n_pairs, math.floor(MAX_PADDING * n_pairs))


class _Layout(ABC):
    """Where each pair's rows sit for the per-expert products: `slots[p]` is the layout row of
    pair p (pairs in the caller's order), the rows of each expert contiguous and in pair order.
    Per-row tensors in the layout have `n_rows` rows, shaped by `shaped`."""

    capacity = 0  # rows per expert when padded; 0: unpadded

    def __init__(self, slots: torch.Tensor, counts: list[int], n_rows: int) -> None:
        self.slots, self.counts, self.n_rows = slots, counts, n_rows

    def plan(self) -> torch.Tensor:
        """The layout as one int64 tensor [P + 1] (the slots, then the capacity), for the
        backward to rebuild it with `_from_plan` instead of sorting again."""
        return torch.cat([self.slots, self.slots.new_tensor([self.capacity])])

    def shaped(self, rows: torch.Tensor) -> torch.Tensor:
        """Layout rows [n_rows, w] as the products take them."""
        return rows

    def index(self, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
        """For each layout row, the row of a [n_rows, ·] tensor it holds; padding rows hold
        row n_rows (a zero row when gathering, a discarded one when scattering)."""
        index = rows.new_full((self.n_rows,), n_rows)
        return index.index_copy_(0, self.slots, rows)

    def gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x[index], shaped: each pair's row of x at its slot."""
        with_zero_row = F.pad(x, (0, 0, 0, 1))
        return self.shaped(with_zero_row.index_select(0, index))

    def scatter(self, values: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
        """out[index[r]] += values of layout row r: [n_rows, w]."""
        width = values.shape[-1]
        out = values.new_zeros(n_rows + 1, width)
        return out.index_add_(0, index, values.reshape(-1, width))[:n_rows]

    def per_pair(self, values: torch.Tensor) -> torch.Tensor:
        """One value per pair ([P], pair order) at its slot, shaped to scale rows; zero at
        padding."""
        at_slots = values.new_zeros(self.n_rows).index_copy_(0, self.slots, values)
        return self.shaped(at_slots[:, None])

    def pair_values(self, values: torch.Tensor) -> torch.Tensor:
        """The inverse of `per_pair`: [P], pair order."""
        return values.reshape(-1).index_select(0, self.slots)

    def matmul(
        self, rows: torch.Tensor, weight: torch.Tensor, reuse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows of expert e @ weight[e], for every e. Written into `reuse`, a tensor the caller
        is done with, if it has the product's shape: its memory is still in cache, where a
        fresh one would be fetched from RAM to be overwritten."""
        shape = (*rows.shape[:-1], weight.shape[2])
        out = reuse if reuse is not None and reuse.shape == shape else rows.new_empty(shape)
        self.matmul_into(rows, weight, out)
        return out

    def matmul_kept(
        self, rows: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`matmul` into the first rows of a [kept_rows(P), ·] tensor (the rest zero), for the
        backward to take back with `from_kept`: (the product, that tensor)."""
        kept = rows.new_empty(kept_rows(len(self.slots)), weight.shape[2])
        kept[self.n_rows :].zero_()
        out = self.from_kept(kept)
        self.matmul_into(rows, weight, out)
        return out, kept

    def from_kept(self, kept: torch.Tensor) -> torch.Tensor:
        """The product `matmul_kept` wrote into `kept`."""
        return self.shaped(kept[: self.n_rows])

    @abstractmethod
    def matmul_into(self, rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        """`matmul`, written into out."""

    @abstractmethod
    def weight_grad(self, rows: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(rows of expert e)ᵀ @ grads of expert e, for every e: [E, ·, ·]; zero for the
        experts without pairs."""


class _Sorted(_Layout):
    """[P, ·], expert by expert, unpadded; each product is a loop of one matmul per expert."""

    def __init__(self, slots: torch.Tensor, counts: list[int]) -> None:
        super().__init__(slots, counts, len(slots))

    def gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, index)  # no padding rows, so no zero row to append

    def matmul_into(self, rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        segments = rows.split(self.counts), weight.unbind(0), out.split(self.counts)
        for r, w, o in zip(*segments, strict=True):
            torch.mm(r, w, out=o)

    def weight_grad(self, rows: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        out = rows.new_empty(len(self.counts), rows.shape[1], grads.shape[1])
        segments = rows.split(self.counts), grads.split(self.counts), out.unbind(0)
        for r, g, o in zip(*segments, strict=True):
            torch.mm(r.T, g, out=o)  # a matmul over no rows writes zeros
        return out


class _Padded(_Layout):
    """[E, capacity, ·]: expert e's pairs fill the first counts[e] rows of block e, the rest is
    padding; each product is one `bmm`."""

    def __init__(self, slots: torch.Tensor, counts: list[int], capacity: int) -> None:
        super().__init__(slots, counts, len(counts) * capacity)
        self.capacity = capacity

    def shaped(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(len(self.counts), self.capacity, *rows.shape[1:])

    def matmul_into(self, rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        torch.bmm(rows, weight, out=out)

    def weight_grad(self, rows: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return torch.bmm(rows.mT, grads)


def _counts(experts: torch.Tensor, n_experts: int) -> list[int]:
    return torch.bincount(experts, minlength=n_experts).tolist()


def _layout(experts: torch.Tensor, n_experts: int) -> _Layout:
    """Sorts the pairs by expert (stably) and lays them out, padded if that pays."""
    counts = _counts(experts, n_experts)
    sorted_experts, order = torch.sort(experts, stable=True)
    capacity = max(counts, default=0)
    batched = experts.device.type != "cpu" or torch.get_num_threads() > 1
    padded = batched and capacity > 0 and n_experts * capacity <= MAX_PADDING * len(order)
    # The i-th sorted pair sits at row i unpadded; padded, its expert's block starts at
    # e·capacity instead of at e's first sorted pair, which shifts it by the difference.
    slot_in_sort_order = torch.arange(len(order), device=experts.device)
    if padded:
        count_tensor = torch.tensor(counts, device=experts.device)
        first_pair = count_tensor.cumsum(0) - count_tensor
        shift = torch.arange(n_experts, device=experts.device) * capacity - first_pair
        slot_in_sort_order += shift[sorted_experts]
    slots = torch.empty_like(order).index_copy_(0, order, slot_in_sort_order)
    return _Padded(slots, counts, capacity) if padded else _Sorted(slots, counts)


def _from_plan(plan: torch.Tensor, experts: torch.Tensor, n_experts: int) -> _Layout:
    """The layout `_layout` made in the forward, from its `plan()`."""
    slots, capacity = plan[:-1], int(plan[-1])
    counts = _counts(experts, n_experts)
    return _Padded(slots, counts, capacity) if capacity else _Sorted(slots, counts)


def keeps_products(weight: torch.Tensor) -> bool:
    """Whether `linear_forward` keeps its products: when d_out < d_in."""
    return weight.shape[2] < weight.shape[1]


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    n_out_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, products, plan): out[out_rows[p]] += gates[p] · x[in_rows[p]] @ weight[experts[p]];
    the ungated products as `matmul_kept` keeps them if `keeps_products(weight)` (else empty),
    and the layout's plan."""
    layout = _layout(experts, weight.shape[0])
    inputs = layout.gather(x, layout.index(in_rows, x.shape[0]))
    pair_gates = layout.per_pair(gates.to(x.dtype))
    out_index = layout.index(out_rows, n_out_rows)
    if keeps_products(weight):
        products, kept = layout.matmul_kept(inputs, weight)
        out = layout.scatter(products * pair_gates, out_index, n_out_rows)
        return out, kept, layout.plan()
    out = layout.scatter(layout.matmul(inputs.mul_(pair_gates), weight), out_index, n_out_rows)
    return out, x.new_empty(0, weight.shape[2]), layout.plan()


def linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    products: torch.Tensor,
    plan: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_gates) of `linear_forward`, given what it returned."""
    layout = _from_plan(plan, experts, weight.shape[0])
    in_index = layout.index(in_rows, x.shape[0])
    inputs = layout.gather(x, in_index)
    grads = layout.gather(grad_out, layout.index(out_rows, grad_out.shape[0]))
    pair_gates = layout.per_pair(gates.to(x.dtype))
    if keeps_products(weight):  # everything elementwise over the d_out-wide rows
        per_row = grads * layout.from_kept(products)
        grads.mul_(pair_gates)
        grad_weight = layout.weight_grad(inputs, grads)
        back = layout.matmul(grads, weight.mT, reuse=inputs)
    else:  # over the d_in-wide rows
        back = layout.matmul(grads, weight.mT)
        per_row = back * inputs
        grad_weight = layout.weight_grad(inputs.mul_(pair_gates), grads)
        back.mul_(pair_gates)
    grad_gates = layout.pair_values(per_row.sum(-1)).to(gates.dtype)
    return layout.scatter(back, in_index, x.shape[0]), grad_weight, grad_gates


def mlp_forward(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, hidden, plan): out[rows[p]] += gates[p] · relu(x[rows[p]] @ up[e]) @ down[e],
    e = experts[p]; the ReLU outputs as `matmul_kept` keeps them, and the layout's plan."""
    layout = _layout(experts, up.shape[0])
    index = layout.index(rows, x.shape[0])
    inputs = layout.gather(x, index)
    hidden, kept = layout.matmul_kept(inputs, up)
    hidden.relu_()
    gated = hidden * layout.per_pair(gates.to(hidden.dtype))
    out = layout.scatter(layout.matmul(gated, down, reuse=inputs), index, x.shape[0])
    return out, kept, layout.plan()


def mlp_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
    hidden: torch.Tensor,
    plan: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_up, grad_down, grad_gates) of `mlp_forward`, given what it returned."""
    layout = _from_plan(plan, experts, up.shape[0])
    index = layout.index(rows, x.shape[0])
    inputs, grads = layout.gather(x, index), layout.gather(grad_out, index)
    hidden = layout.from_kept(hidden)
    pair_gates = layout.per_pair(gates.to(x.dtype))
    grad_hidden = layout.matmul(grads, down.mT)
    grad_gates = layout.pair_values((grad_hidden * hidden).sum(-1)).to(gates.dtype)
    # ReLU's gradient mask read from its output (hidden > 0 ⇔ pre > 0), in place after gating.
    grad_pre = torch.ops.aten.threshold_backward.grad_input(
        grad_hidden.mul_(pair_gates), hidden, 0, grad_input=grad_hidden
    )
    grad_up = layout.weight_grad(inputs, grad_pre)
    grad_down = layout.weight_grad(hidden * pair_gates, grads)
    grad_x = layout.scatter(layout.matmul(grad_pre, up.mT, reuse=inputs), index, x.shape[0])
    return grad_x, grad_up, grad_down, grad_gates
