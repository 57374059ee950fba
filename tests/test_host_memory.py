"""`keep_freed_memory`: a large CPU tensor made again and again comes to reuse freed pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

_FAULTS_ONCE_SETTLED = """
import resource, sys
import torch
from moeut_dist.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
size = 40 << 20  # bytes: above glibc's largest mmap threshold (32 MB)
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.empty(size // 4).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del tensor
# The fewest of the last ten: glibc places the first few apart (aligned allocations do not fit
# the block just freed) until freed blocks coalesce, after a handful of rounds.
print(min(faults[10:]))
"""


def _faults_once_settled(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", _FAULTS_ONCE_SETTLED, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_pages_are_reused_without_page_faults():
    pages = (40 << 20) // 4096
    assert _faults_once_settled("default") > pages // 2  # mapped afresh
    assert _faults_once_settled("keep") < pages // 20
