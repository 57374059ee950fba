"""A training step on the CPU reuses its memory: with `keep_freed_memory` (what `moeut train` does
on CPUs) a step's page faults do not grow with the parameter count, although DeepSpeed's ZeRO
flattens every gradient into a fresh partition buffer each step (`stage_1_and_2.py` `step()`;
there is no switch for it in DeepSpeed 0.19.8) and autograd makes fresh gradients."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# One process, ZeRO-1, the tiny profile with a 32K vocabulary: 4.2M parameters (17 MB), nearly
# all in the embedding and the output layer, at little compute.
_STEP_PAGE_FAULTS = """
import dataclasses, resource, statistics, sys
import torch
from moeut_dist import MoEUTConfig
from moeut_dist.host_memory import keep_freed_memory
from moeut_dist.parallel.build import build_model
from moeut_dist.parallel.engine import create_engine
from moeut_dist.parallel.layout import ParallelConfig, initialize
from moeut_dist.train import loop
from moeut_dist.train.config import OptimSection, RunPlan

if sys.argv[1] == "keep":
    assert keep_freed_memory()
config = dataclasses.replace(MoEUTConfig.from_profile("tiny", kernel="torch"), vocab_size=32768)
parallel = ParallelConfig(zero_stage=1)
plan = RunPlan(config, data_parallel=1, grad_accumulation=1)
batches = (torch.randint(config.vocab_size, (2, 33)) for _ in iter(int, 1))
with loop.distributed_session():
    initialize(parallel, config)
    engine = create_engine(
        build_model(config, parallel, seed=0), parallel, OptimSection(lr=1e-3), 2, bf16=False
    )
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loop.train_step(engine, batches, plan)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
parameter_bytes = sum(p.numel() * p.element_size() for p in engine.module.parameters())
print(statistics.median(faults[4:]), parameter_bytes)
"""


def _page_faults_per_step(mode: str) -> tuple[float, int]:
    result = subprocess.run(
        [sys.executable, "-c", _STEP_PAGE_FAULTS, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", **os.environ},
    )
    faults, parameter_bytes = result.stdout.split()[-2:]
    return float(faults), int(parameter_bytes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_step_reuses_its_memory_whatever_the_parameter_count():
    faults, parameter_bytes = _page_faults_per_step("keep")
    parameter_pages = parameter_bytes / 4096
    assert faults < parameter_pages / 10
    returned, _ = _page_faults_per_step("default")
    assert returned > parameter_pages  # gradients and ZeRO's flat partition, mapped afresh
