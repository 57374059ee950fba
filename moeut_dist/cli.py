"""The `moeut` command: one subcommand per feature module.

Each feature module exposes `register(subparsers)`, which adds its subcommands and sets
`handler` on the parsed namespace. A command imports only its own module (`moeut prep` reads
its first byte without torch being imported), and heavy imports stay inside the handlers so
that `moeut --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# The feature module of each subcommand, in the order the subcommands are listed.
_COMMAND_MODULES = {
    "demo": "moeut_dist.demo",
    "prep": "data_prep.cli",
    "convert": "moeut_dist.convert",
    "generate": "moeut_dist.eval_cli",
    "eval": "moeut_dist.eval_cli",
    "analyze": "moeut_dist.analysis",
    "train": "moeut_dist.train.cli",
    "export": "moeut_dist.train.cli",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` alone (its module's subcommands), or of every command."""
    parser = argparse.ArgumentParser(prog="moeut", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = dict.fromkeys(_COMMAND_MODULES.values())  # each once, in order
    if command in _COMMAND_MODULES:
        modules = {_COMMAND_MODULES[command]: None}
    for module_name in modules:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
