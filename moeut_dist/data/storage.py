"""Where shard directories live: local paths, `file://`, `http(s)://`, `pipe:COMMAND`, and
object stores (`s3://`, `gs://`, `az://`, any fsspec protocol) through the optional `fsspec`
extra (`pip install "moeut-dist[storage]"`: fsspec and s3fs).

A location names a directory; `join(location, name)` names a file in it. For `pipe:COMMAND`
(webdataset's convention: a command that writes the file to its standard output) `{}` in the
command stands for the file name: `pipe:curl -sf https://host/shards/{}`.

Reading streams: `open_read` gives a binary file read in blocks, so nothing is downloaded whole
to disk and memory holds what the reader keeps. Writing (`Directory`) uploads whole files: an
object appears in a store only once complete, as a local file appears by rename.

Credentials come from each store's standard environment and configuration files (for S3:
`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `~/.aws/`, and `AWS_ENDPOINT_URL` for S3-compatible stores).
A location carrying a password is refused (`check_location`), so a credential is never in a
config, a message or a checkpoint.

Failures are `StorageError`s naming the file's URL; `transient` ones (connection reset, time-out,
HTTP 5xx/408/429, a failed pipe command) are worth retrying (`with_retries`), the others (not
found, forbidden) are not.
"""

from __future__ import annotations

import http.client
import io
import os
import random
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from moeut_dist.atomic_files import write_atomically

_HTTP_SCHEMES = ("http", "https")
_PIPE = "pipe:"
_HTTP_TIMEOUT_SECONDS = 60
# Bytes read ahead from a stream: the tar reader asks for 10 KB at a time, and over HTTP each
# small read costs a pass through http.client (30% more CPU than reading a local shard).
_STREAM_BUFFER_BYTES = 1 << 20
# HTTP statuses that say "try again later"; any other 4xx is the request's fault.
_TRANSIENT_HTTP_STATUSES = frozenset({408, 425, 429})
_MISSING_FSSPEC = 'reading {scheme}:// locations needs fsspec: pip install "moeut-dist[storage]"'

T = TypeVar("T")


class StorageError(OSError):
    """A file that cannot be read or written; the message names its URL."""

    def __init__(self, message: str, *, transient: bool, not_found: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.not_found = not_found


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: `attempts` tries in all, waiting `backoff_seconds`
    after the first failure and twice as long after each next one (at most
    `max_backoff_seconds`, with up to 25% random jitter so that ranks do not retry in step)."""

    attempts: int = 5
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_seconds < 0 or self.max_backoff_seconds < 0:
            raise ValueError(f"need attempts >= 1 and non-negative back-offs, got {self}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1 for the first)."""
        base = min(self.backoff_seconds * 2 ** (failures - 1), self.max_backoff_seconds)
        return base * (1 + 0.25 * random.random())


def with_retries(
    operation: Callable[[], T],
    policy: RetryPolicy,
    on_retry: Callable[[Exception], None],
    errors: tuple[type[Exception], ...] = (),
) -> T:
    """`operation()`, tried again after each transient failure until `policy.attempts` tries;
    `on_retry(error)` is called before each retry. A failure is a `StorageError` or one of
    `errors`, each with a `transient` attribute saying whether it is worth another try."""
    for failures in range(1, policy.attempts + 1):
        try:
            return operation()
        except (StorageError, *errors) as error:
            if not error.transient or failures == policy.attempts:
                raise
            on_retry(error)
            time.sleep(policy.delay(failures))
    raise AssertionError("unreachable: the last attempt returns or raises")


def _scheme(location: str) -> str:
    if location.startswith(_PIPE):
        return "pipe"
    scheme = urllib.parse.urlsplit(location).scheme
    # One letter: a Windows drive ("C:\\shards"), a local path.
    return scheme if len(scheme) > 1 else ""


def is_local(location: str | Path) -> bool:
    return _scheme(str(location)) in ("", "file")


def local_path(location: str | Path) -> Path:
    """The path of a local location (a path or a `file://` URL)."""
    location = str(location)
    if _scheme(location) == "file":
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(location).path))
    return Path(location)


def check_location(location: str) -> None:
    """Refuse a location that carries a password: it would end up in configs, logs and
    checkpoints. Credentials belong in the store's environment or configuration files."""
    scheme = _scheme(location)
    if scheme in ("", "file", "pipe"):
        return
    if urllib.parse.urlsplit(location).password is not None:
        raise ValueError(
            f"{scheme}:// location with a password in it: give credentials through the store's "
            "environment or configuration files (e.g. AWS_ACCESS_KEY_ID, ~/.netrc), not the URL"
        )


def join(location: str | Path, name: str) -> str:
    """The URL (or path) of the file `name` in the directory `location`."""
    location = str(location)
    if _scheme(location) == "pipe":
        if "{}" not in location:
            raise ValueError(f"{location}: a pipe: location needs {{}} where the file name goes")
        return location.replace("{}", name)
    if is_local(location):
        return str(local_path(location) / name)
    return f"{location.rstrip('/')}/{name}"


