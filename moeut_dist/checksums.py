"""sha256 records of directories whose files must come back exactly as written.

safetensors and torch's zip files carry no checksum, so a flipped bit in a weight would load
silently. A training checkpoint and a model directory each hold `checksums.json`, the sha256 of
every file in them (subfolders included) when they were completed; readers check the files they
use against it and a difference names the file. Files added later (an export's lease) are not
in the record and not checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from moeut_dist.atomic_files import write_json_atomically
from moeut_dist.data.tokenizer import file_sha256

CHECKSUMS_FILE = "checksums.json"
_FORMAT = 1


class ChecksumError(ValueError):
    """A file whose bytes differ from the sha256 recorded when its directory was written, or a
    record that is missing or damaged."""


def record_checksums(directory: str | os.PathLike, skip: Callable[[str], bool] = lambda _: False):
    """Write `directory/checksums.json`: the sha256 of every file below `directory` (but the
    record itself and names `skip` rejects), keyed by its path relative to `directory`."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name != CHECKSUMS_FILE and not skip(path.name):
            files[name] = file_sha256(path)
    write_json_atomically(directory / CHECKSUMS_FILE, {"format": _FORMAT, "sha256": files})


def recorded_checksums(directory: str | os.PathLike) -> dict[str, str]:
    """The recorded sha256 of each file, by relative path; a `ChecksumError` if there is no
    readable record."""
    path = Path(directory) / CHECKSUMS_FILE
    try:
        values = json.loads(path.read_text())
        files = values["sha256"]
        if values["format"] != _FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {values['format']!r}")
    except FileNotFoundError:
        raise ChecksumError(
            f"{path} is missing: the files of {directory} cannot be checked"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ChecksumError(f"{path} is damaged ({type(error).__name__}: {error})") from error
    return files


def verify_checksums(
    directory: str | os.PathLike, include: Callable[[str], bool] = lambda _: True
) -> None:
    """Check the recorded files of `directory` whose relative path `include` accepts; raise a
    `ChecksumError` naming the first that is missing or differs."""
    directory = Path(directory)
    for name, recorded in recorded_checksums(directory).items():
        if include(name):
            check_sha256(directory / name, file_sha256_or_missing(directory / name), recorded)


def file_sha256_or_missing(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except FileNotFoundError:
        return None


def check_sha256(path: Path, found: str | None, recorded: str) -> None:
    if found is None:
        raise ChecksumError(f"{path} is missing (its sha256 was recorded when it was written)")
    if found != recorded:
        raise ChecksumError(
            f"{path} is corrupt: its sha256 is {found}, {recorded} when it was written"
        )


def read_verified(path: Path, recorded: str) -> bytes:
    """The bytes of `path`, checked against `recorded` as they are read (one read)."""
    data = path.read_bytes()
    check_sha256(path, hashlib.sha256(data).hexdigest(), recorded)
    return data
