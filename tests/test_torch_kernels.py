"""The PyTorch expert path (`torch_kernels`, what CPUs run) against the float64 reference, with
the cases of the Triton kernel tests, and what its custom ops keep for backward."""

from __future__ import annotations

import math
from collections.abc import Iterator

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
    switchhead_v,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}


@pytest.fixture(params=["padded", "sorted"])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Runs the test in the given layout of the PyTorch path, whatever the routing."""
    padding = math.inf if request.param == "padded" else 0.0
    monkeypatch.setattr(torch_kernels, "MAX_PADDING", padding)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one CPU thread never pads
    yield
    torch.set_num_threads(threads)


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
def test_matches_float64_reference(name: str, dtype: torch.dtype, layout: None) -> None:
    torch.manual_seed(0)
    check_against_float64(CASES[name](dtype=dtype))


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(name: str, layout: None) -> None:
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


def test_backward_keeps_the_hidden_activations_and_nothing_else() -> None:
    """Beyond the inputs and the routing, σ-MoE's backward keeps its [pairs, m] ReLU outputs
    and the projections keep nothing: no gathered rows, no products, nothing padded."""
    mlp = sigma_moe(n_tokens=32, k=4, hidden=32)
    assert _bytes_kept_beyond_the_arguments(mlp) == 32 * 4 * 32 * 4  # pairs · m · fp32
    assert _bytes_kept_beyond_the_arguments(switchhead_v()) == 0


def test_layout_pads_balanced_routings_on_several_threads_only() -> None:
    torch.manual_seed(0)
    balanced = torch.arange(64) % 4  # 16 pairs on each of 4 experts
    concentrated = torch.tensor([0] * 40 + [1, 2, 3])  # padded: 160 rows for 43 pairs
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert isinstance(torch_kernels._layout(balanced, 4), torch_kernels._Padded)
        assert isinstance(torch_kernels._layout(concentrated, 4), torch_kernels._Sorted)
        torch.set_num_threads(1)
        assert isinstance(torch_kernels._layout(balanced, 4), torch_kernels._Sorted)
    finally:
        torch.set_num_threads(threads)