def _fsspec(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as error:
        raise ImportError(_MISSING_FSSPEC.format(scheme=_scheme(url))) from error
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:  # the protocol's own package (s3fs, gcsfs, adlfs) is missing
        raise ImportError(f"reading {url}: {error}") from error


def _storage_error(url: str, error: BaseException) -> StorageError:
    """`error` as a StorageError naming `url`, transient or not."""
    if isinstance(error, StorageError):
        return error
    if isinstance(error, urllib.error.HTTPError):
        transient = error.code >= 500 or error.code in _TRANSIENT_HTTP_STATUSES
        return StorageError(
            f"{url}: HTTP {error.code} {error.reason}",
            transient=transient,
            not_found=error.code == 404,
        )
    if isinstance(error, FileNotFoundError):
        return StorageError(f"{url}: not found", transient=False, not_found=True)
    if isinstance(error, PermissionError):
        return StorageError(f"{url}: permission denied ({error})", transient=False)
    if isinstance(error, IsADirectoryError | NotADirectoryError):
        return StorageError(f"{url}: not a file ({error})", transient=False)
    # Connection resets and refusals, time-outs, cut-off bodies, a store's other I/O errors.
    return StorageError(f"{url}: {type(error).__name__}: {error}", transient=True)


class _PipeReader:
    """The standard output of a shell command; a non-zero exit fails the read that meets it."""

    def __init__(self, url: str) -> None:
        self._url = url
        command = url[len(_PIPE) :]
        self._process = subprocess.Popen(
            command,
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=_STREAM_BUFFER_BYTES,
        )

    def read(self, size: int = -1) -> bytes:
        assert self._process.stdout is not None
        data = self._process.stdout.read(size)
        if not data or size < 0:  # the end of the output: did the command succeed?
            self._check_exit()
        return data

    def _check_exit(self) -> None:
        assert self._process.stderr is not None
        status = self._process.wait()
        if status != 0:
            message = self._process.stderr.read().decode(errors="replace").strip()
            raise StorageError(
                f"{self._url}: command exited with status {status}: {message}", transient=True
            )

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdout, self._process.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> _PipeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ErrorNaming:
    """A binary file whose read errors become `StorageError`s naming its URL."""

    def __init__(self, url: str, file: Any) -> None:
        self._url = url
        self._file = file

    def read(self, size: int = -1) -> bytes:
        try:
            return self._file.read(size)
        except (OSError, http.client.HTTPException) as error:
            raise _storage_error(self._url, error) from error

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _ErrorNaming:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_read(url: str | Path) -> IO[bytes]:
    """The file at `url` opened for streaming reads; failures raise `StorageError`."""
    url = str(url)
    scheme = _scheme(url)
    try:
        if scheme == "pipe":
            return _ErrorNaming(url, _PipeReader(url))  # type: ignore[return-value]
        if scheme in ("", "file"):
            file: Any = open(local_path(url), "rb")  # noqa: SIM115 (the caller closes it)
        elif scheme in _HTTP_SCHEMES:
            response = urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_SECONDS)
            file = io.BufferedReader(response, buffer_size=_STREAM_BUFFER_BYTES)
        else:
            fs, path = _fsspec(url)
            file = fs.open(path, "rb")
    except (OSError, http.client.HTTPException) as error:
        raise _storage_error(url, error) from error
    return _ErrorNaming(url, file)  # type: ignore[return-value]


def read_bytes(url: str | Path) -> bytes:
    """The whole (small) file at `url`."""
    with open_read(url) as file:
        return file.read()


class Directory:
    """A directory that files are written into whole: locally by atomic rename, in an object
    store by upload (an object appears once complete). `http(s)://` and `pipe:` are read-only.
    """

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        scheme = _scheme(self.location)
        if scheme in (*_HTTP_SCHEMES, "pipe"):
            raise ValueError(f"{self.location}: {scheme} locations are read-only")
        self._local = local_path(self.location) if is_local(self.location) else None
        self._fs, self._root = (None, "") if self._local else _fsspec(self.location)

    @property
    def is_local(self) -> bool:
        return self._local is not None

    def url(self, name: str) -> str:
        return join(self.location, name)

    def _remote(self, name: str) -> str:
        return f"{self._root.rstrip('/')}/{name}"

    def _calling(self, name: str, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (OSError, http.client.HTTPException) as error:
            raise _storage_error(self.url(name), error) from error

    def create(self) -> None:
        """Make the directory (local only: object stores have no directories to make)."""
        if self._local is not None:
            if self._local.exists() and not self._local.is_dir():
                raise NotADirectoryError(f"{self._local} is not a directory")
            self._local.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        if self._local is not None:
            return (self._local / name).exists()
        # fsspec caches listings per process; another process may have written since.
        self._fs.invalidate_cache(self._root)
        return self._calling(name, lambda: self._fs.exists(self._remote(name)))

    def names(self, suffix: str) -> list[str]:
        """Names of the files in the directory ending in `suffix`, sorted."""
        if self._local is not None:
            return sorted(p.name for p in self._local.glob(f"*{suffix}"))
        self._fs.invalidate_cache(self._root)
        found = self._calling("", lambda: self._fs.glob(self._remote(f"*{suffix}")))
        return sorted(path.rsplit("/", 1)[-1] for path in found)

    def read_bytes(self, name: str) -> bytes:
        return read_bytes(self.url(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        if self._local is not None:
            write_atomically(self._local / name, lambda path: path.write_bytes(data))
        else:
            self._calling(name, lambda: self._fs.pipe_file(self._remote(name), data))

    def put(self, local_file: Path, name: str) -> None:
        """Move a complete local file into the directory as `name`."""
        if self._local is not None:
            os.replace(local_file, self._local / name)
            return
        self._calling(name, lambda: self._fs.put_file(str(local_file), self._remote(name)))
        local_file.unlink()

    def remove(self, name: str) -> None:
        if self._local is not None:
            (self._local / name).unlink()
        else:
            self._calling(name, lambda: self._fs.rm_file(self._remote(name)))

    def staging_area(self, scratch: Path) -> Path:
        """Where files are written before `put`: the directory itself when local (`put` is then
        a rename), else `scratch`."""
        return self._local if self._local is not None else scratch
