"""The learning-rate schedule: linear warm-up, then a cosine down to a floor (the paper's)."""

from __future__ import annotations

import math

from moeut_dist.train.config import ScheduleSection


def lr_multiplier(step: int, schedule: ScheduleSection) -> float:
    """Multiplier of the base learning rate for the update of step `step` (0-based).

    Warm-up reaches 1 at step `warmup_steps - 1`; the cosine then falls from 1 to
    `min_lr_ratio`, which the last step (`steps - 1`) reaches when the cosine has at least two
    steps (with one, that step keeps the full rate).
    """
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    decay_steps = schedule.steps - schedule.warmup_steps
    if decay_steps <= 1:
        return 1.0
    progress = min((step - schedule.warmup_steps) / (decay_steps - 1), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * cosine
