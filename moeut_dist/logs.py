"""Log output that reads well in a terminal, a SLURM log, `tee` or CI alike.

`configure(level)` sends our messages (the `moeut_dist` and `data_prep` loggers) and Python
warnings to stderr as `time LEVEL [rank r] message`, the rank shown only in multi-process runs,
where ranks other than 0 report only warnings and errors (everything at level debug).
Dependencies' messages that tell our users nothing are dropped: Megatron-core's note that
Transformer Engine and Apex are missing (we use neither), DeepSpeed's "Setting accelerator to
CPU" (the run says which device it uses) and DeepSpeed's per-process report that its CPU
shared-memory collective built (kept on rank 0). Every other warning stays.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator

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
