"""Tensor and expert parallelism against the single-process model (gloo, 4 CPU processes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.utils._python_dispatch import TorchDispatchMode

from moeut_dist.config import ConfigError
from moeut_dist.model.moe import LocalDispatcher
from moeut_dist.parallel.build import build_model, gather_full, parallel_lm_loss
from moeut_dist.parallel.collectives import data_parallel_mean
from moeut_dist.parallel.expert_parallel import (
    ExpertParallelDispatcher,
    ExpertPartition,
    plan_dispatch,
)
from moeut_dist.parallel.layout import ParallelConfig, initialize
from tests.distributed_utils import run_distributed
from tests.parallel_cases import (
    SEED,
    assert_close_dicts,
    batch,
    data_parallel_share,
    model_config,
    reference_loss,
    reference_model,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("layout", "world_size", "message"),
    [
        (ParallelConfig(tensor=4), 4, "tensor parallel size 4 does not divide n_heads 2"),
        (ParallelConfig(expert=16), 16, "expert parallel size 16 exceeds n_experts 10"),
        (ParallelConfig(tensor=2), 3, "world size 3 is not a multiple of tensor parallel size 2"),
        (ParallelConfig(expert=3, tensor=2), 6, "must divide one another"),
    ],
)
def test_bad_layouts_are_rejected_with_their_numbers(layout, world_size, message):
    with pytest.raises(ConfigError, match=message):
        layout.validate(model_config(), world_size)


def test_partition_of_uneven_expert_counts():
    assert ExpertPartition(387, 8).counts() == [49, 49, 49, 48, 48, 48, 48, 48]
    assert ExpertPartition(10, 4).local_range(2) == range(6, 8)
    assert ExpertPartition(10, 4).owners().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]


def _signature_experts(n_experts: int, d: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts whose output for an all-ones token is the one-hot of their own id."""
    keys = torch.full((n_experts, d, 1), 1.0 / d, dtype=dtype)
    values = torch.eye(n_experts, d, dtype=dtype)[:, None, :]
    return keys, values


def _check_dispatch_contributes_each_pair_once(partition: ExpertPartition) -> None:
    rank, n_experts, d = dist.get_rank(), partition.n_experts, 16
    # Hand-made routing: token n picks experts n, n+1, …, n+k−1 (mod E), so tokens hit 1 to k
    # ranks, the ranks' blocks are uneven, and no expert is picked twice by one token.
    k = 4
    n_tokens = 12
    experts = (torch.arange(n_tokens)[:, None] + torch.arange(k) + rank) % n_experts
    gates = torch.ones(n_tokens, k, dtype=torch.float64)
    x = torch.ones(n_tokens, d, dtype=torch.float64)
    keys, values = _signature_experts(n_experts, d, torch.float64)
    local = partition.local_range(rank)
    group = dist.group.WORLD
    dispatcher = ExpertParallelDispatcher(partition, group, backend="torch")
    out = dispatcher(
        x, gates, experts, keys[local.start : local.stop], values[local.start : local.stop]
    )

    expected = torch.zeros(n_tokens, d, dtype=torch.float64)
    expected.scatter_add_(1, experts, gates)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    plan = plan_dispatch(experts, partition.owners(), group)
    pairs = set(zip(plan.token_index.tolist(), plan.destination.tolist(), strict=True))
    assert len(pairs) == len(plan.token_index), "a token was sent to one rank twice"
    min_k_ep = min(k, partition.n_ranks)
    stats = dispatcher.stats
    assert stats.token_copies <= n_tokens * min_k_ep
    assert stats.remote_bytes / n_tokens <= min_k_ep * d * x.element_size()


class _AllToAllCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.c10d.alltoall_base_.default
        return func(*args, **(kwargs or {}))


def _check_dispatch_gradients(partition: ExpertPartition) -> None:
    """Outputs and gradients (tokens, gates, local experts) match the one-process dispatcher."""
    torch.manual_seed(7)  # same inputs on every rank; each rank checks its own tokens
    n_tokens, d, m, k = 20, 8, 6, 4
    x = torch.randn(n_tokens, d, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(n_tokens, k, dtype=torch.float64, requires_grad=True)
    experts = torch.rand(n_tokens, partition.n_experts).topk(k).indices
    keys = torch.randn(partition.n_experts, d, m, dtype=torch.float64, requires_grad=True)
    values = torch.randn(partition.n_experts, m, d, dtype=torch.float64, requires_grad=True)
    expected = LocalDispatcher("torch")(x, gates, experts, keys, values)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, gates, keys, values))

    local = partition.local_range(dist.get_rank())
    local_keys = keys[local.start : local.stop].detach().requires_grad_()
    local_values = values[local.start : local.stop].detach().requires_grad_()
    with _AllToAllCount() as forward:
        out = ExpertParallelDispatcher(partition, dist.group.WORLD, backend="torch")(
            x, gates, experts, local_keys, local_values
        )
    with _AllToAllCount() as backward:
        grads = torch.autograd.grad(out.square().sum(), (x, gates, local_keys, local_values))
    # Forward: the split sizes, then tokens with their gates and expert ids in one message, and
    # the results back; backward: the two messages mirrored, with the forward's split sizes.
    assert (forward.count, backward.count) == (3, 2)
    torch.testing.assert_close(out, expected)
    for name, grad, want in zip(("x", "gates"), grads[:2], expected_grads[:2], strict=True):
        torch.testing.assert_close(grad, want, msg=lambda m, n=name: f"{n}: {m}")
    # Every rank sent the same tokens, so its experts' gradients are world_size times one's.
    for grad, want in zip(grads[2:], expected_grads[2:], strict=True):
        torch.testing.assert_close(grad, dist.get_world_size() * want[local.start : local.stop])


