"""Expert parallelism for σ-MoE: experts partitioned over ranks, tokens sent by all-to-all.

σ-MoE routes each token to many small experts (k = 12–24 of 128 hidden units each). Sending one
copy per (token, expert) would move k·d values per token; this dispatcher sends one copy per
(token, destination rank), with the token's gates for that rank's experts, and the destination
returns a single gate-weighted partial sum: at most min(k, EP)·d values out and back. Nothing is
dropped (σ-MoE has no capacity limit), so the all-to-all has uneven splits.

Tensor parallelism is folded in: TP ranks hold identical tokens, so each TP rank dispatches only
its 1/TP slice of them and the results are all-gathered over the TP group. With TP ≤ EP the
TP ranks own disjoint experts and nobody computes a token twice; the alternative (slicing every
128-wide expert over TP, megatron-core's expert tensor parallelism) would halve GEMM widths
that are already small and add an all-reduce of every token's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeut_dist import kernels
from moeut_dist.parallel.collectives import (
    all_to_all,
    all_to_all_packed,
    gather_first_dim,
    outside_compiled_graphs,
    split_first_dim,
)


@dataclass(frozen=True)
class ExpertPartition:
    """Contiguous blocks of experts per rank; the first `n_experts % n_ranks` get one extra."""

    n_experts: int
    n_ranks: int

    def counts(self) -> list[int]:
        base, extra = divmod(self.n_experts, self.n_ranks)
        return [base + (rank < extra) for rank in range(self.n_ranks)]

    def offsets(self) -> list[int]:
        counts = self.counts()
        return [sum(counts[:rank]) for rank in range(self.n_ranks)]

    def local_range(self, rank: int) -> range:
        start = self.offsets()[rank]
        return range(start, start + self.counts()[rank])

    def owners(self, device: torch.device | None = None) -> torch.Tensor:
        """Owning rank of every global expert id: [n_experts] int64."""
        return torch.repeat_interleave(
            torch.arange(self.n_ranks, device=device), torch.tensor(self.counts(), device=device)
        )


@dataclass
class DispatchStats:
    """Traffic of forward dispatches (the return trip and the backward mirror them). Under
    activation checkpointing the recomputed forward dispatches again, and that is counted: the
    bytes really travel twice."""

    tokens: int = 0  # tokens routed by this rank
    token_copies: int = 0  # rows it sent, to any rank including itself
    remote_bytes: int = 0  # activation bytes it sent to other ranks
    routing_bytes: int = 0  # gate and expert-id bytes it sent to other ranks

    def reset(self) -> None:
        self.tokens = self.token_copies = self.remote_bytes = self.routing_bytes = 0


@dataclass
class DispatchPlan:
    """Where each token goes: one row per (token, destination rank) that owns ≥ 1 of its experts."""

    token_index: torch.Tensor  # [S] local token of each sent row, grouped by destination
    destination: torch.Tensor  # [S] destination rank of each sent row
    send_counts: list[int]  # rows sent to each rank
    recv_counts: list[int]  # rows received from each rank
    recv_pairs: int  # (row, local expert) pairs received in all


def token_destinations(experts: torch.Tensor, owners: torch.Tensor, n_ranks: int) -> torch.Tensor:
    """[N, n_ranks] bool: whether token n has at least one expert on rank r."""
    hits = torch.zeros(experts.shape[0], n_ranks, dtype=torch.bool, device=experts.device)
    return hits.scatter_(1, owners[experts], True)


def plan_dispatch(experts: torch.Tensor, owners: torch.Tensor, group) -> DispatchPlan:
    """One copy of a token per destination rank, however many of its experts live there.

    The only host sync: the split sizes, sent and received (exchanged on the device first),
    fetched together once; the sizes of everything else follow from them.
    """
    n_ranks = dist.get_world_size(group)
    owner_of_pair = owners[experts]
    hits = token_destinations(experts, owners, n_ranks)
    rows_and_pairs = torch.stack(
        [hits.sum(0), torch.bincount(owner_of_pair.flatten(), minlength=n_ranks)], dim=1
    )
    received = torch.empty_like(rows_and_pairs)
    dist.all_to_all_single(received, rows_and_pairs, group=group)
    (send_counts, _), (recv_counts, recv_pairs) = torch.stack(
        [rows_and_pairs, received]
    ).mT.tolist()
    # Row-major over [destination, token]: sorted by destination.
    destination, token_index = torch.nonzero_static(hits.T, size=sum(send_counts)).unbind(1)
    return DispatchPlan(token_index, destination, send_counts, recv_counts, sum(recv_pairs))


class ExpertParallelDispatcher:
    """`ExpertDispatcher` over an expert-parallel group (see the module docstring).

    `keys`/`values` passed in are this rank's shard (`partition.local_range(ep_rank)`);
    `experts` holds global expert ids.
    """

    def __init__(
        self,
        partition: ExpertPartition,
        expert_group: dist.ProcessGroup,
        tensor_group: dist.ProcessGroup | None = None,
        backend: kernels.Backend = "auto",
    ) -> None:
        self.partition = partition
        self.expert_group = expert_group
        self.tensor_group = tensor_group
        self.backend = backend
        self.rank = dist.get_rank(expert_group)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stats = DispatchStats()

    def _routing_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Owning rank of every global expert and first global expert id of every rank, built
        once per device (not per call: a host-to-device copy each time)."""
        if device not in self._tables:
            offsets = torch.tensor(self.partition.offsets(), device=device)
            self._tables[device] = (self.partition.owners(device), offsets)
        return self._tables[device]

    def _tensor_parallel(self) -> bool:
        return self.tensor_group is not None and dist.get_world_size(self.tensor_group) > 1

    # The split sizes are fetched to the host mid-dispatch, and change with every routing.
    @outside_compiled_graphs
    def __call__(
        self,
        x: torch.Tensor,
        gates: torch.Tensor,
        experts: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        if not self._tensor_parallel():
            return self._dispatch(x, gates, experts, keys, values)
        n_tokens = x.shape[0]
        tp = dist.get_world_size(self.tensor_group)
        padding = -n_tokens % tp
        # Padded rows get zero gates: they travel but contribute nothing.
        x, gates, experts = (
            torch.nn.functional.pad(t, (0, 0, 0, padding)) for t in (x, gates, experts)
        )
        # Forward: take this TP rank's slice; backward: all-gather the slices' gradients, so that
        # the replicated inputs get the full, identical gradient on every TP rank.
        x_part, gates_part = (split_first_dim(t, self.tensor_group) for t in (x, gates))
        experts_part = experts.chunk(tp)[dist.get_rank(self.tensor_group)]
        out = self._dispatch(x_part, gates_part, experts_part, keys, values)
        # The downstream gradient is replicated over TP: the backward keeps this rank's slice.
        return gather_first_dim(out, self.tensor_group)[:n_tokens]

    def _dispatch(self, x, gates, experts, keys, values) -> torch.Tensor:
        owners, offsets = self._routing_tables(x.device)
        plan = plan_dispatch(experts, owners, self.expert_group)

        # A sent row carries the token's gates and local expert ids for its destination only;
        # the other slots are marked with expert id -1.
        sent_experts = experts[plan.token_index]
        on_destination = owners[sent_experts] == plan.destination[:, None]
        local_ids = sent_experts - offsets[plan.destination][:, None]
        local_ids = local_ids.masked_fill(~on_destination, -1)
        sent_gates = gates[plan.token_index] * on_destination

        # One message each way carries the rows, their gates and expert ids (int32: local ids
        # are small); the backward reuses these split sizes.
        recv_x, recv_gates, recv_ids = all_to_all_packed(
            [x[plan.token_index], sent_gates, local_ids.to(torch.int32)],
            plan.send_counts,
            plan.recv_counts,
            self.expert_group,
        )
        self._record(x, gates, experts.shape[0], plan.send_counts)

        # The received slots that name one of this rank's experts; their number came with the
        # split sizes, so finding them needs no host sync.
        pairs = torch.nonzero_static(recv_ids.flatten() >= 0, size=plan.recv_pairs).squeeze(1)
        partial = kernels.moe_mlp(
            recv_x,
            keys,
            values,
            recv_gates.flatten()[pairs],
            recv_ids.flatten()[pairs].long(),
            pairs // experts.shape[1],
            backend=self.backend,
        )
        returned = all_to_all(partial, plan.recv_counts, plan.send_counts, self.expert_group)
        out = returned.new_zeros(x.shape[0], returned.shape[1])
        return out.index_add(0, plan.token_index, returned)

    def _record(self, x, gates, n_tokens: int, send_counts: list[int]) -> None:
        remote_rows = sum(send_counts) - send_counts[self.rank]
        row_bytes = x.shape[1] * x.element_size()
        routing_row_bytes = gates.shape[1] * (gates.element_size() + 4)  # gates + int32 ids
        self.stats.tokens += n_tokens
        self.stats.token_copies += sum(send_counts)
        self.stats.remote_bytes += remote_rows * row_bytes
        self.stats.routing_bytes += remote_rows * routing_row_bytes
