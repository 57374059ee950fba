"""torch.profiler traces of chosen steps on chosen ranks (`profiling` in the run config).

The trace is a Chrome trace (JSON; chrome://tracing, Perfetto) per rank:
`<out_dir>/profiles/rank<r>_steps<a>-<b>.json`. With `memory` on CUDA, the allocator's history
over the same steps is dumped beside it as `rank<r>_steps<a>-<b>_memory.pickle`, for
pytorch.org/memory_viz. The allocator history is only reachable through
`torch.cuda.memory._record_memory_history` and `_dump_snapshot`, which PyTorch documents as its
interface for this ("Understanding CUDA Memory Usage"); they are used here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from moeut_dist.train.config import ProfilingSection


class StepProfiler:
    """Call `before_step(n)` and `after_step(n)` around step n (1-based); `close()` at the end
    writes a window the run did not finish."""

    def __init__(self, settings: ProfilingSection, out_dir: Path, rank: int) -> None:
        self.first = settings.start_step
        self.last = settings.start_step + settings.steps - 1
        self.enabled = settings.steps > 0 and rank in settings.ranks
        self.memory = settings.memory and torch.cuda.is_available()
        self.directory = out_dir / "profiles"
        self.rank = rank
        self.profiler: profile | None = None
        self.ran_to = 0

    def before_step(self, step: int) -> None:
        if not self.enabled or step != self.first:
            return
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.profiler = profile(activities=activities, record_shapes=True)
        self.profiler.__enter__()
        if self.memory:
            torch.cuda.memory._record_memory_history()

    def after_step(self, step: int) -> None:
        if self.profiler is not None:
            self.ran_to = step
            if step == self.last:
                self.close()

    def close(self) -> None:
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = self.directory / f"rank{self.rank}_steps{self.first}-{self.ran_to}"
        profiler.export_chrome_trace(str(stem) + ".json")
        if self.memory:
            torch.cuda.memory._dump_snapshot(str(stem) + "_memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
