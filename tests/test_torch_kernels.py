"""The PyTorch expert path (`torch_kernels`, what CPUs run) against the float64 reference, with
the cases of the Triton kernel tests, and what its custom ops keep for backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from moeut_dist.activation_memory import SavedTensorBytes
from moeut_dist.kernels import ops, torch_kernels
from tests.test_kernels import (
    CASES,
    EDGE_CASES,
    Case,
    _float64_run,
    _relative_error,
    poisoned_allocations,
    sigma_moe,
    switchhead_o,
    switchhead_v,
)


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}


CAPACITIES = {  # of the blocks, from the number of pairs of each expert
    "blocks": lambda counts: int(counts.max()),  # every expert within its block
    "blocks and overflow": lambda counts: int(np.median(counts)),
    "sorted": lambda counts: 0,  # no blocks: one matmul per expert
}


@pytest.fixture(params=list(CAPACITIES))
def block_capacity(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the test with the given block capacity in the PyTorch path, whatever the routing."""
    capacity = CAPACITIES[request.param]
    monkeypatch.setattr(torch_kernels, "_capacity", lambda counts, device: capacity(counts))
    # Blocks of the largest count may hold up to E rows per pair (E ≤ 7 in the cases).
    monkeypatch.setattr(torch_kernels, "MAX_PADDING", 8.0)


def check_against_float64(case: Case) -> None:
    grad_out = torch.randn(case.reference(*case.inputs, *case.routing).shape)
    expected, expected_grads = _float64_run(case, grad_out)
    inputs = [t.detach().requires_grad_() for t in case.inputs]
    # Poisoned allocations: an element the path forgets to write is NaN, not luckily zero.
    with poisoned_allocations():
        out = case.op(*inputs, *case.routing, backend="torch")
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    results = [("out", out, expected, case.inputs[0])]
    for i, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
        results.append((f"grad of input {i}", grad, expected_grad, case.inputs[i]))
    for name, actual, wanted, like in results:
        assert actual.dtype == like.dtype and actual.shape == wanted.shape, name
        # Computed in the dtype of x and rounded to that of the tensor (the gates stay fp32).
        tolerance = max(TOLERANCE[case.inputs[0].dtype], TOLERANCE[like.dtype])
        error = _relative_error(actual, wanted)
        assert error < tolerance, f"{name}: relative error {error:.2e} ≥ {tolerance:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name: str, dtype: torch.dtype, block_capacity: None) -> None:
    torch.manual_seed(0)
    check_against_float64(CASES[name](dtype=dtype))


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(name: str, block_capacity: None) -> None:
    torch.manual_seed(1)
    check_against_float64(EDGE_CASES[name]())


def test_opcheck() -> None:
    torch.manual_seed(3)
    mlp, linear = sigma_moe(n_tokens=3, d=16, hidden=16, k=2), switchhead_v(n_tokens=3, d=16)
    differentiable = lambda case: [t.detach().requires_grad_() for t in case.inputs]
    torch.library.opcheck(ops.moe_mlp_op, (*differentiable(mlp), *mlp.routing, False, False))
    torch.library.opcheck(
        ops.moe_linear_op, (*differentiable(linear), *linear.routing, False, False)
    )


def _bytes_kept_beyond_the_arguments(case: Case) -> int:
    inputs = [t.detach().requires_grad_() for t in case.inputs]
    with SavedTensorBytes(t for t in (*inputs, *case.routing) if torch.is_tensor(t)) as saved:
        case.op(*inputs, *case.routing, backend="torch")
    return saved.bytes


def _plan_and_kept_rows_bytes(case: Case) -> int:
    """The plan (int64 [pairs + 1]) and one fp32 [kept rows, d_out] tensor of the case."""
    experts, weight = case.routing[0], case.inputs[1]
    n_pairs = len(experts)
    return (n_pairs + 1) * 8 + torch_kernels.kept_rows(n_pairs) * weight.shape[2] * 4


