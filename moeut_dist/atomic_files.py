"""Files that readers see whole or not at all: written under a hidden temporary name, flushed to
disk, then renamed over the target (a rename within one directory is atomic), and the rename
itself flushed, so that a power loss cannot undo a write that was reported done."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """`write(temporary_path)` produces the file's content; then it replaces `path` at once."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        write(temporary)
        fsync_path(temporary)
        os.replace(temporary, path)
        fsync_path(path.parent)
    finally:
        temporary.unlink(missing_ok=True)  # only left if something failed before the rename


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's content, or a directory's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json_atomically(path: str | os.PathLike, values: Any) -> None:
    write_atomically(path, lambda p: p.write_text(json.dumps(values, indent=1)))
