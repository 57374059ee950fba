"""One-line reports of bad input for `moeut` subcommands.

A command given a missing or damaged file, a malformed config or an impossible setting should
say what is wrong in one line, not in a traceback. `reports_bad_input` wraps a subcommand's
handler so that such errors print as `moeut <command>: <message>` on stderr and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


class MissingExtraError(RuntimeError):
    """An optional integration whose package is not installed."""


def require_extra(module: str, extra: str, feature: str) -> None:
    """Raise `MissingExtraError` naming the `pip install` to run if `module` is missing."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"{feature} needs {module}: pip install 'moeut-dist[{extra}]'")


def reports_bad_input(command: str) -> Callable[[Handler], Handler]:
    """Decorate the handler of `moeut <command>` to report bad input in one line (exit 2)."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(args: argparse.Namespace) -> int:
            try:
                return handler(args)
            # Evaluated only once something was raised, so a command that succeeds never
            # imports the modules that define these types.
            except _bad_input_errors() as error:
                print(f"moeut {command}: {error}", file=sys.stderr)
                return 2

        return run

    return decorate


def _bad_input_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "the input is wrong": ValueError (ConfigError and the other checks'
    errors derive from it), OSError (missing or unreadable files), the readers' own types for
    damaged files, and a missing optional extra."""
    from safetensors import SafetensorError

    from moeut_dist.data import ShardError

    return (ValueError, OSError, SafetensorError, ShardError, MissingExtraError)
