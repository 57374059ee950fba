"""Files that readers see whole or not at all: written under a hidden temporary name, flushed to
disk, then renamed over the target (a rename within one directory is atomic), and the rename
itself flushed, so that a power loss cannot undo a write that was reported done."""

from __future__ import annotations

import errno
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
    """Flush a file's content, or a directory's entries, to disk. Some network and FUSE file
    systems cannot flush a directory; there the file's own flush is all there is."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if not (os.path.isdir(path) and error.errno in _DIRECTORY_FSYNC_UNSUPPORTED):
            raise
    finally:
        os.close(descriptor)


_DIRECTORY_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


def write_json_atomically(path: str | os.PathLike, values: Any) -> None:
    write_atomically(path, lambda p: p.write_text(json.dumps(values, indent=1)))
