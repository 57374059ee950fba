"""Compile every Triton kernel for NVIDIA GPUs on a machine without one.

    python -m tests.kernel_compile_check [--arch 90] [--dtypes bfloat16 float32 float16]

(TRITON_INTERPRET must be unset.)

The host code of `moeut_dist.kernels.triton_kernels` runs as usual on CPU tensors, but each
kernel launch only compiles (Triton → PTX → cubin with the bundled ptxas) for the requested
architecture, with every autotuning config, instead of running. A kernel that does not compile,
or a launch none of whose configs fits the architecture's shared memory, fails the check
(configs that do not fit are listed: the autotuner skips them). It cannot tell
whether the kernels compute the right numbers (the interpreter tests do) or how fast they are.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# Shared memory one block may use (bytes): A100 (sm_80) and H100/H200 (sm_90).
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}


class _CompileOnlyDriver:
    """Answers what compiling asks of a driver; launching is never reached."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclass(frozen=True)
class Compiled:
    launch: int  # the launch it was compiled for; an autotuned launch compiles every config
    kernel: str
    warps: int
    shared: int  # bytes of shared memory per block


def compile_instead_of_launching(arch: int) -> list[Compiled]:
    """From now on in this process, kernel launches compile for sm_`arch` (every autotuning
    config) instead of running; returns the list that collects what was compiled.

    One architecture per process: Triton caches compiled kernels per device, not per target.
    """
    compiled: list[Compiled] = []
    launches = itertools.count()
    autotuned_launch: list[int] = []  # set while an autotuner compiles its configs
    jit_run = JITFunction.run

    def compile_kernel(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        launch = autotuned_launch[0] if autotuned_launch else next(launches)
        metadata = kernel.metadata
        compiled.append(Compiled(launch, self.fn.__name__, metadata.num_warps, metadata.shared))
        return kernel

    def compile_every_config(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        autotuned_launch.append(next(launches))
        try:
            self.warmup(*args, **kwargs)
        finally:
            autotuned_launch.clear()

    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run, Autotuner.run = compile_kernel, compile_every_config
    return compiled


def _launch_every_kernel(dtype: torch.dtype, deterministic: bool) -> None:
    """Forward and backward of both ops at MoEUT-like shapes (d = 256, m = 128, dh = 128)."""
    from moeut_dist.kernels import triton_kernels as kernels

    n, d, n_experts, m, k = 64, 256, 7, 128, 4
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=generator).to(dtype)
    up = torch.randn(n_experts, d, m, generator=generator).to(dtype)
    down = torch.randn(n_experts, m, d, generator=generator).to(dtype)
    rows = torch.arange(n).repeat_interleave(k)
    experts = torch.randint(n_experts, (n * k,), generator=generator)
    gates = torch.rand(n * k, generator=generator)
    grad = torch.randn(n, d, generator=generator).to(dtype)
    kernels.mlp_forward(x, up, down, gates, experts, rows, deterministic)
    kernels.mlp_backward(grad, x, up, down, gates, experts, rows, deterministic)
    values = torch.randn(n_experts, d, m, generator=generator).to(dtype)
    kernels.linear_forward(x, values, gates, experts, rows, rows, n, deterministic)
    kernels.linear_backward(
        torch.randn(n, m, generator=generator).to(dtype), x, values, gates, experts, rows, rows,
        deterministic,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument(
        "--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    limit = SHARED_MEMORY_LIMIT[args.arch]
    compiled = compile_instead_of_launching(args.arch)
    for dtype_name, deterministic in itertools.product(args.dtypes, (False, True)):
        start = len(compiled)
        _launch_every_kernel(getattr(torch, dtype_name), deterministic)
        these = compiled[start:]
        print(
            f"sm_{args.arch} {dtype_name:8} deterministic={deterministic!s:5} "
            f"{len(these):3} kernels compiled; shared memory up to "
            f"{max(c.shared for c in these)} B (limit {limit} B)"
        )
    # The autotuner skips a config that does not fit; a launch fails only if none does.
    by_launch: dict[int, list[Compiled]] = {}
    for entry in compiled:
        by_launch.setdefault(entry.launch, []).append(entry)
    unusable = [configs[0].kernel for configs in by_launch.values()
                if all(c.shared > limit for c in configs)]  # fmt: skip
    skipped = sorted({(c.kernel, c.warps, c.shared) for c in compiled if c.shared > limit})
    for kernel, warps, shared in skipped:
        print(f"skipped by the autotuner on sm_{args.arch}: {kernel} ({warps} warps, {shared} B)")
    for kernel in unusable:
        print(f"no config of {kernel} fits sm_{args.arch}'s shared memory")
    print(f"triton {triton.__version__}, sm_{args.arch}: {'FAILED' if unusable else 'ok'}")
    return 1 if unusable else 0


if __name__ == "__main__":
    sys.exit(main())
