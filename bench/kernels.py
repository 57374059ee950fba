"""Benchmark of the expert kernels: correctness at full size, then forward + backward timings.

On a CUDA GPU: the MoEUT-244M shapes in bf16 (σ-MoE N = 64×1024 tokens, d = 1024, E = 387,
m = 128, k = 16; SwitchHead H = 4, dh = 128, Ea = 10, ka = 2). For each operation it prints the
time of forward + backward, useful TFLOP/s, the speed-up over the pure-PyTorch path, the fraction
of the throughput of a dense bf16 matmul doing the same FLOPs (the ceiling), peak memory, and
the activation bytes per token autograd keeps for backward. Without a GPU it runs a small smoke
test through the Triton interpreter (timings there mean nothing).

Everywhere it then times the PyTorch path (`torch_kernels`, what CPUs run) against the
plain-autograd reference it replaced, at the MoEUT-44M shapes in fp32 (512 tokens, d = 412,
E = 155, m = 128, k = 12; H = 4, dh = 82, Ea = 8, ka = 2): forward + backward of σ-MoE and
both SwitchHead projections over `--repeats` rounds (each path once a round, the order
reversing every round): the median time, the speed-up over the reference by medians, by
minima and paired (the median of each round's own ratio, which a change in the machine's load
between rounds does not move), and the activation bytes kept per token. With `--against
REVISION` a third path joins the rounds: the PyTorch path as it was at that git revision (its
`torch_kernels.py`, swapped into the custom ops), so that a change is measured against what it
changed in one run, on one machine's load. With `--compiled`, the reference under
`torch.compile` (dynamic shapes, since the split sizes change with every routing) joins them
too, after a first call that is timed apart (tracing and inductor's C++ builds).

    python bench/kernels.py [--repeats 21] [--against REVISION] [--compiled]

Imports only torch, triton, numpy and moeut_dist.kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from alternating import alternating_seconds, paired_ratio

if not torch.cuda.is_available():
    # Must precede the first `triton.jit` decoration, i.e. importing the kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moeut_dist.activation_memory import SavedTensorBytes
from moeut_dist.host_memory import keep_freed_memory
from moeut_dist.kernels import moe_linear, moe_mlp, ops, reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


@dataclass(frozen=True)
class Shapes:
    n_tokens: int
    d: int
    n_experts: int
    expert_size: int
    k: int
    heads: int
    head_dim: int
    att_experts: int
    att_k: int


MOEUT_244M = Shapes(64 * 1024, 1024, 387, 128, 16, 4, 128, 10, 2)
MOEUT_44M = Shapes(512, 412, 155, 128, 12, 4, 82, 8, 2)
SMOKE = Shapes(64, 64, 7, 32, 4, 2, 32, 3, 2)


@dataclass
class Workload:
    name: str
    op: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    inputs: list[torch.Tensor]  # differentiable
    routing: tuple[object, ...]
    flops: float  # forward + backward, useful work only


def _top_k(n_tokens: int, n_choices: int, k: int) -> torch.Tensor:
    return torch.rand(n_tokens, n_choices, device=DEVICE).topk(k, dim=1).indices


def _param(*shape: int, fan_in: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) / fan_in**0.5).to(dtype).requires_grad_()


def workloads(s: Shapes, dtype: torch.dtype = DTYPE) -> list[Workload]:
    n, d, m = s.n_tokens, s.d, s.expert_size
    pairs = n * s.k
    mlp = Workload(
        f"σ-MoE  N={n} d={d} E={s.n_experts} m={m} k={s.k}",
        moe_mlp,
        reference.moe_mlp,
        [_param(n, d, fan_in=1, dtype=dtype),
         _param(s.n_experts, d, m, fan_in=d, dtype=dtype),
         _param(s.n_experts, m, d, fan_in=m, dtype=dtype),
         torch.rand(pairs, device=DEVICE).requires_grad_()],
        (_top_k(n, s.n_experts, s.k).flatten(),
         torch.arange(n, device=DEVICE).repeat_interleave(s.k)),
        flops=3 * 2 * pairs * 2 * d * m,
    )  # fmt: skip
    h, dh, ea, ka = s.heads, s.head_dim, s.att_experts, s.att_k
    att_pairs = n * h * ka
    head = torch.arange(h, device=DEVICE).repeat(n, 1)
    experts = (head[..., None] * ea + _top_k(n * h, ea, ka).view(n, h, ka)).flatten()
    token_rows = torch.arange(n, device=DEVICE).repeat_interleave(h * ka)
    token_head_rows = (torch.arange(n, device=DEVICE)[:, None] * h + head).repeat_interleave(ka, 1)
    att_flops = 3 * 2 * att_pairs * d * dh
    v_proj = Workload(
        f"SwitchHead V  N={n} d={d} H={h} dh={dh} Ea={ea} ka={ka}",
        moe_linear,
        reference.moe_linear,
        [_param(n, d, fan_in=1, dtype=dtype), _param(h * ea, d, dh, fan_in=d, dtype=dtype),
         torch.rand(att_pairs, device=DEVICE).requires_grad_()],
        (experts, token_rows, token_head_rows.flatten(), n * h),
        flops=att_flops,
    )  # fmt: skip
    o_proj = Workload(
        f"SwitchHead O  N={n} d={d} H={h} dh={dh} Ea={ea} ka={ka}",
        moe_linear,
        reference.moe_linear,
        [_param(n * h, dh, fan_in=1, dtype=dtype), _param(h * ea, dh, d, fan_in=dh, dtype=dtype),
         torch.rand(att_pairs, device=DEVICE).requires_grad_()],
        (experts, token_head_rows.flatten(), token_rows, n),
        flops=att_flops,
    )  # fmt: skip
    return [mlp, v_proj, o_proj]


def _call(work: Workload, backend: str, **kwargs: object) -> torch.Tensor:
    """`backend` "reference" is the plain-autograd path, "compiled reference" the same under
    `torch.compile`; the others are `kernels` backends."""
    if backend == "reference":
        return work.reference(*work.inputs, *work.routing)
    if backend == "compiled reference":
        return _compiled(work.reference)(*work.inputs, *work.routing)
    return work.op(*work.inputs, *work.routing, backend=backend, **kwargs)


@functools.cache
def _compiled(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return torch.compile(function, dynamic=True)


def forward_backward(work: Workload, backend: str, **kwargs: object) -> list[torch.Tensor]:
    out = _call(work, backend, **kwargs)
    grad_out = torch.ones_like(out)
    return [out, *torch.autograd.grad(out, work.inputs, grad_out)]


def relative_errors(work: Workload) -> list[float]:
    """Triton in DTYPE against the PyTorch path in fp32 on the same (rounded) inputs."""
    fp32 = Workload(
        work.name, work.op, work.reference,
        [t.detach().float().requires_grad_() for t in work.inputs],
        work.routing, work.flops,
    )  # fmt: skip
    expected = forward_backward(fp32, "torch")
    actual = forward_backward(work, "triton")
    return [
        ((a.float() - e).norm() / e.norm()).item() for a, e in zip(actual, expected, strict=True)
    ]


def seconds(fn: Callable[[], object]) -> float:
    if ON_GPU:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200) / 1e3
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_bytes(fn: Callable[[], object]) -> int | None:
    if not ON_GPU:
        return None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def saved_activation_bytes(work: Workload, backend: str) -> int:
    """Bytes autograd keeps between forward and backward, beyond the inputs themselves."""
    arguments = [*work.inputs, *(t for t in work.routing if torch.is_tensor(t))]
    with SavedTensorBytes(arguments) as saved:
        out = _call(work, backend)
    del out
    return saved.bytes


def dense_matmul_seconds(flops: float) -> float:
    """A bf16 (fp32 off GPU) matmul [M, 4096] @ [4096, 4096] with M chosen to match `flops`."""
    width = 4096 if ON_GPU else 64
    rows = max(1, round(flops / (2 * width * width)))
    a = torch.randn(rows, width, device=DEVICE, dtype=DTYPE)
    b = torch.randn(width, width, device=DEVICE, dtype=DTYPE)
    return seconds(lambda: a @ b) * flops / (2 * rows * width * width)


def main() -> None:
    torch.manual_seed(0)
    shapes = MOEUT_244M if ON_GPU else SMOKE
    device = torch.cuda.get_device_name() if ON_GPU else "CPU, Triton interpreter (smoke test)"
    print(f"device: {device}; dtype: {DTYPE}; torch {torch.__version__}")
    header = (
        f"{'operation':<46} {'backend':<20} {'fwd+bwd ms':>10} {'TFLOP/s':>8} {'vs torch':>8} "
        f"{'vs dense':>8} {'peak MiB':>9} {'saved B/token':>13}"
    )
    print(header)
    print("-" * len(header))
    for work in workloads(shapes):
        errors = relative_errors(work)
        worst = max(errors)
        tolerance = 2e-2 if torch.float32 != DTYPE else 1e-4
        status = "ok" if worst < tolerance else "FAILED"
        print(f"{work.name}: max relative error (out, grads) {worst:.1e} {status}")
        dense = dense_matmul_seconds(work.flops)
        variants = [("torch", "torch", {}), ("triton", "triton", {})]
        if work.op is moe_mlp:
            variants.append(("triton deterministic", "triton", {"deterministic": True}))
        times = {}
        for label, backend, kwargs in variants:
            run = lambda w=work, b=backend, kw=kwargs: forward_backward(w, b, **kw)
            times[label] = seconds(run)
            peak = peak_bytes(run)
            saved = saved_activation_bytes(work, backend) / shapes.n_tokens
            print(
                f"{'':<46} {label:<20} {times[label] * 1e3:>10.3f} "
                f"{work.flops / times[label] / 1e12:>8.1f} {times['torch'] / times[label]:>8.2f} "
                f"{dense / times[label]:>8.2f} "
                f"{'-' if peak is None else f'{peak / 2**20:.0f}':>9} {saved:>13.0f}"
            )
    print("vs dense: fraction of an equal-FLOP dense matmul's throughput (1.0 = ceiling)")


def torch_kernels_at(revision: str) -> ModuleType:
    """`moeut_dist/kernels/torch_kernels.py` as it was at a git revision of this checkout."""
    source = subprocess.run(
        ["git", "show", f"{revision}:moeut_dist/kernels/torch_kernels.py"],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = ModuleType(f"torch_kernels at {revision}")
    exec(compile(source, f"{revision}:torch_kernels.py", "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def pytorch_path(module: ModuleType) -> Iterator[None]:
    """Runs the custom ops' PyTorch path from `module` (a `torch_kernels`) within the block."""
    today, ops.torch_kernels = ops.torch_kernels, module
    try:
        yield
    finally:
        ops.torch_kernels = today


