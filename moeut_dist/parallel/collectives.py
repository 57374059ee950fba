"""The differentiable collectives of tensor and expert parallelism.

megatron-core's gather/scatter mappings allocate their outputs on `torch.cuda.current_device()`,
so they fail on CPU (gloo); these allocate on the input's device. Its all-reduce based mappings
are device-agnostic and wrapped as they are (`copy_to_tensor_region`, `reduce_from_tensor_region`).
`data_parallel_mean` reduces logged values.

Every collective here runs outside `torch.compile`'s graphs (`outside_compiled_graphs`): dynamo
fails on megatron-core's copy, an autograd Function that returns its input as is, and the
uneven all-to-alls take their split sizes as Python lists that change with every routing. A
compiled layer is therefore one graph per stretch between collectives, which is where a
parallel layout's communication happens anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

_Function = TypeVar("_Function", bound=Callable)


def outside_compiled_graphs(function: _Function) -> _Function:
    """`function` runs eagerly when called from code that `torch.compile` traces."""
    return torch.compiler.disable(function)


def _all_gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty(x.shape[0] * dist.get_world_size(group), *x.shape[1:])
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _own_chunk(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


class _SplitFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_chunk(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_first_dim(grad, ctx.group), None


class _GatherFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_chunk(grad, ctx.group, 0), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        gathered = _all_gather_first_dim(x.unsqueeze(0), group)
        return torch.cat(gathered.unbind(0), dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return _own_chunk(grad, ctx.group, -1), None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_counts: list[int], recv_counts: list[int], group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        out = x.new_empty(sum(recv_counts), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return _AllToAll.apply(grad, recv_counts, send_counts, ctx.group), None, None, None


def _row_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[rows, bytes]: each row the bytes of that row of every tensor, side by side."""
    return torch.cat(
        [
            t.reshape(t.shape[0], math.prod(t.shape[1:])).contiguous().view(torch.uint8)
            for t in tensors
        ],
        dim=1,
    )


def _from_row_bytes(rows: torch.Tensor, layout: list[tuple[torch.dtype, torch.Size]]):
    """The tensors `_row_bytes` packed, given each one's dtype and shape after the rows."""
    tensors, start = [], 0
    for dtype, tail in layout:
        width = math.prod(tail) * dtype.itemsize
        columns = rows[:, start : start + width].contiguous()
        tensors.append(columns.view(dtype).reshape(rows.shape[0], *tail))
        start += width
    return tensors


def _exchange_rows(rows: torch.Tensor, send_counts, recv_counts, group) -> torch.Tensor:
    out = rows.new_empty(sum(recv_counts), rows.shape[1])
    dist.all_to_all_single(out, rows, recv_counts, send_counts, group=group)
    return out


class _PackedAllToAll(torch.autograd.Function):
    """One uneven all-to-all for several row-aligned tensors of any dtypes, sent as bytes; the
    backward sends the floating-point ones' gradients back in one message too, with the split
    sizes of the forward."""

    @staticmethod
    def forward(ctx, send_counts: list[int], recv_counts: list[int], group, *tensors):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        ctx.layout = [(t.dtype, t.shape[1:]) for t in tensors]
        ctx.device = tensors[0].device
        rows = _exchange_rows(_row_bytes(list(tensors)), send_counts, recv_counts, group)
        received = _from_row_bytes(rows, ctx.layout)
        ctx.mark_non_differentiable(*(t for t in received if not t.is_floating_point()))
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads):
        send_counts, recv_counts = ctx.counts
        floating = [i for i, (dtype, _) in enumerate(ctx.layout) if dtype.is_floating_point]
        n_rows = sum(recv_counts)
        sent_back = [
            grads[i]
            if grads[i] is not None
            else torch.zeros(n_rows, *ctx.layout[i][1], dtype=ctx.layout[i][0], device=ctx.device)
            for i in floating
        ]
        rows = _exchange_rows(_row_bytes(sent_back), recv_counts, send_counts, ctx.group)
        unpacked = _from_row_bytes(rows, [ctx.layout[i] for i in floating])
        returned = dict(zip(floating, unpacked, strict=True))
        return None, None, None, *(returned.get(i) for i in range(len(ctx.layout)))


@outside_compiled_graphs
def all_to_all_packed(
    tensors: list[torch.Tensor], send_counts: list[int], recv_counts: list[int], group
) -> list[torch.Tensor]:
    """`all_to_all` of several tensors with the same rows (grouped by destination) in a single
    message each way; integer tensors travel too, without gradient."""
    return list(_PackedAllToAll.apply(send_counts, recv_counts, group, *tensors))


@outside_compiled_graphs
def copy_to_tensor_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over `group` (megatron-core's copy)."""
    return copy_to_tensor_model_parallel_region(x, group=group)


@outside_compiled_graphs
def reduce_from_tensor_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce over `group` forward, identity backward (megatron-core's reduce)."""
    return reduce_from_tensor_model_parallel_region(x, group=group)


@outside_compiled_graphs
def split_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's chunk of a tensor replicated over `group`; backward all-gathers the gradient,
    so the replicated input gets the full gradient on every rank."""
    return _SplitFirstDim.apply(x, group)


@outside_compiled_graphs
def gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0; for outputs whose gradient is replicated over `group`, so the
    backward keeps this rank's chunk."""
    return _GatherFirstDim.apply(x, group)


@outside_compiled_graphs
def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dim, backward keeps this rank's chunk (replicated gradient)."""
    return _GatherLastDim.apply(x, group)


@outside_compiled_graphs
def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group):
    """Uneven all-to-all along dim 0 (rows grouped by destination); the gradient travels back."""
    return _AllToAll.apply(x, send_counts, recv_counts, group)


def data_parallel_mean(x: torch.Tensor) -> torch.Tensor:
    """Elementwise mean of `x` over the data-parallel ranks (every rank gets it)."""
    group = parallel_state.get_data_parallel_group()
    mean = x.clone()
    dist.all_reduce(mean, group=group)
    return mean.div_(dist.get_world_size(group))
