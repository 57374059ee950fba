"""`moeut train --config FILE.yaml [key=value ...]`: one process of a (possibly multi-node) run.

Start it once per process with `torchrun`, the `deepspeed` launcher (`--no_local_rank`), or as a
plain process for a one-process run; see `launch/`.
"""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from moeut_dist.config import ConfigError
    from moeut_dist.train.config import load_config
    from moeut_dist.train.loop import NonFiniteLossError, train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        config = load_config(args.config, overrides)
        train(config)
    except ConfigError as error:
        print(f"moeut train: invalid configuration: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"moeut train: {error}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` to the `moeut` command."""
    parser = subparsers.add_parser(
        "train",
        help="train a MoEUT (torchrun / deepspeed / plain process)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--config", help="YAML run config (launch/configs/ has examples)")
    parser.add_argument(
        "--resume",
        help="'auto' (default): continue from the latest complete checkpoint if there is one; "
        "'never'; or a checkpoint directory",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. optim.lr=1e-3 parallel.expert=2",
    )
    parser.set_defaults(handler=_run)
