"""Learning-rate schedules: linear warm-up, then a cosine to a floor (the paper's) or WSD.

WSD (warm-up, stable, decay) holds the full rate after the warm-up and decays only over the last
`decay_steps` steps, so one long run can be branched into decays at several lengths.
"""

from __future__ import annotations

import math

from moeut_dist.train.config import ScheduleSection


def lr_multiplier(step: int, schedule: ScheduleSection) -> float:
    """Multiplier of the base learning rate for the update of step `step` (0-based).

    Warm-up reaches 1 at step `warmup_steps - 1`. The cosine then falls from 1 to
    `min_lr_ratio`, which the last step (`steps - 1`) reaches when the cosine has at least two
    steps (with one, that step keeps the full rate). WSD stays at 1 until its decay, whose
    `decay_steps` steps end at `min_lr_ratio` on the last step.
    """
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.kind == "wsd":
        return _wsd(step, schedule)
    decay_steps = schedule.steps - schedule.warmup_steps
    if decay_steps <= 1:
        return 1.0
    progress = min((step - schedule.warmup_steps) / (decay_steps - 1), 1.0)
    return _decayed(schedule.min_lr_ratio, progress, "cosine")


def _wsd(step: int, schedule: ScheduleSection) -> float:
    decay_start = schedule.steps - schedule.decay_steps
    if step < decay_start:
        return 1.0
    # The decay's first step is already below 1; its last (steps - 1) is at the floor.
    progress = min((step - decay_start + 1) / schedule.decay_steps, 1.0)
    return _decayed(schedule.min_lr_ratio, progress, schedule.decay_shape)


def _decayed(floor: float, progress: float, shape: str) -> float:
    """From 1 at progress 0 to `floor` at progress 1."""
    if shape == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif shape == "sqrt":
        remaining = 1.0 - math.sqrt(progress)
    else:
        remaining = 1.0 - progress
    return floor + (1.0 - floor) * remaining
