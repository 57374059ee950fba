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

METRICS_FILE = "metrics.jsonl"  # in a run's out_dir
EntropyCurve = list[tuple[int, list[float]]]  # (step, selection entropy of each layer)


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
    return _plot_losses([("", read_metrics(metrics_path), Path(metrics_path))], out_path, title)


def plot_runs(
    runs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None
) -> list[Path]:
    """Overlaid curves of `runs` (run directories or metrics files) in `out_dir`: `loss.png`
    (training and validation loss) and, where runs logged expert usage, `expert_usage.png`
    (selection entropy per layer over training, one panel per run). Returns the PNGs written."""
    paths = [Path(run) / METRICS_FILE if Path(run).is_dir() else Path(run) for run in runs]
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs; give one per run")
    names = labels or [path.parent.name or str(path) for path in paths]
    loaded = [(name, read_metrics(path), path) for name, path in zip(names, paths, strict=True)]
    out_dir = Path(out_dir)
    written = [_plot_losses(loaded, out_dir / "loss.png", "loss")]
    with_experts = [(name, _entropy_points(records)) for name, records, _ in loaded]
    with_experts = [(name, points) for name, points in with_experts if points]
    if with_experts:
        written.append(_plot_expert_usage(with_experts, out_dir / "expert_usage.png"))
    return written


def _plot_losses(
    runs: list[tuple[str, list[dict[str, Any]], Path]], out_path: str | Path, title: str
) -> Path:
    figure, axes = _figure((7, 4))
    for index, (name, records, path) in enumerate(runs):
        train, validation = loss_points(records)
        if not train:
            raise ValueError(f"{path}: no training records with a 'loss'")
        colour = f"C{index}"
        prefix = f"{name}: " if name else ""
        axes.plot(*zip(*train, strict=True), color=colour, linewidth=1, label=f"{prefix}train loss")
        if validation:
            axes.plot(*zip(*validation, strict=True), "o-", color=colour, alpha=0.7,
                      label=f"{prefix}validation loss")  # fmt: skip
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out_path)


def _entropy_points(records: list[dict[str, Any]]) -> EntropyCurve:
    """(step, selection entropy of each layer) of the training records that have them."""
    return [
        (record["step"], record["expert_entropy"])
        for record in records
        if record.get("kind", "train") == "train" and record.get("expert_entropy")
    ]


def _plot_expert_usage(
    runs: list[tuple[str, list[tuple[int, list[float]]]]], out_path: Path
) -> Path:
    figure = Figure(figsize=(4.5 * len(runs), 3.5), dpi=120)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(runs), squeeze=False, sharey=True)[0]
    for axes, (name, points) in zip(panels, runs, strict=True):
        steps = [step for step, _ in points]
        for layer in range(len(points[0][1])):
            axes.plot(steps, [values[layer] for _, values in points], linewidth=1,
                      label=f"layer {layer}")  # fmt: skip
        axes.set_title(name)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    panels[0].set_ylabel("expert selection entropy (1: uniform)")
    return _save(figure, out_path)


def _figure(size: tuple[float, float]):
    # A bare Figure on the Agg canvas: no pyplot, so no global backend state and no display.
    figure = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Figure, out_path: str | Path) -> Path:
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, format="png")
    return out_path
