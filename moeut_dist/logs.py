"""Log output that reads well in a terminal, a SLURM log, `tee` or CI alike.

`configure(level)` sends our messages (the `moeut_dist` and `data_prep` loggers) and Python
warnings to stderr as `time LEVEL [rank r] message`, the rank shown only in multi-process runs,
where ranks other than 0 report only warnings and errors (everything at level debug).
Dependencies' messages that tell our users nothing are dropped: Megatron-core's note that
Transformer Engine and Apex are missing (we use neither), DeepSpeed's "Setting accelerator to
CPU" (the run says which device it uses) and DeepSpeed's per-process report that its CPU
shared-memory collective built (kept on rank 0). Every other warning stays.

`Progress` reports a loop's progress: a tqdm bar when stderr is a terminal, otherwise one plain
line every N steps or T seconds, never a carriage return.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

# (logger name, part of the message) of dependency messages dropped on every rank.
_NOISE = (
    ("py.warnings", "Transformer Engine and Apex are not installed"),
    ("DeepSpeed", "Setting accelerator to CPU"),
)
_OUR_LOGGERS = ("moeut_dist", "data_prep")
LEVELS = ("debug", "info", "warning", "error")


def rank() -> int:
    """This process's rank as the launcher announced it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


class _DropNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # A captured warning's message is "file:line: Category: text".
        return not any(fragment in message for fragment in self.fragments)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (test harnesses swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: str = "info") -> None:
    """Our loggers and Python warnings to stderr at `level`; dependency noise dropped.

    The handler sits on the root logger, so dependencies' warnings that propagate get the same
    format (the root stays at WARNING); calling this again changes the level and format.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    where = f"[rank {rank()}] " if world_size > 1 else ""
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(existing)
    handler = _StderrHandler()
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {where}%(message)s", "%Y-%m-%d %H:%M:%S")
    )
    root.addHandler(handler)
    logging.captureWarnings(True)
    # Rank 0 speaks for the run; other ranks add only their warnings and errors (and everything
    # at debug level).
    if rank() != 0 and level != "debug":
        level = max(level, "warning", key=LEVELS.index)
    for name in _OUR_LOGGERS:
        logging.getLogger(name).setLevel(level.upper())
    # Filters sit on the loggers themselves, which DeepSpeed's logger factory reuses when it is
    # imported later.
    for name in {name for name, _ in _NOISE}:
        logger = logging.getLogger(name)
        for existing in [f for f in logger.filters if isinstance(f, _DropNoise)]:
            logger.removeFilter(existing)
        logger.addFilter(_DropNoise(tuple(text for n, text in _NOISE if n == name)))


@contextlib.contextmanager
def stdout_on_rank0_only() -> Iterator[None]:
    """Drop what dependencies print to stdout on ranks other than 0 (DeepSpeed's per-process
    build reports) while the block runs."""
    if rank() == 0:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


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