def _reduced_gradients(model) -> dict[str, torch.Tensor]:
    """Gradients averaged over data parallelism as DeepSpeed would (dense: mean over the
    data-parallel group; experts: sum over the expert-data-parallel group / data-parallel size)."""
    dp_group = parallel_state.get_data_parallel_group()
    expert_dp_group = parallel_state.get_expert_data_parallel_group()
    dp_size = dist.get_world_size(dp_group)
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=expert_dp_group if hasattr(param, "group_name") else dp_group)
        grads[name] = grad / dp_size
    return grads


def _check_layout_matches_one_process(layout: ParallelConfig) -> None:
    config = model_config()
    torch.set_default_dtype(torch.float64)
    reference = reference_model(config)
    tokens = batch(config, 0)
    lm, reg = reference_loss(reference, tokens)
    (lm + reg).backward()
    expected_grads = {n: p.grad for n, p in reference.named_parameters()}

    initialize(layout, config)
    model = build_model(config, layout, seed=1234)
    loss = parallel_lm_loss(model, data_parallel_share(tokens))
    loss.total.backward()
    what = f"{layout}"
    logged = data_parallel_mean(torch.stack([loss.lm, loss.reg]))
    torch.testing.assert_close(logged[0], lm.detach().float(), msg=lambda m: f"{what} lm: {m}")
    torch.testing.assert_close(logged[1], reg.detach().float(), msg=lambda m: f"{what} reg: {m}")
    grads = gather_full(_reduced_gradients(model), config)
    assert_close_dicts(grads, expected_grads, rtol=1e-6, atol=1e-9, what=f"{what} grad")
    torch.set_default_dtype(torch.float32)


def _model_checks() -> None:
    for partition in (ExpertPartition(10, 4), ExpertPartition(4, 4)):
        _check_dispatch_contributes_each_pair_once(partition)
    _check_dispatch_gradients(ExpertPartition(10, 4))
    for layout in (
        ParallelConfig(tensor=2),
        ParallelConfig(expert=2),
        ParallelConfig(expert=4),
        ParallelConfig(tensor=2, expert=2),
        ParallelConfig(tensor=2, expert=4, checkpoint_activations=True),
    ):
        _check_layout_matches_one_process(layout)
    _check_expert_dropout_matches_one_process(ParallelConfig(tensor=2))
    _check_recompute_reroutes_identically(ParallelConfig(tensor=2, expert=2))


def _check_expert_dropout_matches_one_process(layout: ParallelConfig) -> None:
    """Expert dropout in σ-MoE and SwitchHead drops, on each tensor-parallel rank's heads, what
    one process would drop on the same sequences (this data-parallel rank's)."""
    config = model_config(expert_dropout=0.3, att_expert_dropout=0.5)
    torch.set_default_dtype(torch.float64)
    initialize(layout, config)
    tokens = data_parallel_share(batch(config, 0))
    reference = reference_model(config)
    torch.manual_seed(99)
    lm, reg = reference_loss(reference, tokens)
    (lm + reg).backward()
    model = build_model(config, layout, seed=SEED)
    torch.manual_seed(99)
    loss = parallel_lm_loss(model, tokens)
    loss.total.backward()
    torch.testing.assert_close(loss.total, lm + reg)
    # Expert gradients are partial sums until reduced over the expert-data-parallel group, which
    # spans other data-parallel ranks' sequences; the dense ones are this rank's already.
    dense = {n: p.grad for n, p in model.named_parameters() if not hasattr(p, "group_name")}
    grads = gather_full(dense, config)
    expected = {n: p.grad for n, p in reference.named_parameters() if n in dense}
    assert_close_dicts(grads, expected, rtol=1e-6, atol=1e-9, what=f"{layout} dropout grad")
    torch.set_default_dtype(torch.float32)


def _check_recompute_reroutes_identically(layout: ParallelConfig) -> None:
    """With expert dropout on, checkpointed layer applications re-route exactly as the forward
    did (the RNG state is restored), so gradients equal those without checkpointing."""
    config = model_config(expert_dropout=0.3)
    initialize(layout, config)
    tokens = data_parallel_share(batch(config, 0))
    grads = []
    for checkpointing in (False, True):
        model = build_model(config, layout, seed=5)
        model.transformer.checkpoint_activations = checkpointing
        torch.manual_seed(99)
        parallel_lm_loss(model, tokens).total.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert_close_dicts(grads[1], grads[0], rtol=0, atol=0, what="recomputed")


def test_tensor_and_expert_parallel_match_one_process():
    run_distributed(_model_checks, 4)