def compare_pytorch_paths(repeats: int, against: str | None = None, compiled: bool = False) -> None:
    """The PyTorch path against the plain-autograd reference it replaced, against its version
    at git revision `against` if given, and against the reference compiled if `compiled`, at
    the 44M shapes, with freed memory kept for reuse as `moeut train` keeps it on CPUs."""
    kept = keep_freed_memory() if not ON_GPU else False
    print(
        f"\nPyTorch path vs reference, MoEUT-44M shapes, fp32, {torch.get_num_threads()} threads, "
        f"freed memory {'kept' if kept else 'returned'}; {repeats} rounds. Speed-up over the "
        "reference: of the medians, of the minima, and the median of each round's own ratio"
    )
    paths = {"reference": ("reference", ops.torch_kernels), "torch": ("torch", ops.torch_kernels)}
    if against:
        paths[f"torch at {against}"] = ("torch", torch_kernels_at(against))
    if compiled:
        paths["compiled reference"] = ("compiled reference", ops.torch_kernels)
    header = (
        f"{'operation':<46} {'path':<20} {'ms':>7} {'speed-up':>8} {'(minima)':>8} "
        f"{'(paired)':>8} {'B/token kept':>12}"
    )
    print(header)
    print("-" * len(header))
    totals = {path: ([0.0] * repeats, 0.0) for path in paths}
    first_calls = []
    for work in workloads(MOEUT_44M, torch.float32):
        if compiled:
            first_calls.append(f"{work.name}: {seconds_of_first_call(work):.0f} s")

        def run(path: str, work: Workload = work) -> None:
            backend, module = paths[path]
            with pytorch_path(module):
                forward_backward(work, backend)

        rounds = alternating_seconds(
            {path: functools.partial(run, path) for path in paths}, repeats
        )
        rows = {}
        for path, (backend, module) in paths.items():
            with pytorch_path(module):
                kept_bytes = saved_activation_bytes(work, backend) / MOEUT_44M.n_tokens
            rows[path] = (rounds[path], kept_bytes)
            total_rounds, total_bytes = totals[path]
            summed = [t + r for t, r in zip(total_rounds, rounds[path], strict=True)]
            totals[path] = (summed, total_bytes + kept_bytes)
        _print_comparison(work.name, rows)
    _print_comparison("σ-MoE + SwitchHead V + O", totals)
    if compiled:
        print("compiled reference, first call:", "; ".join(first_calls))


