"""Loss curves from the training metrics log: JSONL, one record per line, each with a "step".

A training loss is the "loss" of a record of kind "train" (or of no kind); a validation loss is
a record's "val_loss", or the "loss" of a record of kind "val" (the training loop's layout,
`{"kind": "val", "step": ..., "loss": ...}`). Records of other kinds are ignored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics log; raises `ValueError` naming file:line for a bad line."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not JSON ({error})") from None
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f"{path}:{line_number}: not a metrics record with a 'step'")
            records.append(record)
    return records


def loss_points(
    records: list[dict[str, Any]],
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) pairs of training and of validation, in log order."""
    train, validation = [], []
    for record in records:
        kind = record.get("kind", "train")
        if record.get("val_loss") is not None:
            validation.append((record["step"], record["val_loss"]))
        if record.get("loss") is not None and kind in ("train", "val"):
            (train if kind == "train" else validation).append((record["step"], record["loss"]))
    return train, validation


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    """Write a PNG of training loss (and validation loss, where logged) against step."""
    train, validation = loss_points(read_metrics(metrics_path))
    if not train:
        raise ValueError(f"{metrics_path}: no training records with a 'loss'")
    # A bare Figure on the Agg canvas: no pyplot, so no global backend state and no display.
    figure = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if validation:
        axes.plot(*zip(*validation, strict=True), "o-", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, format="png")
    return out_path
