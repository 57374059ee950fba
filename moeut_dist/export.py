"""Consolidated model directories: `model.safetensors` + `config.json` (+ tokenizer).

A directory written here loads in a single process with `load_pretrained`, whatever layout the
model was trained in. Loading checks every tensor's name, shape and dtype against the config and
names the first mismatch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeut_dist.config import MoEUTConfig
from moeut_dist.model import MoEUTLM

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model it is loaded into."""


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


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary name, then rename, so a crash never leaves a partial file."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def save_pretrained(
    model: MoEUTLM, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(weights, str(p)))
    config_text = json.dumps(model.config.to_dict(), indent=2) + "\n"
    _atomic_write(out / CONFIG_FILE, lambda p: p.write_text(config_text))
    if tokenizer_path is not None:
        _atomic_write(out / TOKENIZER_FILE, lambda p: shutil.copyfile(tokenizer_path, p))
    return out


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
    with torch.device("meta"):
        model = MoEUTLM(config)
    # Every tensor must share the dtype of the embedding (a model is saved in one dtype).
    dtype = weights.get("embedding.weight", next(iter(weights.values()))).dtype
    verify_state_dict({n: t.to(dtype) for n, t in model.state_dict().items()}, weights)
    model.load_state_dict(weights, assign=True)
    return model.to(device).eval()