def seconds_of_first_call(work: Workload) -> float:
    started = time.perf_counter()
    forward_backward(work, "compiled reference")
    return time.perf_counter() - started


def _print_comparison(name: str, rows: dict[str, tuple[list[float], float]]) -> None:
    """A line per path: its median ms, its speed-up over the reference (by medians, by minima,
    and paired), and the bytes per token it keeps for backward."""
    reference = rows["reference"][0]
    for path, (seconds, kept_bytes) in rows.items():
        paired = paired_ratio(reference, seconds)
        print(
            f"{name:<46} {path:<20} {statistics.median(seconds) * 1e3:>7.1f} "
            f"{statistics.median(reference) / statistics.median(seconds):>8.2f} "
            f"{min(reference) / min(seconds):>8.2f} {paired:>8.2f} {kept_bytes:>12.0f}"
        )
        name = ""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=21,
        help="rounds of the comparison (~0.3 s each on 2 CPU threads)",
    )
    parser.add_argument(
        "--against",
        metavar="REVISION",
        help="also time the PyTorch path as it was at this git revision (its torch_kernels.py)",
    )
    parser.add_argument(
        "--compiled", action="store_true", help="also time the reference under torch.compile"
    )
    arguments = parser.parse_args()
    main()
    compare_pytorch_paths(arguments.repeats, arguments.against, arguments.compiled)
