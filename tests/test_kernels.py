"""Triton expert kernels against a float64 PyTorch reference (interpreted on CPU without a GPU).

Every Triton run happens with `torch.use_deterministic_algorithms(True)`, whose
`fill_uninitialized_memory` makes each `torch.empty` the kernels write into start as NaN: an
element a kernel forgets to write fails the comparison instead of passing by luck. The
`deterministic` flag is always passed explicitly, so both reduction modes run under the poison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import triton

from moeut_dist.kernels import moe_linear, moe_mlp, ops, reference, triton_kernels

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_kernels.INTERPRETING),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere gives NaN, which fails `<`."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@dataclass
class Case:
    """One call: differentiable tensors first, then the routing arguments."""

    op: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    routing: tuple[object, ...]


def _mlp_case(x: torch.Tensor, n_experts: int, hidden: int, gates, experts, rows, dtype) -> Case:
    d = x.shape[1]
    up = torch.randn(n_experts, d, hidden) / d**0.5
    down = torch.randn(n_experts, hidden, d) / hidden**0.5
    inputs = (x.to(dtype), up.to(dtype), down.to(dtype), gates)
    return Case(moe_mlp, reference.moe_mlp, inputs, (experts, rows))


def _linear_case(x, weight, gates, experts, in_rows, out_rows, n_out_rows, dtype) -> Case:
    inputs = (x.to(dtype), weight.to(dtype), gates)
    return Case(moe_linear, reference.moe_linear, inputs, (experts, in_rows, out_rows, n_out_rows))


def sigma_moe(n_tokens=12, d=32, n_experts=5, k=3, hidden=32, dtype=torch.float32) -> Case:
    """Single-process σ-MoE routing: every token with its top-k distinct experts."""
    experts = torch.rand(n_tokens, n_experts).topk(k, dim=1).indices.flatten()
    rows = torch.arange(n_tokens).repeat_interleave(k)
    gates = torch.rand(n_tokens * k)
    return _mlp_case(torch.randn(n_tokens, d), n_experts, hidden, gates, experts, rows, dtype)


def expert_parallel_mlp(n_tokens=10, d=32, n_pairs=30, dtype=torch.float32) -> Case:
    """A rank's arbitrary pair list: repeated tokens, untouched tokens, experts without pairs.

    E = 7 is no multiple of any block size; tokens 8 and 9 and experts 0, 2, 4, 5 get no pairs.
    """
    experts = torch.tensor([1, 3, 6])[torch.randint(0, 3, (n_pairs,))]
    rows = torch.randint(0, n_tokens - 2, (n_pairs,))
    gates = torch.rand(n_pairs)
    return _mlp_case(torch.randn(n_tokens, d), 7, 24, gates, experts, rows, dtype)


def switchhead_v(n_tokens=6, d=32, heads=2, head_dim=16, ea=3, ka=2, dtype=torch.float32) -> Case:
    x = torch.randn(n_tokens, d)
    weight = torch.randn(heads * ea, d, head_dim) / d**0.5
    head = torch.arange(heads).repeat(n_tokens, 1)  # [N, H]
    choice = torch.rand(n_tokens, heads, ea).topk(ka, dim=2).indices  # [N, H, ka]
    experts = (head[..., None] * ea + choice).flatten()
    in_rows = torch.arange(n_tokens).repeat_interleave(heads * ka)
    out_rows = (torch.arange(n_tokens)[:, None] * heads + head).repeat_interleave(ka, dim=1)
    gates = torch.rand(n_tokens * heads * ka)
    return _linear_case(
        x, weight, gates, experts, in_rows, out_rows.flatten(), n_tokens * heads, dtype
    )


def switchhead_o(n_tokens=6, d=32, heads=2, head_dim=16, ea=3, ka=2, dtype=torch.float32) -> Case:
    x = torch.randn(n_tokens * heads, head_dim)
    weight = torch.randn(heads * ea, head_dim, d) / head_dim**0.5
    head = torch.arange(heads).repeat(n_tokens, 1)
    choice = torch.rand(n_tokens, heads, ea).topk(ka, dim=2).indices
    experts = (head[..., None] * ea + choice).flatten()
    in_rows = (torch.arange(n_tokens)[:, None] * heads + head).repeat_interleave(ka, dim=1)
    out_rows = torch.arange(n_tokens).repeat_interleave(heads * ka)
    gates = torch.rand(n_tokens * heads * ka)
    return _linear_case(x, weight, gates, experts, in_rows.flatten(), out_rows, n_tokens, dtype)


def _on_device(case: Case) -> Case:
    move = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t
    return Case(
        case.op, case.reference, tuple(map(move, case.inputs)), tuple(map(move, case.routing))
    )


def _triton_run(
    case: Case, grad_out: torch.Tensor, deterministic: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = [t.detach().requires_grad_() for t in case.inputs]
    with poisoned_allocations():
        out = case.op(*inputs, *case.routing, backend="triton", deterministic=deterministic)
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out, list(grads)


def _float64_run(case: Case, grad_out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = [t.detach().double().requires_grad_() for t in case.inputs]
    out = case.reference(*inputs, *case.routing)
    return out, list(torch.autograd.grad(out, inputs, grad_out.double()))


def check_against_float64(case: Case, deterministic: bool) -> None:
    case = _on_device(case)
    out_shape = case.reference(*case.inputs, *case.routing).shape
    grad_out = torch.randn(out_shape, device=DEVICE)
    expected, expected_grads = _float64_run(case, grad_out)
    out, grads = _triton_run(case, grad_out, deterministic)
    tolerance = TOLERANCE[case.inputs[0].dtype]
    results = {"out": (out, expected, case.inputs[0])}
    for i, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
        results[f"grad of input {i}"] = (grad, expected_grad, case.inputs[i])
    for name, (actual, wanted, like) in results.items():
        assert actual.dtype == like.dtype and actual.shape == wanted.shape, name
        error = _relative_error(actual, wanted)
        assert error < tolerance, f"{name}: relative error {error:.2e} ≥ {tolerance:.0e}"


CASES = {
    "sigma_moe": sigma_moe,
    "expert_parallel_mlp": expert_parallel_mlp,
    "switchhead_v": switchhead_v,
    "switchhead_o": switchhead_o,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name: str, deterministic: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    check_against_float64(CASES[name](dtype=dtype), deterministic)


EDGE_CASES = {
    "k=1": lambda: sigma_moe(n_tokens=9, k=1),
    "N=1": lambda: sigma_moe(n_tokens=1, k=3),
    "N=1,k=1": lambda: sigma_moe(n_tokens=1, k=1),
    "k=E": lambda: sigma_moe(n_tokens=4, n_experts=3, k=3),
    # 40 pairs on one expert span several blocks of 16 (the interpreter's BLOCK_M).
    "one_expert_mlp": lambda: _mlp_case(
        torch.randn(8, 32),
        5,
        32,
        torch.rand(40),
        torch.full((40,), 2),
        torch.randint(0, 8, (40,)),
        torch.float32,
    ),
    "one_expert_linear": lambda: _linear_case(
        torch.randn(8, 32),
        torch.randn(5, 32, 16) / 6,
        torch.rand(40),
        torch.full((40,), 4),
        torch.randint(0, 8, (40,)),
        torch.randint(0, 3, (40,)),
        3,
        torch.float32,
    ),
    "hidden_not_power_of_two": lambda: sigma_moe(hidden=20, d=24),
    "no_pairs_mlp": lambda: expert_parallel_mlp(n_pairs=0),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases(name: str) -> None:
    torch.manual_seed(1)
    check_against_float64(EDGE_CASES[name](), deterministic=False)


def test_deterministic_mode_is_bitwise_reproducible() -> None:
    torch.manual_seed(2)
    for case in (_on_device(sigma_moe()), _on_device(switchhead_o())):
        grad_out = torch.randn(case.reference(*case.inputs, *case.routing).shape, device=DEVICE)
        first, second = (_triton_run(case, grad_out, deterministic=True) for _ in range(2))
        for a, b in zip([first[0], *first[1]], [second[0], *second[1]], strict=True):
            assert torch.equal(a, b)


def test_deterministic_follows_torch_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real_forward = triton_kernels.mlp_forward

    def spy(*args: object) -> torch.Tensor:
        seen.append(args[-1])
        return real_forward(*args)

    monkeypatch.setattr(triton_kernels, "mlp_forward", spy)
    case = _on_device(sigma_moe(n_tokens=2))
    moe_mlp(*case.inputs, *case.routing, backend="triton")
    with poisoned_allocations():
        moe_mlp(*case.inputs, *case.routing, backend="triton")
        moe_mlp(*case.inputs, *case.routing, backend="triton", deterministic=False)
    assert seen == [False, True, False]


def test_opcheck() -> None:
    torch.manual_seed(3)
    mlp = _on_device(sigma_moe(n_tokens=3, d=16, hidden=16, k=2))
    linear = _on_device(switchhead_o(n_tokens=3, d=16))
    differentiable = lambda case: [t.detach().requires_grad_() for t in case.inputs]
    for deterministic in (False, True):
        for case, op in ((mlp, ops.moe_mlp_op), (linear, ops.moe_linear_op)):
            torch.library.opcheck(op, (*differentiable(case), *case.routing, True, deterministic))
    grad_out = torch.randn(3, 16, device=DEVICE)
    # The Triton path hands nothing over to its backward.
    no_rows, no_plan = torch.empty(0, 16, device=DEVICE), torch.empty(0, dtype=torch.int64)
    torch.library.opcheck(
        ops.moe_mlp_backward_op,
        (grad_out, *mlp.inputs, *mlp.routing, no_rows, no_plan.to(DEVICE), True, True),
    )
    experts, in_rows, out_rows, _ = linear.routing
    torch.library.opcheck(
        ops.moe_linear_backward_op,
        (grad_out, *linear.inputs, experts, in_rows, out_rows, no_rows, no_plan.to(DEVICE),
         True, True),
    )  # fmt: skip


def test_torch_compile_traces_without_graph_breaks() -> None:
    torch.manual_seed(4)
    mlp = _on_device(sigma_moe(n_tokens=4, d=16, hidden=16, k=2))
    linear = _on_device(switchhead_o(n_tokens=4, d=16))

    def layer(x, up, down, gates, o_in, o_weight, o_gates):
        y = moe_mlp(x, up, down, gates, *mlp.routing, backend="triton")
        return y + moe_linear(o_in, o_weight, o_gates, *linear.routing, backend="triton")

    inputs = [t.detach().requires_grad_() for t in (*mlp.inputs, *linear.inputs)]
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(*inputs).square().sum().backward()
    compiled_grads = [t.grad for t in inputs]
    eager_inputs = [t.detach().requires_grad_() for t in inputs]
    layer(*eager_inputs).square().sum().backward()
    for compiled_grad, eager in zip(compiled_grads, eager_inputs, strict=True):
        torch.testing.assert_close(compiled_grad, eager.grad)


def test_model_with_triton_kernels_matches_pytorch_path() -> None:
    from moeut_dist.config import MoEUTConfig
    from moeut_dist.model import MoEUTLM, lm_loss

    torch.manual_seed(5)
    models = {
        kernel: MoEUTLM(MoEUTConfig.from_profile("tiny", kernel=kernel)).to(DEVICE)
        for kernel in ("torch", "triton")
    }
    models["triton"].load_state_dict(models["torch"].state_dict())
    tokens = torch.randint(0, 256, (2, 9), device=DEVICE)
    results = {}
    for kernel, model in models.items():
        model.train()
        output = model(tokens[:, :-1])
        loss = lm_loss(output.logits, tokens[:, 1:]) + output.reg_loss
        loss.backward()
        results[kernel] = (output.logits, {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(
            results["triton"][1][name],
            grad,
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, n=name: f"{n}: {m}",
        )


def test_mixed_dtypes_are_refused_by_name() -> None:
    x, up, down, gates = _on_device(sigma_moe()).inputs
    experts, rows = _on_device(sigma_moe()).routing
    with pytest.raises(ValueError, match=r"share a dtype, got \['bfloat16', 'float32'\]"):
        moe_mlp(x.bfloat16(), up, down, gates, experts, rows, backend="triton")


def test_autocast_runs_the_kernels_in_the_autocast_dtype() -> None:
    """Under autocast the fp32 weights meet bf16 activations; both go to the kernel in bf16."""
    case = _on_device(sigma_moe())
    device = case.inputs[0].device.type
    with torch.autocast(device, dtype=torch.bfloat16):
        out = moe_mlp(*case.inputs, *case.routing, backend="triton")
    assert out.dtype == torch.bfloat16
    expected = reference.moe_mlp(*(t.double() for t in case.inputs), *case.routing)
    assert _relative_error(out, expected) < 1e-2


def test_autotuning_never_chooses_a_reduction_chunk():
    """What the autotuner may pick by timing must not change the order of any sum, or runs in
    different processes would round differently (deterministic mode included)."""
    autotuned = [
        value
        for value in vars(triton_kernels).values()
        if isinstance(value, triton.runtime.Autotuner)
    ]
    assert len(autotuned) == 4
    for kernel in autotuned:
        for config in kernel.configs:
            assert set(config.kwargs) <= {"BLOCK_N", "BLOCK_I", "BLOCK_J"}, kernel.fn.__name__
