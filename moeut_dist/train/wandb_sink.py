"""Weights & Biases as a metrics backend beside JSONL and TensorBoard (`logging.wandb`).

The run's id is kept in `<out_dir>/wandb_run_id`, so a resumed session continues the same W&B
run; a fresh start gets a new one. W&B keeps its own files under `<out_dir>/wandb/` (offline
runs upload later with `wandb sync`). Steps a crashed session logged after its last checkpoint
are logged again on resume; W&B keeps the first value of a step it has seen. Records other than
training and validation (the model summary, events) go to the run's summary.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from moeut_dist.atomic_files import write_atomically
from moeut_dist.train.config import WandbSection

RUN_ID_FILE = "wandb_run_id"


class WandbSink:
    def __init__(
        self, settings: WandbSection, out_dir: Path, run_config: dict[str, Any], resumed: bool
    ) -> None:
        import wandb

        self.wandb = wandb
        id_path = out_dir / RUN_ID_FILE
        if resumed and id_path.is_file():
            run_id = id_path.read_text().strip()
        else:
            run_id = secrets.token_hex(6)  # W&B ids: up to 64 of [a-z0-9_-]
            write_atomically(id_path, lambda path: path.write_text(run_id + "\n"))
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or out_dir.resolve().name,
            mode=settings.mode,
            id=run_id,
            resume="allow",
            dir=str(out_dir),
            config=run_config,
            settings=wandb.Settings(quiet=True),  # W&B's own banner and summary: not our log
        )

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        flat: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{kind}/{name}"] = value
        for layer, entropy in enumerate(values.get("expert_entropy", [])):
            flat[f"{kind}/expert_entropy/layer{layer}"] = entropy
        for layer, shares in enumerate(values.get("expert_share", [])):
            flat[f"{kind}/expert_share/layer{layer}"] = self.wandb.Histogram(shares)
        if not flat:
            return
        if kind in ("train", "val"):
            self.run.log(flat, step=step)
        else:
            # Facts about the run ("model" summary, resume events), not a series: a resumed
            # session logs them at a step W&B has already seen, which it would refuse.
            self.run.summary.update(flat)

    def close(self) -> None:
        self.run.finish()
