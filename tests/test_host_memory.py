"""`keep_freed_memory`: a large CPU tensor made again after one was freed reuses its pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

_FAULTS_OF_A_SECOND_TENSOR = """
import resource, sys
import torch
from moeut_dist.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
size = 40 << 20  # bytes: above glibc's largest mmap threshold (32 MB)
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.empty(size // 4).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del tensor
print(faults)  # of the second tensor
"""


def _faults_of_a_second_tensor(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", _FAULTS_OF_A_SECOND_TENSOR, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_tensor_s_pages_are_reused_without_page_faults():
    pages = (40 << 20) // 4096
    assert _faults_of_a_second_tensor("default") > pages // 2  # mapped afresh
    assert _faults_of_a_second_tensor("keep") < pages // 20
