"""The `moeut` command: one subcommand per feature module.

Each feature module exposes `register(subparsers)`, which adds its subcommands and sets
`handler` on the parsed namespace. A command imports only its own module (`moeut prep` reads
its first byte without torch being imported), and heavy imports stay inside the handlers so
that `moeut --help` is fast. Every subcommand gets `--log-level` and a help that shows each
option's default.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from moeut_dist import logs

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
    "plot": "moeut_dist.plot_cli",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default after its help (unless it has none:
    None, False, or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shows_default = action.option_strings or action.nargs in ("?", "*")
        default = action.default
        if (
            "%(default)" not in text
            and shows_default
            and default not in (None, False, argparse.SUPPRESS, [])
        ):
            text += " (default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """The parser of `moeut` and of every subcommand (argparse gives nested subcommands their
    parent's class): help with defaults, and `--log-level` on every command that runs."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def set_defaults(self, **kwargs) -> None:
        if "handler" in kwargs:
            self.add_argument(
                "--log-level",
                choices=logs.LEVELS,
                default="info",
                help="least important messages shown (ranks other than 0: warnings unless debug)",
            )
        super().set_defaults(**kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` alone (its module's subcommands), or of every command."""
    parser = CommandParser(prog="moeut", description=__doc__.splitlines()[0])
    version = importlib.metadata.version("moeut-dist")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="`moeut COMMAND --help` for its own"
    )
    modules = dict.fromkeys(_COMMAND_MODULES.values())  # each once, in order
    if command in _COMMAND_MODULES:
        modules = {_COMMAND_MODULES[command]: None}
    for module_name in modules:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logs.configure()  # already while parsing: `train --help` imports the training modules
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    logs.configure(args.log_level)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
