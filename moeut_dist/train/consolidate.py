"""`moeut export`: a training checkpoint of any TP / EP / ZeRO layout → one model directory.

Runs in a single plain process, with memory bounded by the largest tensor
(`moeut_dist.export.export_shards`): the optimizer partitions are not read at all, the weight
shards are streamed. The model config comes from the checkpoint's run config; the tokenizer is the
copy the checkpoint holds (the run's own, whatever has happened to its data paths since).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moeut_dist import arch
from moeut_dist.config import ConfigError
from moeut_dist.data import Tokenizer
from moeut_dist.export import OFFICIAL_FILE, export_shards, load_pretrained
from moeut_dist.train.checkpoint import ENGINE_TAG, TOKENIZER_FILE, is_complete, latest_checkpoint
from moeut_dist.train.config import load_config


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint `path` names: a run directory or its `checkpoints/` folder (their latest
    complete checkpoint), or one checkpoint directory."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if (root / "latest.json").is_file():
            return latest_checkpoint(root)
    if is_complete(path):
        return path
    raise FileNotFoundError(
        f"{path} is neither a run directory with checkpoints nor a complete checkpoint"
    )


def export_checkpoint(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, official: bool = False
) -> Path:
    """Write the model directory of `checkpoint` (see `find_checkpoint`) to `out_dir`; with
    `official`, also the authors' state-dict format as `official_model.pt`."""
    directory = find_checkpoint(checkpoint)
    run = load_config(directory / "config.yaml")
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise ConfigError(
            f"{directory} has no {TOKENIZER_FILE} (written by another version of moeut-dist?); "
            "a checkpoint holds its run's tokenizer"
        )
    config = run.model.build(Tokenizer(tokenizer_path).vocab_size)
    spec = arch.of(config)
    add_files = None
    if official:
        if spec.official_state_dict is None:
            raise ConfigError(f"the authors' checkpoint format exists for MoEUT, not {spec.name}")

        def add_files(model_dir: Path) -> None:
            """The authors' state-dict format of the model directory's weights, beside them."""
            weights = spec.official_state_dict(load_pretrained(model_dir))
            torch.save(weights, model_dir / OFFICIAL_FILE)

    return export_shards(directory / ENGINE_TAG, config, out_dir, tokenizer_path, add_files)
