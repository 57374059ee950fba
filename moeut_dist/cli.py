"""The `moeut` command: one subcommand per feature module.

Each feature module exposes `register(subparsers)`, which adds its subcommand and sets
`handler` on the parsed namespace; heavy imports stay inside the handlers so that `moeut --help`
is fast. Every subcommand gets `--log-level` and a help that shows each option's default.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from moeut_dist import logs

# Feature modules, in the order their subcommands are listed.
_COMMAND_MODULES = (
    "moeut_dist.demo",
    "data_prep.cli",
    "moeut_dist.convert",
    "moeut_dist.eval_cli",
    "moeut_dist.analysis",
    "moeut_dist.train.cli",
    "moeut_dist.plot_cli",
)


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


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="moeut", description=__doc__.splitlines()[0])
    version = importlib.metadata.version("moeut-dist")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="`moeut COMMAND --help` for its own"
    )
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logs.configure()  # already while parsing: `train --help` imports the training modules
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
