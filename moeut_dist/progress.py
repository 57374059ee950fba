"""Progress of a long loop (training steps, tokenised tokens) that reads well anywhere.

On a terminal (stderr) it is a tqdm bar. Anywhere else (`tee`, SLURM and CI logs) a bar's
carriage-return updates pile up on one line, so it is one plain log line every N steps or T
seconds instead, with the count, the caller's values, tokens/s, elapsed time and ETA.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time

from tqdm import tqdm


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


class Progress:
    """Progress of a loop toward `total` units (None: unknown), from `initial`.

    On a terminal (stderr) this is today's tqdm bar. Anywhere else a plain line goes to the
    `moeut_dist.progress` logger when `every_steps` units (None: no step rule) or
    `every_seconds` seconds have passed
    since the last one, and at the end: units done, the caller's `values`, tokens/s, elapsed time
    and (with a total) the ETA. `tokens_per_unit` converts units to tokens.
    """

    def __init__(
        self,
        *,
        total: int | None,
        initial: int = 0,
        unit: str = "step",
        tokens_per_unit: int = 1,
        enabled: bool = True,
        every_steps: int | None = 100,
        every_seconds: float = 60.0,
        terminal: bool | None = None,
    ) -> None:
        self.total, self.done, self.unit = total, initial, unit
        self.tokens_per_unit = tokens_per_unit
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.enabled = enabled
        self.started = self.last_line = time.monotonic()
        self.initial = self.last_done = initial
        self.values: dict[str, str] = {}
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        if enabled and terminal:
            unit_scale = unit != "step"
            self.bar = tqdm(
                total=total, initial=initial, unit=unit, unit_scale=unit_scale, dynamic_ncols=True
            )
        self.logger = logging.getLogger("moeut_dist.progress")

    def update(self, units: int = 1, **values: str) -> None:
        """`units` more done; `values` (already formatted) describe the latest one."""
        self.done += units
        self.values.update(values)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(units)
            if values:
                self.bar.set_postfix(self.values)
            return
        due = time.monotonic() - self.last_line >= self.every_seconds
        if self.every_steps is not None:
            due |= self.done - self.last_done >= self.every_steps
        if due:
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        if self.total is not None:
            percent = 100 * self.done / self.total if self.total else 100.0
            parts = [f"{self.unit} {self.done}/{self.total} ({percent:.0f}%)"]
        else:
            parts = [f"{_count(self.done)} {self.unit}"]
        parts += [f"{name} {value}" for name, value in self.values.items()]
        parts.append(f"{_count(rate * self.tokens_per_unit)} tok/s")
        timing = f"elapsed {_duration(elapsed)}"
        if self.total is not None and rate > 0:
            timing += f", ETA {_duration((self.total - self.done) / rate)}"
        parts.append(timing)
        self.logger.info(" | ".join(parts))
        self.last_line, self.last_done = time.monotonic(), self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done != self.last_done:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
