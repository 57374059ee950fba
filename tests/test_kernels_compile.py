"""Every Triton kernel compiles for Hopper (sm_90, the H100/H200) with every autotuning config,
and each launch has a config that fits its shared memory — checked without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_kernels_compile_for_hopper():
    # The interpreter (set by conftest for the other kernel tests) would compile nothing.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernel_compile_check", "--arch", "90",
         "--dtypes", "bfloat16", "float32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("sm_90: ok")
    assert "bfloat16 deterministic=True" in result.stdout
