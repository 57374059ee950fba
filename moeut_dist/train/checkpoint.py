"""Training checkpoints that lose nothing: weights, optimizer, data position and every RNG.

One directory per checkpoint, under `<out_dir>/checkpoints/`:

    latest.json                 {"tag": "step_00001000", "step": 1000}: written last, atomically
    step_00001000/
      engine/                   `moeut_dist.parallel.engine.save_checkpoint`: DeepSpeed's optimizer
                                partitions and one safetensors file per (TP rank, EP rank)
      portable/                 `moeut_dist.parallel.portable`: fp32 master weights and AdamW
                                moments of every parameter, full tensors by name (any layout)
      trainer_rank00003.json    the step, AdamW's step count, the data position (global), the
                                layout, and rank 3's RNG states (JSON, no pickle)
      config.yaml               the run's config
      tokenizer.model           the run's tokenizer, so that an export needs nothing else
      done_rank00003            rank 3 finished writing everything above (holds the world size)
      checksums.json            sha256 of every file above, written by rank 0 after all markers

A checkpoint is complete when every rank's `done` marker and the checksums exist; a rank writes
its marker only after every file it wrote is on disk (each is fsynced), and only once rank 0 has
recorded the checksums does it move `latest.json` to it, so a crash at any moment of a save,
power loss included, leaves `latest.json` on the previous complete checkpoint. Directories other
than the newest `keep` complete ones are removed after the pointer moves, but for those an
export holds a lease on (`checkpoint_lease`). Checkpoints live on a file system that every node
sees. A save that finds the disk full removes what it wrote and says how much it needed; a run
starts by removing checkpoints that never completed (a crash in a save), before anything else.

`checkpoint.resume: auto` continues from the pointer's checkpoint, after checking its files
against their checksums and its tokenizer against the run's; a corrupt file stops the run naming
it and the previous complete checkpoint, to which `latest-intact` falls back by itself.
Complete checkpoints without a pointer (it was deleted, or only the step directories were
copied) are not silently ignored: the run stops and names the newest, to be resumed explicitly
or overruled with `never`.

A run resumed with the world size and parallel layout of its checkpoint continues bit for bit
from DeepSpeed's files and each rank's RNG states. Under another world size, TP / EP size or
ZeRO stage it continues from `portable/` instead: the same step, learning rate, weights and
optimizer state, and the same place in the data (the loader's position is global); RNG states
are per rank and do not carry over (the RNGs are seeded from the seed and the step), and the
metrics record the old and the new layout. Checkpoints of format 2 (before `portable/`) resume
under their own layout only: weights, optimizer, step and RNGs exactly, the data at the same
global sample count of this version's data order (within that epoch, some samples may come
twice or not at all).

Checkpoint files may come from elsewhere, so nothing here unpickles them: trainer state is JSON,
and `moeut_dist.parallel.engine.load_checkpoint` reads weights from safetensors and DeepSpeed's
optimizer files with `weights_only=True`. A damaged pointer or trainer state, or a checkpoint
that cannot be resumed under this run's layout, is a `CheckpointError` naming the file, raised
before the model is built.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors import SafetensorError

from moeut_dist.atomic_files import write_atomically, write_json_atomically
from moeut_dist.checksums import (
    CHECKSUMS_FILE,
    ChecksumError,
    record_checksums,
    verify_checksums,
)
from moeut_dist.config import ConfigError
from moeut_dist.data.tokenizer import file_sha256
from moeut_dist.parallel import engine as parallel_engine
from moeut_dist.parallel import portable
from moeut_dist.parallel.layout import ParallelConfig
from moeut_dist.train.config import TrainConfig

_FORMAT = 3
_FORMAT_WITHOUT_PORTABLE_STATE = 2
ENGINE_TAG = "engine"
TOKENIZER_FILE = "tokenizer.model"
_LATEST = "latest.json"
# `checkpoint.resume` value: as "auto", but a corrupt checkpoint yields to the newest intact one.
LATEST_INTACT = "latest-intact"
_LEASE_PREFIX = ".lease."
# A lease whose holder cannot be checked (another host) is honoured this long after it was taken.
_FOREIGN_LEASE_SECONDS = 24 * 3600
# Below this many free bytes after a failed write, the write failed for want of space (torch's
# zip writer reports a full disk as "unexpected pos", without the OS error).
_FULL_DISK_FREE_BYTES = 1 << 20
# Parallel settings that change how a step is computed, not what the checkpoint holds.
_RECOMPUTE_ONLY = ("checkpoint_activations",)


T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: damaged, or written by another layout."""


