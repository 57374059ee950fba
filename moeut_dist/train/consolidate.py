"""`moeut export`: a training checkpoint of any TP / EP / ZeRO layout → one model directory.

Runs in a single plain process, with memory bounded by the largest tensor
(`moeut_dist.export.export_shards`): the optimizer partitions are not read at all, the weight
shards are streamed. The model config comes from the checkpoint's run config; the tokenizer is the
copy the checkpoint holds (the run's own, whatever has happened to its data paths since).

Every file read is checked against the checkpoint's checksums first. A live run may prune the
checkpoint being exported: the export holds a lease on it that pruning honours, and if the run
pruned it between being picked and being leased, the export takes the newest one instead and
says so.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from moeut_dist import arch
from moeut_dist.checksums import verify_checksums
from moeut_dist.config import ConfigError
from moeut_dist.data import Tokenizer
from moeut_dist.export import OFFICIAL_FILE, export_shards, load_pretrained
from moeut_dist.train.checkpoint import (
    ENGINE_TAG,
    TOKENIZER_FILE,
    checkpoint_lease,
    is_complete,
    latest_checkpoint,
)
from moeut_dist.train.config import load_config

_RUN_CONFIG = "config.yaml"
_PICKS = 3  # checkpoints picked before giving up, each pruned before it could be leased


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
    for _ in range(_PICKS):
        directory = find_checkpoint(checkpoint)
        try:
            with checkpoint_lease(directory):
                if is_complete(directory):
                    return _export_leased(directory, out_dir, official)
        except FileNotFoundError:
            if is_complete(directory):
                raise  # a file the checkpoint does not have, not a pruned checkpoint
        warnings.warn(
            f"{directory} was pruned by its run as it was picked; exporting the newest "
            "complete checkpoint instead",
            RuntimeWarning,
            stacklevel=2,
        )
    raise FileNotFoundError(f"{checkpoint}: {_PICKS} checkpoints in a row were pruned as picked")


def _export_leased(directory: Path, out_dir: str | os.PathLike, official: bool) -> Path:
    verify_checksums(
        directory,
        include=lambda name: (
            name in (_RUN_CONFIG, TOKENIZER_FILE) or name.startswith(f"{ENGINE_TAG}/model_")
        ),
    )
    run = load_config(directory / _RUN_CONFIG)
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
