"""The PNGs of `moeut analyze`, drawn from its JSON report (`moeut_dist.analysis`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    # A bare Figure on the Agg canvas: no pyplot, so no global backend state and no display.
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _application_labels(report: dict[str, Any]) -> list[str]:
    return [f"r{a['repeat']} L{a['group_layer']}" for a in report["applications"]]


def plot_expert_usage(report: dict[str, Any], path: Path) -> Path:
    """σ-MoE usage: one row per layer application, one column per expert."""
    usage = np.array(report["ffn"]["usage"])
    figure = _figure(max(6.0, usage.shape[1] / 12), 1.5 + 0.35 * usage.shape[0])
    axes = figure.add_subplot()
    image = axes.imshow(usage, aspect="auto", interpolation="nearest", cmap="viridis")
    axes.set_yticks(range(len(usage)), _application_labels(report))
    axes.set_xlabel("expert")
    axes.set_title("σ-MoE expert usage per layer application (share of selections)")
    figure.colorbar(image, ax=axes)
    return _save(figure, path)


def plot_overlap(report: dict[str, Any], path: Path) -> Path:
    """Mean Jaccard overlap of a token's selections between applications of one group layer;
    pairs of different group layers (disjoint experts) are left blank."""
    jaccard = np.array(
        [[np.nan if v is None else v for v in row] for row in report["ffn"]["overlap_jaccard"]]
    )
    labels = _application_labels(report)
    figure = _figure(1.5 + 0.4 * len(labels), 1.2 + 0.4 * len(labels))
    axes = figure.add_subplot()
    image = axes.imshow(jaccard, vmin=0, vmax=1, cmap="magma", interpolation="nearest")
    axes.set_xticks(range(len(labels)), labels, rotation=90)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_title("selected experts: mean Jaccard between applications")
    figure.colorbar(image, ax=axes)
    return _save(figure, path)


def plot_distinct_experts(report: dict[str, Any], path: Path) -> Path:
    """Histogram of the number of distinct σ-MoE experts one token uses over the whole depth."""
    distinct = report["ffn"]["distinct_experts_per_token"]
    counts = [int(c) for c in distinct["histogram"]]
    tokens = list(distinct["histogram"].values())
    figure = _figure(6, 3.5)
    axes = figure.add_subplot()
    axes.bar(counts, tokens, width=1.0)
    model = report["model"]
    fewest = model["experts_per_token"] * model["group_size"]
    axes.axvline(fewest, color="gray", linestyle="--", label=f"k·G = {fewest}")
    axes.set_xlabel("distinct experts per token over all layer applications")
    axes.set_ylabel("tokens")
    axes.legend()
    return _save(figure, path)


def plot_attention_usage(report: dict[str, Any], path: Path) -> Path:
    """SwitchHead usage: per projection, one row per application, columns head × expert."""
    attention = report["attention"]
    figure = _figure(8, 1.5 + 0.6 * len(report["applications"]))
    for column, (name, values) in enumerate(attention.items()):
        usage = np.array(values["usage"])  # [L, H, Ea]
        n_heads, n_experts = usage.shape[1:]
        axes = figure.add_subplot(1, len(attention), column + 1)
        image = axes.imshow(usage.reshape(len(usage), -1), aspect="auto", cmap="viridis")
        for head in range(1, n_heads):
            axes.axvline(head * n_experts - 0.5, color="white", linewidth=1)
        axes.set_yticks(range(len(usage)), _application_labels(report))
        axes.set_xlabel(f"head × expert ({n_heads} × {n_experts})")
        axes.set_title(f"SwitchHead {name} experts")
        figure.colorbar(image, ax=axes)
    return _save(figure, path)


def plot_entropy(report: dict[str, Any], path: Path) -> Path:
    """Normalised entropy of the usage distribution per application (σ-MoE; SwitchHead per
    head, averaged over heads)."""
    labels = _application_labels(report)
    figure = _figure(7, 3.5)
    axes = figure.add_subplot()
    axes.plot(labels, report["ffn"]["usage_entropy"], "o-", label="σ-MoE")
    for name, values in (report["attention"] or {}).items():
        mean_over_heads = np.array(values["usage_entropy"]).mean(axis=1)
        axes.plot(labels, mean_over_heads, "s--", label=f"SwitchHead {name} (mean of heads)")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("entropy / log(experts)")
    axes.tick_params(axis="x", rotation=90)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every PNG of the report into `out_dir`; returns their paths."""
    plots = [
        (plot_expert_usage, "expert_usage.png"),
        (plot_overlap, "layer_overlap.png"),
        (plot_distinct_experts, "distinct_experts.png"),
        (plot_entropy, "entropy.png"),
    ]
    if report["attention"] is not None:
        plots.append((plot_attention_usage, "attention_usage.png"))
    return [plot(report, out_dir / name) for plot, name in plots]