class DiskFullError(OSError):
    """A checkpoint did not fit on its file system; what it had written is removed."""


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    step: int  # optimizer steps done (skipped ones included)
    loader: dict[str, Any]  # `TokenLoader.state_dict()`
    consecutive_nonfinite: int = 0  # steps skipped in a row for a non-finite loss or gradient


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to continue from, with this rank's trainer state and RNG states read."""

    directory: Path
    state: TrainerState
    optimizer_steps: int  # AdamW updates applied (skipped steps are not)
    rng: dict[str, Any] | None  # None: another layout wrote the checkpoint
    # (the checkpoint's layout, this run's) when they differ; then `portable/` is loaded.
    layout_change: tuple[dict[str, Any], dict[str, Any]] | None = None


def capture_rng() -> dict[str, Any]:
    """Every RNG state of this process as JSON values."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), position, has_gauss, gauss],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state:
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _rank_file(directory: Path, kind: str, rank: int) -> Path:
    name = f"trainer_rank{rank:05d}.json" if kind == "state" else f"done_rank{rank:05d}"
    return directory / name


def _write_marker(path: Path, world_size: int) -> None:
    write_atomically(path, lambda p: p.write_text(str(world_size)))


def _read_marker(path: Path) -> int | None:
    """The world size a completion marker holds; None if it is missing or damaged."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(directory: Path) -> bool:
    """Every rank that wrote into `directory` finished and rank 0 recorded the checksums (or
    the checkpoint predates checksums)."""
    return _all_ranks_done(directory) and (
        (directory / CHECKSUMS_FILE).is_file() or _predates_checksums(directory)
    )


