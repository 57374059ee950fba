"""The PyTorch expert path (`torch_kernels`, what CPUs run) against the float64 reference, with
the cases of the Triton kernel tests, and what its custom ops keep for backward."""

from __future__ import annotations

import pytest
import torch

from moeut_dist.kernels import moe_mlp, ops
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
def test_matches_float64_reference(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    check_against_float64(CASES[name](dtype=dtype))


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(name: str) -> None:
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


@pytest.mark.parametrize("name", ["sigma_moe", "switchhead_v"])
def test_backward_keeps_the_gathered_rows_and_hidden_activations_only(name: str) -> None:
    """Beyond the inputs and the routing, backward keeps [pairs, d_in] gathered rows and, for
    σ-MoE, [pairs, m] hidden activations: nothing of width d_out, nothing per expert."""
    case = CASES[name]()
    inputs = [t.detach().requires_grad_() for t in case.inputs]
    given = {t.untyped_storage().data_ptr() for t in (*inputs, *case.routing) if torch.is_tensor(t)}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in given:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        case.op(*inputs, *case.routing, backend="torch")
    x, weight = inputs[:2]
    pairs, d_in = case.routing[0].shape[0], x.shape[1]
    width = d_in + (weight.shape[2] if name == "sigma_moe" else 0)
    assert sum(kept.values()) == pairs * width * x.element_size()
