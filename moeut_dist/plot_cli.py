"""`moeut plot RUN [RUN ...]`: a run's curves as PNGs, several runs overlaid for comparison."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeut_dist.cli_errors import reports_bad_input


@reports_bad_input("plot")
def _plot_command(args: argparse.Namespace) -> int:
    from moeut_dist.plots import plot_runs

    for path in plot_runs(args.runs, args.out, labels=args.label):
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="loss, validation and expert-usage curves of runs, overlaid, as PNGs",
        description="Plot runs (their out_dir, or a metrics.jsonl) side by side: loss.png "
        "(training and validation loss of every run) and expert_usage.png (each run's expert "
        "selection entropy per layer over training; 1 is uniform use).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories or metrics files")
    parser.add_argument("--out", type=Path, default=Path("plots"), help="directory for the PNGs")
    parser.add_argument(
        "--label",
        action="append",
        help="a legend name per run, in order (repeat; default: each run's directory name)",
    )
    parser.set_defaults(handler=_plot_command)
