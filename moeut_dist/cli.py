"""The `moeut` command: one subcommand per feature module.

Each feature module exposes `register(subparsers)`, which adds its subcommand and sets
`handler` on the parsed namespace; heavy imports stay inside the handlers so that `moeut --help`
is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Feature modules, in the order their subcommands are listed.
_COMMAND_MODULES = (
    "moeut_dist.demo",
    "data_prep.cli",
    "moeut_dist.convert",
    "moeut_dist.eval_cli",
    "moeut_dist.analysis",
    "moeut_dist.train.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeut", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
