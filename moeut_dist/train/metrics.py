"""What a run reports: expert usage, expert-parallel traffic, and the writers.

Model FLOPs come from the model's architecture (`moeut_dist.arch`, `ModelSummary`): 2 × the
paper's MACs per token, a backward costing two forwards; recomputation for activation
checkpointing is not model work and is not counted (the usual MFU convention).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moeut_dist.model import MoEUTLM
from moeut_dist.plots import METRICS_FILE, read_metrics
from moeut_dist.train.config import WandbSection


class RoutingMonitor:
    """Expert usage per group layer and expert-parallel bytes sent, since the last `collect`.

    The σ-MoE layers count their own selections (`SigmaMoE.count_expert_usage`), in training
    forwards only; the expert-parallel dispatchers count the bytes they send.
    """

    def __init__(self, model: MoEUTLM) -> None:
        self.layers = [layer.ffn for layer in model.transformer.layers]
        for ffn in self.layers:
            ffn.count_expert_usage()
        # The expert-parallel dispatcher keeps `DispatchStats`; the local one sends nothing.
        self.traffic = [f.dispatcher.stats for f in self.layers if hasattr(f.dispatcher, "stats")]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the traffic statistics as they are (for validation passes)."""
        saved = [(s.tokens, s.token_copies, s.remote_bytes, s.routing_bytes) for s in self.traffic]
        try:
            yield
        finally:
            for stats, values in zip(self.traffic, saved, strict=True):
                stats.tokens, stats.token_copies, stats.remote_bytes, stats.routing_bytes = values

    def collect(self) -> dict[str, Any]:
        """Global statistics (a collective on every rank), then reset.

        `expert_share[l][e]`: fraction of layer l's selections that chose expert e;
        `expert_entropy[l]`: entropy of that distribution over log(n_experts) (1: uniform);
        `ep_bytes_sent`: activation and routing bytes all ranks sent to other ranks in forward
        dispatches, recomputed ones included (the return trip and the backward move about three
        times as much again).
        """
        counts = torch.stack([ffn.expert_usage for ffn in self.layers])
        # Tensor-parallel ranks see the same tokens; summing over data-parallel ranks counts
        # each token once.
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        traffic = torch.tensor(
            [float(sum(s.remote_bytes + s.routing_bytes for s in self.traffic))],
            dtype=torch.float64,
            device=counts.device,
        )
        dist.all_reduce(traffic)
        shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        entropy = -(shares * shares.clamp_min(1e-30).log()).sum(dim=1) / math.log(counts.shape[1])
        for ffn in self.layers:
            ffn.expert_usage.zero_()
        for stats in self.traffic:
            stats.reset()
        return {
            "expert_entropy": entropy.tolist(),
            "expert_share": shares.tolist(),
            "ep_bytes_sent": traffic.item(),
        }


class MetricsWriter:
    """JSONL records (one per line, flushed) and TensorBoard scalars, written by rank 0.

    Records are valid JSON: a value that is not a finite number (a NaN loss) is written as
    `null`, and the record's `nonfinite` field names it with its value ({"loss": "nan"}).
    On resume from step s, records after s (written by the interrupted session, about to be
    produced again) are cut off the file in place, so the log holds each step once and a
    disk left full by the interrupted session has room for the resume. A run that starts from
    scratch where an earlier one logged keeps those logs as `metrics.1.jsonl` and
    `tensorboard.1/` (`.2`, …).
    """

    def __init__(
        self,
        out_dir: Path,
        tensorboard: bool,
        resumed_step: int | None,
        wandb: WandbSection | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = dist.get_rank() == 0
        self.tensorboard = None
        self.wandb = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / METRICS_FILE
        tensorboard_dir = out_dir / "tensorboard"
        if resumed_step is None:
            for earlier in (self.path, tensorboard_dir):
                if earlier.exists():
                    os.replace(earlier, _free_name(earlier))
        elif self.path.is_file():
            _truncate_after(self.path, resumed_step)
        self.file = open(self.path, "a")  # noqa: SIM115 -- open for the writer's lifetime
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resumed_step is None else resumed_step + 1
            self.tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=purge)
        if wandb is not None:
            from moeut_dist.train.wandb_sink import WandbSink

            resumed = resumed_step is not None
            self.wandb = WandbSink(wandb, out_dir, run_config or {}, resumed)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **_finite_json(values)}
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(kind, step, values)
        if self.tensorboard is None:
            return
        for name, value in values.items():
            # TensorBoard plots NaN and Inf as such.
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.tensorboard.add_scalar(f"{kind}/{name}", value, step)
        for layer, entropy in enumerate(values.get("expert_entropy", [])):
            self.tensorboard.add_scalar(f"{kind}/expert_entropy/layer{layer}", entropy, step)
        for layer, shares in enumerate(values.get("expert_share", [])):
            self.tensorboard.add_histogram(
                f"{kind}/expert_share/layer{layer}", torch.tensor(shares), step
            )

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close()


def _finite_json(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with non-finite numbers as None, named with their value under `nonfinite`."""
    nonfinite = {
        name: str(value).lower()  # "nan", "inf", "-inf"
        for name, value in values.items()
        if isinstance(value, float) and not math.isfinite(value)
    }
    if not nonfinite:
        return values
    return {**{k: None if k in nonfinite else v for k, v in values.items()}, "nonfinite": nonfinite}


def _truncate_after(path: Path, step: int) -> None:
    """Cut a metrics file after its last whole record of a step up to `step`, in place (no
    copy, so no free space is needed). Records are in step order; a line cut short by a crash
    ends the part kept."""
    kept = 0
    with open(path, "rb+") as file:
        for line in file:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not line.endswith(b"\n") or record["step"] > step:
                break
            kept += len(line)
        file.truncate(kept)
        os.fsync(file.fileno())


def _free_name(path: Path) -> Path:
    """`metrics.1.jsonl`, `metrics.2.jsonl`, … (`tensorboard.1`, …): the first that is free."""
    candidates = (path.with_name(f"{path.stem}.{n}{path.suffix}") for n in itertools.count(1))
    return next(c for c in candidates if not c.exists())


def read_run_metrics(out_dir: str | Path, kind: str = "train") -> list[dict[str, Any]]:
    """The records of one kind ("train", "val", "event", "model") from a run's metrics file,
    in order."""
    return [r for r in read_metrics(Path(out_dir) / METRICS_FILE) if r["kind"] == kind]
