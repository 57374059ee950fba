"""Expert compute in plain PyTorch: the path of CPUs and any device without Triton.

The same four operations as `triton_kernels`, and two things more that the forward hands to
the backward (see `ops`): its layout of the pairs, so that the backward does not sort again,
and the narrow activations that make the backward cheaper than recomputing them: σ-MoE's ReLU
outputs (recomputing them would cost one more matmul per expert, and these small matmuls are
where the time goes), and the ungated products of a projection whose output is narrower than
its input (SwitchHead's V: its gate gradient is then a dot product over d_out, not d_in).

The pairs are laid out per expert once per forward (`_Layout.of`). Every product is one `bmm`
over a block of rows per expert, which parallelises across experts where a loop of ~40-row
matmuls splits each tiny GEMM over the threads (and, on a busy machine, waits for all of them
once per expert). Padding every block to the largest expert's count would add 15-45 % rows to
a balanced routing, so the blocks are smaller than that and the few experts that overflow them
get one matmul each over their remaining rows: `_capacity` weighs those matmuls against the
padding. Padding rows read zeros and scatter into a discarded row, so they change nothing. On
one CPU thread a `bmm` is the same loop of matmuls plus the padding: there are no blocks, and
each expert is one matmul over its contiguous rows.
Outputs and input gradients are scatter-added with `index_add_`, which is deterministic on CPU.

Gates scale whichever side of a product is narrower (σ-MoE: the m hidden units, not the d
outputs), so every elementwise pass runs over the narrow rows.

The layout is computed on the host from the expert ids: one copy to the host per call (a sync
on a GPU), inside the custom op, hence invisible to `torch.compile` (no graph break, no
recompile as the routing changes).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# A layout may hold at most this many rows per pair, which bounds what a forward keeps
# (`kept_rows`). Blocks as large as the largest expert pad balanced routings by 15-45 % at the
# MoEUT shapes; more padding than this was slower than one matmul per expert (bench/kernels.py
# shapes, 2 CPU threads).
MAX_PADDING = 1.5

# What one overflowing expert's extra matmul costs, in rows of a block `bmm`: the call, and
# reading the expert's weight once more (measured at the MoEUT-44M shapes, 2 CPU threads).
OVERFLOW_MATMUL_ROWS = 32


def kept_rows(n_pairs: int) -> int:
    """Rows of the activations a forward keeps for its backward: as many as any layout of
    `n_pairs` pairs may have, so that their shape does not depend on the routing (a
    routing-dependent shape would break `torch.compile`'s graph at every expert op)."""
    return max(n_pairs, math.floor(MAX_PADDING * n_pairs))


class _Layout:
    """Where each pair's rows sit for the per-expert products, and those products.

    Expert e's first `capacity` pairs fill block e of a [E, capacity, ·] region, padded up to
    capacity with rows that read zeros and scatter into a discarded row; its pairs beyond
    capacity, its overflow, follow all the blocks, expert by expert. A product is one `bmm` over
    the blocks and one matmul per overflowing expert. Capacity 0 is the plain sort by expert:
    one matmul per expert. Within a block or an overflow the rows are in pair order.

    `slots[p]` is the layout row of pair p (pairs in the caller's order); per-row tensors in the
    layout have `n_rows` rows.
    """

    def __init__(self, counts: np.ndarray, capacity: int, slots: torch.Tensor) -> None:
        self.counts, self.capacity, self.slots = counts.tolist(), capacity, slots
        self.n_experts = len(counts)
        self.n_blocked = self.n_experts * capacity
        overflow = np.maximum(counts - capacity, 0)
        ends = self.n_blocked + np.cumsum(overflow)
        self.overflow_start = ends - overflow  # of each expert's overflow rows
        self.n_rows = int(ends[-1]) if self.n_experts else 0
        bounds = zip(self.overflow_start.tolist(), ends.tolist(), strict=True)
        self.overflowing = [  # (e, expert e's overflow rows) for each expert with some
            (e, slice(start, end)) for e, (start, end) in enumerate(bounds) if end > start
        ]

    @classmethod
    def of(cls, experts: torch.Tensor, n_experts: int) -> _Layout:
        """The pairs sorted by expert (stably) and laid out at the capacity `_capacity` picks.

        Computed on the host, which needs the layout's sizes anyway: at a few thousand pairs,
        numpy's ops take microseconds where torch's CPU ops take tens (a stable sort of
        integers of at most 16 bits is a radix sort in numpy, a comparison sort in torch).
        """
        ids = _host_ids(experts, n_experts)
        counts = np.bincount(ids, minlength=n_experts)
        capacity = _capacity(counts, experts.device)
        layout = cls(counts, capacity, experts.new_empty(0))  # slots follow from its overflows
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        rank = np.arange(len(ids)) - (np.cumsum(counts) - counts)[sorted_ids]  # within its expert
        first_row = np.where(
            rank < capacity,
            sorted_ids.astype(np.int64) * capacity,
            layout.overflow_start[sorted_ids] - capacity,
        )
        slots = np.empty_like(rank)
        slots[order] = first_row + rank
        layout.slots = torch.from_numpy(slots).to(experts.device)
        return layout

    @classmethod
    def from_plan(cls, plan: torch.Tensor, experts: torch.Tensor, n_experts: int) -> _Layout:
        """The layout `of` made in the forward, from its `plan()`."""
        counts = np.bincount(_host_ids(experts, n_experts), minlength=n_experts)
        return cls(counts, int(plan[-1]), plan[:-1])

    def plan(self) -> torch.Tensor:
        """The layout as one int64 tensor [P + 1] (the slots, then the capacity), for the
        backward to rebuild it with `from_plan` instead of sorting again."""
        return torch.cat([self.slots, self.slots.new_tensor([self.capacity])])

    def index(self, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
        """For each layout row, the row of a [n_rows, ·] tensor it holds; padding rows hold
        row n_rows (a zero row when gathering, a discarded one when scattering)."""
        index = rows.new_full((self.n_rows,), n_rows)
        return index.index_copy_(0, self.slots, rows)

    def gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x[index]: each pair's row of x at its slot."""
        if self.n_rows == len(self.slots):  # no padding rows, so no zero row to append
            return x.index_select(0, index)
        return F.pad(x, (0, 0, 0, 1)).index_select(0, index)

    def scatter(self, values: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
        """out[index[r]] += values[r]: [n_rows, ·]."""
        out = values.new_zeros(n_rows + 1, values.shape[1])
        return out.index_add_(0, index, values)[:n_rows]

    def per_pair(self, values: torch.Tensor) -> torch.Tensor:
        """One value per pair ([P], pair order) at its slot, [n_rows, 1] to scale rows; zero
        at padding."""
        return values.new_zeros(self.n_rows).index_copy_(0, self.slots, values)[:, None]

    def pair_values(self, values: torch.Tensor) -> torch.Tensor:
        """The inverse of `per_pair`: [P], pair order."""
        return values.index_select(0, self.slots)

    def matmul(
        self, rows: torch.Tensor, weight: torch.Tensor, reuse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows of expert e @ weight[e], for every e. Written into `reuse`, a tensor the caller
        is done with, if it has the product's shape: its memory is still in cache, where a
        fresh one would be fetched from RAM to be overwritten."""
        shape = (self.n_rows, weight.shape[2])
        out = reuse if reuse is not None and reuse.shape == shape else rows.new_empty(shape)
        self._matmul_into(rows, weight, out)
        return out

    def matmul_kept(
        self, rows: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`matmul` into the first rows of a [kept_rows(P), ·] tensor (the rest zero), for the
        backward to take back with `from_kept`: (the product, that tensor)."""
        kept = rows.new_empty(kept_rows(len(self.slots)), weight.shape[2])
        kept[self.n_rows :].zero_()
        out = self.from_kept(kept)
        self._matmul_into(rows, weight, out)
        return out, kept

    def from_kept(self, kept: torch.Tensor) -> torch.Tensor:
        """The product `matmul_kept` wrote into `kept`."""
        return kept[: self.n_rows]

    def weight_grad(self, rows: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(rows of expert e)ᵀ @ grads of expert e, for every e: [E, ·, ·]; zero for the
        experts without pairs."""
        if not self.capacity:  # a matmul per expert (over no rows: zeros)
            out = rows.new_empty(self.n_experts, rows.shape[1], grads.shape[1])
            segments = rows.split(self.counts), grads.split(self.counts), out.unbind(0)
            for expert_rows, expert_grads, expert_out in zip(*segments, strict=True):
                torch.mm(expert_rows.T, expert_grads, out=expert_out)
            return out
        out = torch.bmm(self._blocks(rows).mT, self._blocks(grads))
        for expert, span in self.overflowing:
            out[expert].addmm_(rows[span].T, grads[span])
        return out

    def _matmul_into(self, rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        if not self.capacity:  # a matmul per expert; one split per tensor, not E slices
            segments = rows.split(self.counts), weight.unbind(0), out.split(self.counts)
            for expert_rows, expert_weight, expert_out in zip(*segments, strict=True):
                torch.mm(expert_rows, expert_weight, out=expert_out)
            return
        torch.bmm(self._blocks(rows), weight, out=self._blocks(out))
        for expert, span in self.overflowing:
            torch.mm(rows[span], weight[expert], out=out[span])

    def _blocks(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[: self.n_blocked].view(self.n_experts, self.capacity, rows.shape[1])


def _host_ids(experts: torch.Tensor, n_experts: int) -> np.ndarray:
    """The expert ids on the host, in the smallest integer type that holds them."""
    return experts.cpu().numpy().astype(np.min_scalar_type(n_experts))


def _capacity(counts: np.ndarray, device: torch.device) -> int:
    """The block capacity that costs the fewest rows, each overflowing expert's matmul counted
    as OVERFLOW_MATMUL_ROWS more, among those within MAX_PADDING rows per pair (0 always is).
    On one CPU thread, where a `bmm` is a loop of matmuls too, the padding is pure loss: 0.

    Between two counts the rows grow with the capacity, so the best is 0 or one of the counts.
    """
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return 0
    candidates = np.unique(np.append(counts, 0))  # ascending: ties go to the smaller
    overflow = np.maximum(counts - candidates[:, None], 0)
    rows = len(counts) * candidates + overflow.sum(1)
    cost = rows + OVERFLOW_MATMUL_ROWS * np.count_nonzero(overflow, axis=1)
    allowed = rows <= MAX_PADDING * counts.sum()
    return int(candidates[np.argmin(np.where(allowed, cost, np.inf))])


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
    layout = _Layout.of(experts, weight.shape[0])
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
    layout = _Layout.from_plan(plan, experts, weight.shape[0])
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
    layout = _Layout.of(experts, up.shape[0])
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
    layout = _Layout.from_plan(plan, experts, up.shape[0])
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
