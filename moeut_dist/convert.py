"""Import and export of the authors' `MoEUTLM` checkpoint format.

Our module tree mirrors theirs, so the mapping is the identity on names; what this module adds is
validation (every tensor named, shaped and typed as the config says), unwrapping of the training
framework's containers, and dropping their stored RoPE frequencies, which we recompute.
Checkpoints are untrusted input: they are read with `weights_only=True`, never unpickled freely.
"""

from __future__ import annotations

import argparse
import os
import pickle

import torch

from moeut_dist.cli_errors import reports_bad_input
from moeut_dist.config import MoEUTConfig
from moeut_dist.export import expected_state_dict, verify_state_dict
from moeut_dist.model import MoEUTLM

# Wrappers the authors' trainer (or DataParallel) may put around the model's keys.
_KEY_PREFIXES = ("module.", "model.")
# Derived buffers their code stored; recomputed here, so dropped on import.
_DERIVED_SUFFIXES = (".inv_freq",)


def _unwrap(state_dict: dict) -> dict[str, torch.Tensor]:
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    tensors = {}
    for name, tensor in state_dict.items():
        for prefix in _KEY_PREFIXES:
            name = name.removeprefix(prefix)
        if not name.endswith(_DERIVED_SUFFIXES):
            tensors[name] = tensor
    return tensors


def from_official_state_dict(state_dict: dict, config: MoEUTConfig) -> MoEUTLM:
    """A `MoEUTLM` holding the authors' weights; raises naming the first mismatching tensor."""
    tensors = _unwrap(state_dict)
    dtype = tensors["embedding.weight"].dtype if "embedding.weight" in tensors else torch.float32
    verify_state_dict(expected_state_dict(config, dtype), tensors)
    with torch.device("meta"):
        model = MoEUTLM(config)
    model.load_state_dict({n: t.clone() for n, t in tensors.items()}, assign=True)
    return model


def load_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an authors' checkpoint file, read without executing pickled code."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'truncated'})"
        ) from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    return _unwrap(loaded)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="import a checkpoint of the authors' MoEUT code into a model directory"
    )
    parser.add_argument("--from-official", required=True, metavar="CKPT", help="their .pt file")
    parser.add_argument(
        "--profile", required=True, help="the profile the checkpoint was trained as"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    parser.add_argument("--tokenizer", help="SentencePiece model to store beside the weights")
    parser.set_defaults(handler=_convert_command)


@reports_bad_input("convert")
def _convert_command(args: argparse.Namespace) -> int:
    from moeut_dist.export import save_pretrained

    tensors = load_official_checkpoint(args.from_official)
    if "embedding.weight" not in tensors:
        raise ValueError(f"{args.from_official}: no 'embedding.weight'; not a MoEUTLM checkpoint")
    vocab_size = tensors["embedding.weight"].shape[0]
    config = MoEUTConfig.from_profile(args.profile, vocab_size=vocab_size)
    model = from_official_state_dict(tensors, config)
    out = save_pretrained(model, args.out, args.tokenizer)
    print(f"wrote {out} ({args.profile}, vocab {vocab_size})")
    return 0
