"""Consolidated model directories: `model.safetensors` + `config.json` (+ tokenizer).

A directory written here loads in a single process with `load_pretrained`, whatever layout the
model was trained in. `export_shards` builds one from a training checkpoint's per-rank weight
files with memory bounded by the largest tensor: the safetensors header is computed from the
shards' headers, then each full tensor is assembled and streamed to disk in turn. Loading checks
every tensor's name, shape and dtype against the config and names the first mismatch.

A directory records the sha256 of each of its files (`checksums.json`); `load_pretrained`
checks the weights as it reads them (one read) and the other files before, so a flipped bit is
named instead of loaded. Directories written before the record existed load unchecked.

Every writer goes through `write_model_dir`, which builds the directory beside its destination
and moves it into place whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file
from torch import nn

from moeut_dist import arch
from moeut_dist.arch import ModelConfig
from moeut_dist.atomic_files import fsync_path
from moeut_dist.checksums import (
    CHECKSUMS_FILE,
    read_verified,
    record_checksums,
    recorded_checksums,
    verify_checksums,
)
from moeut_dist.config import ConfigError
from moeut_dist.parallel.shards import find_shard_files, iter_full_tensors, shard_rule

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
OFFICIAL_FILE = "official_model.pt"  # the authors' state-dict format (`moeut export --official`)
MODEL_DIR_FILES = frozenset(
    {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, OFFICIAL_FILE, CHECKSUMS_FILE}
)

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model it is loaded into."""


class ModelDirectoryError(ValueError):
    """A model directory that cannot be used as it is: a damaged weights file, a tokenizer that
    does not fit the model, or a destination that is not a model directory."""