def _predates_checksums(directory: Path) -> bool:
    """Written by the version before checksums (format 2), which had none to record."""
    try:
        values = json.loads(_rank_file(directory, "state", 0).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and values.get("format") == _FORMAT_WITHOUT_PORTABLE_STATE


def _all_ranks_done(directory: Path) -> bool:
    """Every rank that wrote into `directory` marked its files done (each marker names the
    world size)."""
    world_size = _read_marker(_rank_file(directory, "done", 0))
    if world_size is None or world_size < 1:
        return False
    return all(
        _read_marker(_rank_file(directory, "done", rank)) == world_size
        for rank in range(world_size)
    )


def _is_lease(name: str) -> bool:
    return name.startswith(_LEASE_PREFIX)


@contextlib.contextmanager
def checkpoint_lease(directory: Path) -> Iterator[None]:
    """Keep `directory` from being pruned while the block runs (a `FileNotFoundError` if it is
    already gone). The lease names its holder, so one left by a killed process on this host is
    ignored; one from another host expires after a day. Where the directory is read-only to
    this process, no run can prune it either, and no lease is taken."""
    lease = directory / f"{_LEASE_PREFIX}{socket.gethostname()}.{os.getpid()}"
    try:
        lease.touch()
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        lease = None
    try:
        yield
    finally:
        if lease is not None:
            lease.unlink(missing_ok=True)


def _is_leased(directory: Path) -> bool:
    for lease in directory.glob(f"{_LEASE_PREFIX}*"):
        host, _, pid = lease.name.removeprefix(_LEASE_PREFIX).rpartition(".")
        if host != socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                if time.time() - lease.stat().st_mtime < _FOREIGN_LEASE_SECONDS:
                    return True
        elif pid.isdigit() and _process_exists(int(pid)):
            return True
    return False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _is_out_of_space(error: BaseException, directory: Path) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(directory.parent).free < _FULL_DISK_FREE_BYTES
    except OSError:
        return False


def _pointer_tag(pointer: Path) -> str:
    try:
        tag = json.loads(pointer.read_text())["tag"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{pointer} is damaged ({type(error).__name__}: {error}); remove it to start over, "
            "or name a checkpoint directory with checkpoint.resume"
        ) from error
    if not isinstance(tag, str) or Path(tag).name != tag:
        raise CheckpointError(f"{pointer} names {tag!r}, not a checkpoint directory beside it")
    return tag


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, from the pointer written last."""
    pointer = root / _LATEST
    if not pointer.is_file():
        return None
    directory = root / _pointer_tag(pointer)
    if not is_complete(directory):
        raise CheckpointError(f"{pointer} points to {directory}, which is not complete")
    return directory


def _parallel_layout(parallel: ParallelConfig) -> dict[str, Any]:
    """What of the parallel settings a checkpoint's files depend on."""
    return {k: v for k, v in parallel.to_dict().items() if k not in _RECOMPUTE_ONLY}


class CheckpointManager:
    """Saves and finds checkpoints of one run; every method is called on every rank."""

    def __init__(self, config: TrainConfig) -> None:
        self.root = config.out_path / "checkpoints"
        self.keep = config.checkpoint.keep
        self.config = config
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Read once: every checkpoint holds the tokenizer the run was checked against at start.
        self.tokenizer = Path(config.data.tokenizer).read_bytes() if self.rank == 0 else b""
        # This run's newest complete checkpoint: the one it resumed from or last saved.
        self.timeline_latest: Path | None = None

    def resume_point(self) -> ResumePoint | None:
        """The checkpoint `checkpoint.resume` asks for (None: start from scratch), checked
        to be complete, intact, of the run's tokenizer and resumable by this rank before
        anything is built. Checkpoints that never completed are removed first."""
        if self.rank == 0:
            self._remove_unfinished()
        dist.barrier()
        choice = self.config.checkpoint.resume
        if choice == "never":
            return None
        automatic = choice in ("auto", LATEST_INTACT)
        directory = self._auto_resume_directory() if automatic else Path(choice)
        if directory is None:
            return None
        if not is_complete(directory):
            if _all_ranks_done(directory):
                raise CheckpointError(
                    f"{directory} has no {CHECKSUMS_FILE}: it was written by an earlier version "
                    "of moeut-dist, or its save stopped just before it completed"
                )
            raise ConfigError(f"checkpoint.resume: {directory} is not a complete checkpoint")
        if (directory / CHECKSUMS_FILE).is_file():
            directory = _on_rank0(lambda: _intact(directory, fall_back=choice == LATEST_INTACT))
        elif self.rank == 0:
            warnings.warn(
                f"{directory} was written before checkpoints recorded checksums: its files are "
                "not verified",
                RuntimeWarning,
                stacklevel=2,
            )
        self._check_tokenizer(directory)
        return self._read_rank_state(directory)

    def _remove_unfinished(self) -> None:
        """Remove checkpoint directories a crashed save left unfinished by some rank (they may
        hold most of the disk; none is ever resumed from)."""
        if not self.root.is_dir():
            return
        for directory in self.root.glob("step_*"):
            if not _all_ranks_done(directory) and not _is_leased(directory):
                shutil.rmtree(directory)

    def _check_tokenizer(self, directory: Path) -> None:
        """The checkpoint's model was trained on the tokenizer of `data.tokenizer`: ids of
        another tokenizer mean other tokens, whether or not the vocabulary size agrees."""
        saved = directory / TOKENIZER_FILE
        try:
            theirs = file_sha256(saved)
        except OSError as error:
            raise CheckpointError(f"{saved} cannot be read ({error.strerror})") from error
        ours = file_sha256(self.config.data.tokenizer)
        if theirs != ours:
            raise CheckpointError(
                f"{directory} was trained with another tokenizer: its {TOKENIZER_FILE} has "
                f"sha256 {theirs}, data.tokenizer {self.config.data.tokenizer} has {ours}; "
                "resume with the checkpoint's tokenizer (and shards built with it), or start "
                "a new run with checkpoint.resume=never or init_from"
            )

    def _auto_resume_directory(self) -> Path | None:
        latest = latest_checkpoint(self.root)
        if latest is not None:
            return latest
        orphans = sorted(d for d in self.root.glob("step_*") if is_complete(d))
        if orphans:
            raise CheckpointError(
                f"{self.root} has complete checkpoints but no {_LATEST}; continue from the newest "
                f"with checkpoint.resume={orphans[-1]}, or start over with "
                "checkpoint.resume=never (saves then replace those of the same steps)"
            )
        return None

    def save(self, engine, state: TrainerState) -> Path:
        directory = self.root / _tag(state.step)
        if self.rank == 0 and directory.exists():
            # Left by a save that crashed, or by an earlier run that this one (resumed from an
            # older checkpoint) replaces: the pointer must not name it while it is rewritten.
            self._point_away_from(directory)
            shutil.rmtree(directory)
        # Refused before anything is written when the last checkpoint would not fit again.
        _on_rank0(lambda: self._check_space(directory))
        try:
            parallel_engine.save_checkpoint(engine, str(directory), ENGINE_TAG)
            portable.save_state(engine, directory / portable.STATE_DIR)
            self._write_rank_state(directory, state, parallel_engine.optimizer_steps(engine))
            dist.barrier()
            if self.rank == 0:
                self._complete(directory)
        except Exception as error:
            if not _is_out_of_space(error, directory):
                raise
            written = _directory_bytes(directory) if directory.is_dir() else 0
            shutil.rmtree(directory, ignore_errors=True)
            raise self._disk_full(directory, f"more than the {written} bytes written") from error
        self.timeline_latest = directory
        dist.barrier()
        return directory

    def _complete(self, directory: Path) -> None:
        """Rank 0, once every rank marked its files done: record the checksums, then move the
        pointer and prune."""
        if not _all_ranks_done(directory):
            raise RuntimeError(f"{directory}: a rank's completion marker is missing")
        record_checksums(directory, skip=_is_lease)
        self._point_to(directory)
        self._prune(directory)

    def _previous_size(self) -> int | None:
        """Bytes of this run's newest complete checkpoint (the next one is as large)."""
        previous = self.timeline_latest
        if previous is None or not is_complete(previous):
            return None
        return _directory_bytes(previous)

    def _check_space(self, directory: Path) -> None:
        needed = self._previous_size()
        if needed is not None and shutil.disk_usage(self.root).free < needed:
            raise self._disk_full(directory, f"about {needed} bytes (as the last one)")

    def _disk_full(self, directory: Path, needed: str) -> DiskFullError:
        free = shutil.disk_usage(self.root).free
        previous = self.timeline_latest
        kept = f"{previous} is untouched" if previous else "there is no earlier checkpoint"
        return DiskFullError(
            f"no space left on device for checkpoint {directory}: it needs {needed}, {free} "
            f"bytes are free; nothing of it is left on disk, {kept}",
        )

    def _point_to(self, directory: Path) -> None:
        step = int(directory.name.removeprefix("step_"))
        write_json_atomically(self.root / _LATEST, {"tag": directory.name, "step": step})

    def _point_away_from(self, directory: Path) -> None:
        """If `latest.json` names `directory` (or is damaged, and so might), point it at this
        run's own newest checkpoint (the one it resumed from or last saved), or remove it when
        this run has none yet."""
        pointer = self.root / _LATEST
        if not pointer.is_file():
            return
        with contextlib.suppress(CheckpointError):
            if _pointer_tag(pointer) != directory.name:
                return
        own = self.timeline_latest
        if own is not None and own.parent == self.root and is_complete(own):
            self._point_to(own)
        else:
            pointer.unlink()

    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "parallel": _parallel_layout(self.config.parallel)}

    def _write_rank_state(self, directory: Path, state: TrainerState, optimizer_steps: int) -> None:
        values = {
            "format": _FORMAT,
            "rank": self.rank,
            **self._layout(),
            **asdict(state),
            "optimizer_steps": optimizer_steps,
            "rng": capture_rng(),
        }
        write_json_atomically(_rank_file(directory, "state", self.rank), values)
        if self.rank == 0:
            config_text = yaml.safe_dump(self.config.to_dict())
            write_atomically(directory / "config.yaml", lambda p: p.write_text(config_text))
            write_atomically(directory / TOKENIZER_FILE, lambda p: p.write_bytes(self.tokenizer))
        _write_marker(_rank_file(directory, "done", self.rank), self.world_size)

    def _prune(self, latest: Path) -> None:
        """Keep `latest` (the one the pointer names) and the newest `keep - 1` complete
        checkpoints before it; remove the other directories before it. Those after it were
        left by a run this one resumed behind: they are not this run's to count or delete
        (each is replaced when this run saves the same step)."""
        earlier = sorted(d for d in self.root.glob("step_*") if d.name < latest.name)
        complete = [d for d in earlier if is_complete(d)]
        kept = set(complete[-(self.keep - 1) :] if self.keep > 1 else [])
        for directory in earlier:
            # A leased one is being exported; a later save prunes it once the lease is gone.
            if directory not in kept and not _is_leased(directory):
                # An export may lease it while it is removed: the lease is left, and the
                # directory with it (removed as unfinished when the next run starts).
                shutil.rmtree(directory, ignore_errors=True)

    def _read_rank_state(self, directory: Path) -> ResumePoint:
        """The trainer state in `directory` for this rank: its own under the checkpoint's
        layout, rank 0's (whose RNG states are not used) under another."""
        written_by = _read_marker(_rank_file(directory, "done", 0))
        path = _rank_file(directory, "state", self.rank if written_by == self.world_size else 0)
        try:
            values = json.loads(path.read_text())
            saved_format = values["format"]
            layout = {"world_size": values["world_size"], "parallel": values["parallel"]}
            state = TrainerState(
                step=values["step"],
                loader=values["loader"],
                consecutive_nonfinite=values["consecutive_nonfinite"],
            )
            rng = values["rng"]
            # Format 2 did not count AdamW's updates: they were its steps less skipped ones,
            # which are gone; its DeepSpeed files hold the count, and only they are read.
            optimizer_steps = values.get("optimizer_steps", state.step)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{path}: rank {path.stem[-5:].lstrip('0') or 0}'s trainer state is missing or "
                f"damaged ({type(error).__name__}: {error})"
            ) from error
        if saved_format not in (_FORMAT, _FORMAT_WITHOUT_PORTABLE_STATE):
            raise CheckpointError(
                f"{directory} is in checkpoint format {saved_format}, from another version "
                f"of moeut-dist; this one resumes formats {_FORMAT_WITHOUT_PORTABLE_STATE} and "
                f"{_FORMAT}"
            )
        if layout["world_size"] != written_by:
            raise CheckpointError(
                f"{directory}: its completion markers name {written_by} ranks, {path.name} "
                f"{layout['world_size']}; the checkpoint is damaged"
            )
        if saved_format == _FORMAT_WITHOUT_PORTABLE_STATE:
            state.loader = self._loader_state_of_format_2(directory, state)
        if layout == self._layout():
            return ResumePoint(directory, state, optimizer_steps, rng)
        if saved_format == _FORMAT_WITHOUT_PORTABLE_STATE:
            raise CheckpointError(
                f"{directory} was written by an earlier version of moeut-dist (checkpoint format "
                f"{saved_format}, without layout-free state): it resumes only under its own "
                f"layout, {layout}; this run has {self._layout()}"
            )
        if not (directory / portable.STATE_DIR).is_dir():
            raise CheckpointError(f"{directory} has no {portable.STATE_DIR}/ to change layout with")
        return ResumePoint(directory, state, optimizer_steps, None, (layout, self._layout()))

    def _loader_state_of_format_2(self, directory: Path, state: TrainerState) -> dict[str, Any]:
        """A format-2 loader state (per-worker positions of another data order) as this
        version's: the same number of samples consumed, every step having taken one global
        batch of the checkpoint's run."""
        old = state.loader
        try:
            run = yaml.safe_load((directory / "config.yaml").read_text())
            global_batch = run["data"]["global_batch_size"]
            order = {key: old["layout"][key] for key in ("split", "seed", "epochs")}
            skipped = sum(old["skipped_shards"])
        except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{directory}: its config.yaml or loader state is damaged ({error})"
            ) from error
        return {
            "format": 3,
            "order": order,
            "position": state.step * global_batch,
            "counters": {"skipped_shards": skipped},
        }

    def load(self, engine, resume: ResumePoint) -> None:
        """Restore weights and optimizer from `resume`, and under its own layout this rank's
        RNG states."""
        if resume.layout_change is None:
            parallel_engine.load_checkpoint(engine, str(resume.directory), ENGINE_TAG)
            restore_rng(resume.rng)
        else:
            try:
                portable.load_state(
                    engine, resume.directory / portable.STATE_DIR, resume.optimizer_steps
                )
            except (OSError, SafetensorError) as error:  # a missing or damaged file
                raise CheckpointError(f"{resume.directory}: {error}") from error
        self.timeline_latest = resume.directory