def test_backward_keeps_the_layout_and_narrow_activations_only(block_capacity: None) -> None:
    """Beyond the inputs and the routing, the backward keeps the layout's plan and, in
    `kept_rows(pairs)` rows whatever the layout, σ-MoE's ReLU outputs [·, m] and V's products
    [·, head_dim] (narrower than its d-wide input); O, whose output is the wider side, keeps
    only the plan. Nothing d-wide: no gathered rows, no products of O."""
    torch.manual_seed(0)
    mlp = sigma_moe(n_tokens=32, k=4, hidden=32)
    v, o = switchhead_v(n_tokens=32), switchhead_o(n_tokens=32)
    assert _bytes_kept_beyond_the_arguments(mlp) == _plan_and_kept_rows_bytes(mlp)
    assert _bytes_kept_beyond_the_arguments(v) == _plan_and_kept_rows_bytes(v)
    assert _bytes_kept_beyond_the_arguments(o) == (len(o.routing[0]) + 1) * 8


def test_backward_uses_the_forward_layout_whatever_the_threads_then() -> None:
    """The layout is decided once, in the forward: a backward run on one thread (which alone
    would make no blocks) still reads the blocked rows the forward kept."""
    torch.manual_seed(4)
    case = sigma_moe(n_tokens=32, k=4, hidden=32)
    grad_out = torch.randn(32, 32)
    expected, expected_grads = _float64_run(case, grad_out)
    inputs = [t.detach().requires_grad_() for t in case.inputs]
    with cpu_threads(2):
        out = case.op(*inputs, *case.routing, backend="torch")
        assert torch_kernels._Layout.of(case.routing[0], 5).capacity > 0
    with cpu_threads(1):
        grads = torch.autograd.grad(out, inputs, grad_out)
    for actual, wanted in zip([out, *grads], [expected, *expected_grads], strict=True):
        assert _relative_error(actual, wanted) < 1e-5


def _layout(experts: list[int], n_experts: int) -> torch_kernels._Layout:
    return torch_kernels._Layout.of(torch.tensor(experts), n_experts)


def test_layout_places_every_pair_in_its_experts_block_or_overflow(block_capacity: None) -> None:
    """Within a block or an overflow, an expert's pairs keep their order; blocks come first."""
    torch.manual_seed(0)
    experts = torch.randint(0, 6, (200,)).tolist()
    layout = _layout(experts, 6)
    expected_rows: dict[int, list[int]] = {}
    for expert in experts:
        rank = len(expected_rows.setdefault(expert, []))
        if rank < layout.capacity:
            row = expert * layout.capacity + rank
        else:
            row = layout.overflow_start[expert] + rank - layout.capacity
        expected_rows[expert].append(row)
    expected_slots = [expected_rows[e].pop(0) for e in experts]
    assert layout.slots.tolist() == expected_slots
    assert layout.n_rows <= torch_kernels.kept_rows(len(experts))


def test_capacity_weighs_padding_against_overflow_matmuls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    balanced = [e % 4 for e in range(64)]  # 16 pairs on each of 4 experts
    # One expert of 40: padding the others to 40 would be 160 rows for 88 pairs; it overflows
    # its block of 16 instead.
    outlier = [e % 3 for e in range(48)] + [3] * 40
    with cpu_threads(2):
        assert _layout(balanced, 4).capacity == 16  # one bmm, no padding
        layout = _layout(outlier, 4)
        assert (layout.capacity, layout.n_rows) == (16, 88)
        assert [e for e, _ in layout.overflowing] == [3]
        # Were a matmul free, blocks would not pay: they pad, and overflow matmuls replace them.
        monkeypatch.setattr(torch_kernels, "OVERFLOW_MATMUL_ROWS", 0)
        assert _layout(outlier, 4).capacity == 0
    with cpu_threads(1):  # a bmm would be a loop of matmuls plus padding
        assert _layout(balanced, 4).capacity == 0
