"""Plain-autograd local expert compute: the test oracle of both implementations (`triton_kernels`,
`torch_kernels`) and the baseline the benchmarks measure them against.

Both operations take a routing in "pair" form: pair `p` sends input row `in_rows[p]` through
expert `experts[p]`, scales the result by `gates[p]` and adds it to output row `out_rows[p]`.
Pairs are grouped by expert so that each expert is one dense matmul (a loop over experts, never
over tokens); autograd provides the backward pass. Expert weights are taken with `unbind`, whose
backward stacks the per-expert gradients once; indexing `weight[e]` per expert would make
autograd materialise a full-size gradient tensor for every expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_by_expert(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, list[int]]:
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=n_experts).tolist()
    return order, counts


def moe_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    in_rows: torch.Tensor,
    out_rows: torch.Tensor,
    n_out_rows: int,
) -> torch.Tensor:
    """out[out_rows[p]] += gates[p] · x[in_rows[p]] @ weight[experts[p]]."""
    order, counts = group_by_expert(experts, weight.shape[0])
    inputs = x.index_select(0, in_rows[order]).split(counts)
    products = torch.cat([r @ w for w, r in zip(weight.unbind(0), inputs, strict=True)])
    products = products * gates[order, None].to(products.dtype)
    out = products.new_zeros(n_out_rows, weight.shape[-1])
    return out.index_add(0, out_rows[order], products)


def moe_mlp(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    experts: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """out[rows[p]] += gates[p] · relu(x[rows[p]] @ up[e]) @ down[e], e = experts[p]."""
    order, counts = group_by_expert(experts, up.shape[0])
    inputs = x.index_select(0, rows[order]).split(counts)
    products = torch.cat(
        [F.relu(r @ u) @ v for u, v, r in zip(up.unbind(0), down.unbind(0), inputs, strict=True)]
    )
    products = products * gates[order, None].to(products.dtype)
    out = products.new_zeros(x.shape[0], down.shape[-1])
    return out.index_add(0, rows[order], products)