def expected_state_dict(config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of the model `config` describes, on the meta device (names, shapes, dtype;
    no memory)."""
    with torch.device("meta"):
        model = arch.of(config).model_class(config)
        return {name: t.to(dtype) for name, t in model.state_dict().items()}


def verify_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    """Raise naming the first missing, unexpected or differently shaped (or typed) tensor."""
    for name, reference in expected.items():
        if name not in given:
            raise CheckpointMismatchError(
                f"missing tensor {name!r} (expected {_describe(reference)})"
            )
        tensor = given[name]
        if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
            raise CheckpointMismatchError(
                f"tensor {name!r} is {_describe(tensor)}, the config expects {_describe(reference)}"
            )
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        raise CheckpointMismatchError(
            f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)"
        )


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def is_model_dir_file(name: str) -> bool:
    return name in MODEL_DIR_FILES


def write_model_dir(
    out_dir: str | os.PathLike,
    write_files: Callable[[Path], object],
    is_own_file: Callable[[str], bool] = is_model_dir_file,
) -> Path:
    """Write a model directory whole: `write_files(directory)` fills a new hidden sibling of
    `out_dir`, which replaces `out_dir` once it is complete.

    So no file of an earlier model survives beside the new one, and a crash leaves the old
    directory or the new one, never a mix or a half-written file. Replacing takes two renames
    (Linux cannot swap two directories at once): if a crash falls between them, the old
    directory waits under a hidden name and the next write to `out_dir` puts it back first.
    An existing `out_dir` must be empty or hold only files that `is_own_file` names as the kind
    of directory written (by default ours): anything else is refused before anything is
    written, so an unrelated folder is never deleted.
    """
    out = Path(out_dir).resolve()  # through a symbolic link, which then names the new directory
    staging, retired = _hidden_sibling(out, "partial"), _hidden_sibling(out, "old")
    _finish_interrupted_replacement(out, retired)
    check_replaceable(out, is_own_file)
    shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier write
    staging.mkdir(parents=True)
    try:
        write_files(staging)
        for path in [*staging.iterdir(), staging]:
            fsync_path(path)
        if out.exists():
            out.rename(retired)
        staging.rename(out)
        fsync_path(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left if something failed
    shutil.rmtree(retired, ignore_errors=True)
    return Path(out_dir)


def _hidden_sibling(path: Path, suffix: str) -> Path:
    # Beside `path`, so on its file system: renaming it into place is a rename, not a copy.
    return path.with_name(f".{path.name}.{suffix}")


def _finish_interrupted_replacement(out: Path, retired: Path) -> None:
    if retired.exists():
        if out.exists():  # the new directory is in place; only deleting the old one was left
            shutil.rmtree(retired)
        else:
            retired.rename(out)


def check_replaceable(
    out_dir: str | os.PathLike, is_own_file: Callable[[str], bool] = is_model_dir_file
) -> None:
    """`out_dir` may be replaced: it holds nothing but model files (the user's own files, say an
    evaluation report, would be deleted with it), and its parent lets a sibling be renamed in.
    `write_model_dir` checks it; callers with expensive work to do first check it before."""
    out = Path(out_dir).resolve()
    if not out.exists():
        return
    if not out.is_dir():
        raise ModelDirectoryError(f"{out} exists and is not a directory; refusing to replace it")
    others = sorted(p.name for p in out.iterdir() if not is_own_file(p.name))
    if others:
        raise ModelDirectoryError(
            f"{out} holds files that are not a model directory's ({', '.join(others[:5])}); "
            "refusing to replace it"
        )
    if out.is_mount() or not os.access(out.parent, os.W_OK):
        raise ModelDirectoryError(
            f"{out} is replaced by a directory built beside it, which needs write access to "
            f"{out.parent} and {out} not to be a mount point; write to a directory inside it"
        )


def write_model_files(
    directory: Path, config: ModelConfig, write_weights: Callable[[Path], object],
    tokenizer_path: str | os.PathLike | None, add_files: Callable[[Path], object] | None = None,
) -> None:  # fmt: skip
    write_weights(directory / WEIGHTS_FILE)
    values = {"arch": arch.of(config).name, **config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(values, indent=2) + "\n")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, directory / TOKENIZER_FILE)
    if add_files is not None:
        add_files(directory)
    record_checksums(directory)


def save_pretrained(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None
) -> Path:
    """Write the model directory of a single-process model (see `write_model_dir`)."""
    weights = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    return write_model_dir(
        out_dir,
        lambda directory: write_model_files(
            directory, model.config, lambda p: save_file(weights, str(p)), tokenizer_path
        ),
    )


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The config of a model directory (its `arch`, "moeut" if it names none, and that
    architecture's fields); a `ConfigError` naming the file if it is damaged.

    With `compile` false whatever the run chose: compiling is the choice of the program that
    loads the model (`model.compile()`), and sampling, whose KV cache grows every token, would
    recompile at each one (20 tokens of the demo's model: 35 s compiled, 2 s eager)."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        values = json.loads(path.read_bytes())
    except ValueError as error:  # invalid JSON or UTF-8
        raise ConfigError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path} holds a JSON {type(values).__name__}, not an object")
    try:
        config = arch.get(values.pop("arch", "moeut")).config_class.from_dict(values)
    except (ValueError, TypeError) as error:  # unknown keys; missing keys or wrong types
        raise ConfigError(f"{path}: {error}") from error
    if getattr(config, "compile", False):  # MoEUT's field; the dense baseline has none
        config = dataclasses.replace(config, compile=False)
    return config


def load_pretrained(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved in `model_dir`, in eval mode, with the saved dtype; eager (`read_config`)."""
    model_dir = Path(model_dir)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (model_dir / required).is_file():
            raise FileNotFoundError(f"{model_dir} has no {required}: not a moeut model directory")
    recorded = recorded_checksums(model_dir) if (model_dir / CHECKSUMS_FILE).exists() else {}
    if recorded:
        verify_checksums(model_dir, include=lambda name: name != WEIGHTS_FILE)
    config = read_config(model_dir)
    path = model_dir / WEIGHTS_FILE
    try:
        data = read_verified(path, recorded[WEIGHTS_FILE]) if recorded else path.read_bytes()
        weights = {name: t.to(device) for name, t in load(data).items()}
    except SafetensorError as error:
        raise ModelDirectoryError(f"{model_dir / WEIGHTS_FILE} is damaged: {error}") from error
    # A model is saved in one dtype: every tensor must share the first one's.
    dtype = next(iter(weights.values())).dtype if weights else torch.float32
    verify_state_dict(expected_state_dict(config, dtype), weights)
    with torch.device("meta"):
        model = arch.of(config).model_class(config)
    model.load_state_dict(weights, assign=True)
    return model.to(device).eval()


# --- consolidation of a training checkpoint's per-rank weight files ------------------------

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_DTYPES_BY_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def write_safetensors_streaming(
    path: Path, specs: TensorSpecs, tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Write a safetensors file whose tensors arrive one at a time, in the order of `specs`.

    The header (names, dtypes, shapes, byte offsets) comes from `specs` up front, so no more than
    one tensor is ever held; each arriving tensor must match its spec, and every spec must get
    its tensor. `metadata` is the format's string-to-string `__metadata__`. Written in place:
    the file is whole only if this returns.
    """
    header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes

    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        expected = iter(specs.items())
        for name, tensor in tensors:
            spec = next(expected, None)
            if spec is None:
                raise CheckpointMismatchError(f"tensor {name!r} is not in the header")
            spec_name, (shape, dtype) = spec
            if (name, tuple(tensor.shape), tensor.dtype) != (spec_name, shape, dtype):
                raise CheckpointMismatchError(f"tensor {name!r} does not match the header")
            out.write(tensor.contiguous().flatten().view(torch.uint8).numpy().data)
        if (missing := next(expected, None)) is not None:
            raise CheckpointMismatchError(f"the tensors ended before {missing[0]!r}")


def safetensors_specs(path: Path) -> TensorSpecs:
    """Names, shapes and dtypes of a safetensors file's tensors, from its header alone."""
    with safe_open(path, framework="pt") as file:
        slices = {name: file.get_slice(name) for name in list(file.keys())}
        return {
            name: (tuple(piece.get_shape()), _DTYPES_BY_NAME[piece.get_dtype()])
            for name, piece in slices.items()
        }


def _full_specs(checkpoint_dir: Path, config: ModelConfig) -> TensorSpecs:
    """Full shapes and dtypes from the shard files' headers alone (no tensor data is read)."""
    shards = find_shard_files(checkpoint_dir)

    def piece(path: Path, name: str):
        with safe_open(path, framework="pt") as file:
            return file.get_slice(name)

    with safe_open(shards.files[min(shards.files)], framework="pt") as first:
        names = list(first.keys())
    specs = {}
    for name in names:
        rule = shard_rule(name, config)
        pieces = [piece(path, name) for path in shards.for_rule(rule)]
        shape = list(pieces[0].get_shape())
        if rule is not None:
            shape[rule.dim] = sum(p.get_shape()[rule.dim] for p in pieces)
        specs[name] = (tuple(shape), _DTYPES_BY_NAME[pieces[0].get_dtype()])
    return specs


def export_shards(
    checkpoint_dir: str | os.PathLike, config: ModelConfig, out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    add_files: Callable[[Path], object] | None = None,
) -> Path:  # fmt: skip
    """A model directory from a checkpoint's per-rank weight files, any TP/EP layout (see
    `write_model_dir`). `add_files(directory)` may add files of its own to the new directory,
    which then holds the model files already; they are moved into place together."""
    specs = _full_specs(Path(checkpoint_dir), config)
    dtype = specs["embedding.weight"][1] if "embedding.weight" in specs else torch.float32
    # Checked before any tensor data is read: a wrong config fails in milliseconds.
    verify_state_dict(
        expected_state_dict(config, dtype),
        {name: torch.empty(shape, dtype=d, device="meta") for name, (shape, d) in specs.items()},
    )
    tensors = iter_full_tensors(checkpoint_dir, config)
    return write_model_dir(
        out_dir,
        lambda directory: write_model_files(
            directory,
            config,
            lambda p: write_safetensors_streaming(p, specs, tensors),
            tokenizer_path,
            add_files,
        ),
    )
