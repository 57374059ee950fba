"""How weights are split across a layout, and the per-rank weight files of a checkpoint.

Light on purpose (no DeepSpeed, no megatron-core): exporting a checkpoint to one file runs in a
single plain process. A checkpoint directory holds one `model_tpXX_epYY.safetensors` per
(tensor-parallel rank, expert-parallel rank), together every TP shard and every expert.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moeut_dist.arch import ModelConfig, ShardRule, shard_rule

_SHARD_FILE = re.compile(r"model_tp(\d+)_ep(\d+)\.safetensors")


def tensor_shard_range(size: int, n_ranks: int, rank: int) -> range:
    """The indices tensor-parallel `rank` holds of a dimension of `size` split over `n_ranks`:
    `torch.chunk`'s pieces, so the last ranks may hold fewer (or none)."""
    chunk = -(-size // n_ranks)
    return range(min(size, rank * chunk), min(size, (rank + 1) * chunk))


def shard_file(directory: str | os.PathLike, tp_rank: int, ep_rank: int) -> Path:
    return Path(directory) / f"model_tp{tp_rank:02d}_ep{ep_rank:02d}.safetensors"


def shard_metadata(tensor_parallel: int, expert_parallel: int) -> dict[str, str]:
    """Stored in every weight file, so that a reader knows which ranks must be present."""
    return {"tensor_parallel": str(tensor_parallel), "expert_parallel": str(expert_parallel)}


@dataclass(frozen=True)
class ShardFiles:
    """The weight files of one checkpoint.

    With TP folded into EP, TP and EP ranks vary together (TP = 2 × EP = 2 on 4 processes writes
    only (0, 0) and (1, 1)), so the grid is not complete; what matters is that every TP rank and
    every EP rank has a file.
    """

    tensor_parallel: int
    expert_parallel: int
    files: dict[tuple[int, int], Path]

    def of_tensor_rank(self, tp_rank: int) -> Path:
        return next(path for (tp, _), path in sorted(self.files.items()) if tp == tp_rank)

    def of_expert_rank(self, ep_rank: int) -> Path:
        return next(path for (_, ep), path in sorted(self.files.items()) if ep == ep_rank)

    def for_rule(self, rule: ShardRule | None) -> list[Path]:
        """The files holding the pieces of a tensor split by `rule`, in concatenation order."""
        if rule is None:
            return [self.files[min(self.files)]]
        if rule.axis == "tensor":
            return [self.of_tensor_rank(tp) for tp in range(self.tensor_parallel)]
        return [self.of_expert_rank(ep) for ep in range(self.expert_parallel)]


def find_shard_files(directory: str | os.PathLike) -> ShardFiles:
    """The weight files of a checkpoint directory; raises naming any rank without a file."""
    files = {}
    for path in Path(directory).iterdir():
        match = _SHARD_FILE.fullmatch(path.name)
        if match:
            files[int(match[1]), int(match[2])] = path
    if not files:
        raise FileNotFoundError(f"{directory} holds no model_tpXX_epYY.safetensors weight files")
    with safe_open(files[min(files)], framework="pt") as first:
        metadata = first.metadata() or {}
    try:
        sizes = int(metadata["tensor_parallel"]), int(metadata["expert_parallel"])
    except (KeyError, ValueError):
        raise ValueError(f"{files[min(files)]} lacks its layout metadata") from None
    for axis, size, present in zip(
        ("tensor", "expert"), sizes, ({tp for tp, _ in files}, {ep for _, ep in files}), strict=True
    ):
        missing = sorted(set(range(size)) - present)
        if missing:
            raise FileNotFoundError(
                f"{directory} is incomplete: no weight file for {axis}-parallel rank(s) {missing}"
            )
    return ShardFiles(*sizes, files)


def iter_full_tensors(
    directory: str | os.PathLike, config: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each full (single-process) tensor in turn, assembled from the shard files: TP shards are
    concatenated in rank order, experts in EP rank order. Only one full tensor (and its pieces)
    is in memory at a time."""
    shards = find_shard_files(directory)
    with safe_open(shards.files[min(shards.files)], framework="pt") as first:
        names = list(first.keys())
    for name in names:
        rule = shard_rule(name, config)
        pieces = [_read(path, name) for path in shards.for_rule(rule)]
        yield name, pieces[0] if rule is None else torch.cat(pieces, rule.dim)


def read_full_state_dict(
    directory: str | os.PathLike, config: ModelConfig
) -> dict[str, torch.Tensor]:
    return dict(iter_full_tensors(directory, config))


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as file:
        return file.get_tensor(name)
