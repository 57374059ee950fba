"""The benchmarks' one way to time functions against each other on a shared, noisy machine.

A sibling module of the scripts: they run as `python bench/<name>.py`, which puts this folder
on the import path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternating_seconds(
    fns: dict[str, Callable[[], object]], repeats: int
) -> dict[str, list[float]]:
    """Seconds of each function in each of `repeats` rounds, after a warm-up round. In a round
    every function runs once, so that a shared machine's load hits all of them alike, and the
    order reverses every round, so that each follows each of the others (and itself) equally
    often: one that always ran right after another would inherit its caches and freed memory."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for repeat in range(repeats + 1):
        for name in list(fns) if repeat % 2 else reversed(fns):
            start = time.perf_counter()
            fns[name]()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the rounds' own ratios: each round ran both back to back, so a change in
    the machine's load between rounds cancels."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))