def _on_rank0(action: Callable[[], T]) -> T:
    """`action()` run by rank 0 alone (it reads the shared file system for everyone); its
    result, or the checkpoint error it raised, on every rank."""
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [(True, action())]
        except (CheckpointError, ConfigError, DiskFullError) as error:
            outcome = [(False, error)]
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def _intact(directory: Path, fall_back: bool) -> Path:
    """`directory` if its files match their checksums; else, with `fall_back`, the newest
    earlier complete checkpoint beside it whose files do. A `CheckpointError` names the corrupt
    file and the checkpoint to fall back to."""
    try:
        verify_checksums(directory)
        return directory
    except ChecksumError as error:
        corrupt = error
    earlier = sorted(
        (d for d in directory.parent.glob("step_*") if d.name < directory.name and is_complete(d)),
        reverse=True,
    )
    if not fall_back:
        hint = (
            f"the previous complete checkpoint is {earlier[0]}: resume from it with "
            f"--resume {earlier[0]}, or let a run fall back by itself with --resume {LATEST_INTACT}"
            if earlier
            else "there is no earlier complete checkpoint"
        )
        raise CheckpointError(f"{corrupt}; {hint}") from corrupt
    for candidate in earlier:
        try:
            verify_checksums(candidate)
        except ChecksumError as error:
            warnings.warn(f"passing over a corrupt checkpoint: {error}", RuntimeWarning, 2)
            continue
        warnings.warn(
            f"passing over a corrupt checkpoint: {corrupt}; resuming from {candidate}",
            RuntimeWarning,
            stacklevel=2,
        )
        return candidate
    raise CheckpointError(f"{corrupt}; no earlier complete checkpoint is intact")
