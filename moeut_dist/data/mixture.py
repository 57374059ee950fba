"""Batches drawn from several corpora in proportion to their weights, resumable bit for bit.

Each source is an endless `TokenLoader` of its own (its own epochs, shards and workers: one
source ending an epoch does not disturb the others). The samples of optimizer step `step` are
labelled with their sources by draws from (seed, step) alone, in proportion to the weights;
every data-parallel rank draws the same labels and takes that many samples from its share of
each source. So each source advances by the same number of samples on every rank, and its
position is one global count (`samples`: samples taken over all ranks), as for one corpus.

The state (between steps) is the step, each source's loader state and global count, and the
weights. On restore the weights may differ: the new ones apply from the restored step on and
`weight_changes` says what changed, for the run to record. Any other change to the sources
(names, shard directories) is refused, naming the source.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeut_dist.data.loader import COUNTERS, TokenLoader
from moeut_dist.data.storage import RetryPolicy
from moeut_dist.data.tokenizer import Tokenizer

_STATE_FORMAT = 1
# Mixed into the seed of the draws, so that they are not the stream of (seed, epoch) that
# orders a source's shards.
_DRAW_STREAM = 0x6D6978


@dataclass(frozen=True)
class Source:
    name: str
    shard_dir: str  # a path or URL (`storage`)
    weight: float


def step_labels(weights: Sequence[float], seed: int, step: int, samples: int) -> np.ndarray:
    """The source index of each of a step's `samples` samples: a pure function of its inputs."""
    probabilities = np.asarray(weights, np.float64) / sum(weights)
    rng = np.random.default_rng((seed, step, _DRAW_STREAM))
    return rng.choice(len(probabilities), size=samples, p=probabilities)


class MixtureLoader:
    """Micro-batches `[batch_size, seq_len + 1]` of one data-parallel rank, `samples_per_step`
    samples (this rank's share of a global batch) per optimizer step, mixed from `sources`.

    `state_dict()` is taken between steps, as the trainer does; the other arguments are those
    of `TokenLoader`, which reads each source's train split.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        seq_len: int,
        tokenizer: str | Path | Tokenizer,
        batch_size: int,
        samples_per_step: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        skip_corrupt: bool = False,
        retry: RetryPolicy | None = None,
        prefetch_shards: int = 1,
    ) -> None:
        names = [source.name for source in sources]
        if not sources or len(set(names)) != len(names):
            raise ValueError(f"need at least one source and distinct names, got {names}")
        if not all(source.weight > 0 for source in sources):
            raise ValueError(f"source weights must be positive, got {sources}")
        if samples_per_step % batch_size:
            raise ValueError(
                f"samples_per_step {samples_per_step} is not a multiple of {batch_size}"
            )
        self.sources = list(sources)
        self._seed = seed
        self._batch_size = batch_size
        self._samples_per_step = samples_per_step
        self._dp_world_size = dp_world_size
        self._loaders = {
            source.name: TokenLoader(
                source.shard_dir,
                seq_len=seq_len,
                tokenizer=tokenizer,
                batch_size=1,  # samples are taken one by one, so a position is a sample count
                dp_rank=dp_rank,
                dp_world_size=dp_world_size,
                num_workers=num_workers,
                seed=seed,
                skip_corrupt=skip_corrupt,
                retry=retry,
                prefetch_shards=prefetch_shards,
            )
            for source in sources
        }
        self.step = 0
        self.samples = dict.fromkeys(names, 0)  # global: over all data-parallel ranks
        self.weight_changes: dict[str, tuple[float, float]] = {}  # name: (saved, now)
        self._mid_step = False

    @property
    def weights(self) -> list[float]:
        return [source.weight for source in self.sources]

    def __iter__(self) -> Iterator[torch.Tensor]:
        streams = {name: iter(loader) for name, loader in self._loaders.items()}
        names = list(self._loaders)
        while True:
            labels = step_labels(self.weights, self._seed, self.step, self._samples_per_step)
            rows = torch.cat([next(streams[names[label]]) for label in labels])
            for index, count in zip(*np.unique(labels, return_counts=True), strict=True):
                self.samples[names[index]] += int(count) * self._dp_world_size
            self._mid_step = True
            for start in range(0, len(rows), self._batch_size):
                if start + self._batch_size == len(rows):
                    self.step += 1
                    self._mid_step = False
                yield rows[start : start + self._batch_size]

    def counters(self) -> dict[str, int]:
        """The sources' `TokenLoader.counters()`, summed."""
        totals = dict.fromkeys(COUNTERS, 0)
        for loader in self._loaders.values():
            for name, value in loader.counters().items():
                totals[name] += value
        return totals

    def state_dict(self) -> dict[str, Any]:
        if self._mid_step:
            raise RuntimeError("a mixture's state is taken between steps, not inside one")
        return {
            "format": _STATE_FORMAT,
            "step": self.step,
            "sources": [
                {"name": s.name, "shard_dir": s.shard_dir, "weight": s.weight} for s in self.sources
            ],
            "samples": dict(self.samples),
            "loaders": {name: loader.state_dict() for name, loader in self._loaders.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; the weights may have changed (`weight_changes`)."""
        if "sources" not in state:
            raise ValueError("the saved run read data.shard_dir, this one mixes data.sources")
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown mixture state format {state.get('format')!r}")
        saved = {source["name"]: source for source in state["sources"]}
        now = {source.name: source for source in self.sources}
        problems = [f"source {name!r} added" for name in now if name not in saved]
        problems += [f"source {name!r} removed" for name in saved if name not in now]
        problems += [
            f"source {name!r} has shard_dir {now[name].shard_dir!r}, "
            f"{saved[name]['shard_dir']!r} before"
            for name in now
            if name in saved and now[name].shard_dir != saved[name]["shard_dir"]
        ]
        if problems:
            raise ValueError(
                f"data.sources changed since the checkpoint ({'; '.join(problems)}); only "
                "weights may change"
            )
        for name, loader in self._loaders.items():
            loader.load_state_dict(state["loaders"][name])
        self.step = state["step"]
        self.samples = dict(state["samples"])
        self.weight_changes = {
            name: (saved[name]["weight"], source.weight)
            for name, source in now.items()
            if saved[name]["weight"] != source.weight
        }
