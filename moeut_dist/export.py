"""Consolidated model directories: `model.safetensors` + `config.json` (+ tokenizer).

A directory written here loads in a single process with `load_pretrained`, whatever layout the
model was trained in. `export_shards` builds one from a training checkpoint's per-rank weight
files with memory bounded by the largest tensor: the safetensors header is computed from the
shards' headers, then each full tensor is assembled and streamed to disk in turn. Loading checks
every tensor's name, shape and dtype against the config and names the first mismatch.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeut_dist.atomic_files import write_atomically
from moeut_dist.config import MoEUTConfig
from moeut_dist.model import MoEUTLM
from moeut_dist.parallel.shards import find_shard_files, iter_full_tensors, shard_rule

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model it is loaded into."""


def expected_state_dict(config: MoEUTConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`MoEUTLM(config)`'s tensors on the meta device (names, shapes, dtype; no memory)."""
    with torch.device("meta"):
        return {name: t.to(dtype) for name, t in MoEUTLM(config).state_dict().items()}


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


def _write_model_dir(
    out_dir: str | os.PathLike, config: MoEUTConfig, write_weights: Callable[[Path], object],
    tokenizer_path: str | os.PathLike | None,
) -> Path:  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / WEIGHTS_FILE, write_weights)
    config_text = json.dumps(config.to_dict(), indent=2) + "\n"
    write_atomically(out / CONFIG_FILE, lambda p: p.write_text(config_text))
    if tokenizer_path is not None:
        write_atomically(out / TOKENIZER_FILE, lambda p: shutil.copyfile(tokenizer_path, p))
    return out


def save_pretrained(
    model: MoEUTLM, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None
) -> Path:
    """Write the model directory of a single-process model."""
    weights = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    return _write_model_dir(
        out_dir, model.config, lambda p: save_file(weights, str(p)), tokenizer_path
    )


def read_config(model_dir: str | os.PathLike) -> MoEUTConfig:
    return MoEUTConfig.from_dict(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))


def load_pretrained(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> MoEUTLM:
    """The model saved in `model_dir`, in eval mode, with the saved dtype."""
    model_dir = Path(model_dir)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (model_dir / required).is_file():
            raise FileNotFoundError(f"{model_dir} has no {required}: not a moeut model directory")
    config = read_config(model_dir)
    weights = load_file(str(model_dir / WEIGHTS_FILE), device=str(device))
    # A model is saved in one dtype: every tensor must share the first one's.
    dtype = next(iter(weights.values())).dtype if weights else torch.float32
    verify_state_dict(expected_state_dict(config, dtype), weights)
    with torch.device("meta"):
        model = MoEUTLM(config)
    model.load_state_dict(weights, assign=True)
    return model.to(device).eval()


# --- consolidation of a training checkpoint's per-rank weight files ------------------------

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_DTYPES_BY_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def write_safetensors_streaming(
    path: Path, specs: TensorSpecs, tensors: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Write a safetensors file whose tensors arrive one at a time, in the order of `specs`.

    The header (names, dtypes, shapes, byte offsets) comes from `specs` up front, so no more than
    one tensor is ever held; each arriving tensor must match its spec. Written in place: callers
    that need the file whole or not at all wrap this in `write_atomically`.
    """
    header, offset = {}, 0
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
            spec_name, (shape, dtype) = next(expected)
            if (name, tuple(tensor.shape), tensor.dtype) != (spec_name, shape, dtype):
                raise CheckpointMismatchError(f"tensor {name!r} does not match the header")
            out.write(tensor.contiguous().flatten().view(torch.uint8).numpy().data)


def _full_specs(checkpoint_dir: Path, config: MoEUTConfig) -> TensorSpecs:
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
    checkpoint_dir: str | os.PathLike, config: MoEUTConfig, out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
) -> Path:  # fmt: skip
    """A model directory from a checkpoint's per-rank weight files, any TP/EP layout."""
    specs = _full_specs(Path(checkpoint_dir), config)
    dtype = specs["embedding.weight"][1] if "embedding.weight" in specs else torch.float32
    # Checked before any tensor data is read: a wrong config fails in milliseconds.
    verify_state_dict(
        expected_state_dict(config, dtype),
        {name: torch.empty(shape, dtype=d, device="meta") for name, (shape, d) in specs.items()},
    )
    tensors = iter_full_tensors(checkpoint_dir, config)
    return _write_model_dir(
        out_dir, config, lambda p: write_safetensors_streaming(p, specs, tensors), tokenizer_path
    )
