"""`moeut train` and `moeut export`: runs and their checkpoints.

`moeut train --config FILE.yaml [key=value ...]` is one process of a (possibly multi-node) run:
start it once per process with `torchrun`, the `deepspeed` launcher (`--no_local_rank`), or as a
plain process for a one-process run; see `launch/`. `moeut export` turns a run's checkpoint into
one model directory, in a single process.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import textwrap
import typing

from moeut_dist.cli_errors import reports_bad_input

TRAIN_DESCRIPTION = """\
Train a MoEUT: one process of a run (start one per GPU with torchrun, the deepspeed launcher
or srun; a plain process is a one-process run). The run is a YAML config plus dotted KEY=VALUE
overrides; it resumes from its latest checkpoint in out_dir unless told otherwise. Every key
below can be given either way (`optim: {lr: 1e-3}` or `optim.lr=1e-3`)."""


def _run(args: argparse.Namespace) -> int:
    if args.world_size is not None and not args.dry_run:
        print("moeut train: --world-size plans a --dry-run; a run's comes from its launcher",
              file=sys.stderr)  # fmt: skip
        return 2
    from safetensors import SafetensorError

    from moeut_dist.checksums import ChecksumError
    from moeut_dist.config import ConfigError
    from moeut_dist.data import ShardError
    from moeut_dist.parallel.engine import UnsafeCheckpointFileError
    from moeut_dist.train.checkpoint import CheckpointError, DiskFullError
    from moeut_dist.train.config import load_config
    from moeut_dist.train.loop import NonFiniteLossError, train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        config = load_config(args.config, overrides)
        if args.print_config:
            print(config_yaml(config), end="")
        elif args.dry_run:
            print(dry_run(config, args.world_size))
        else:
            train(config)
    except ConfigError as error:
        print(f"moeut train: invalid configuration: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, UnsafeCheckpointFileError) as error:
        print(f"moeut train: cannot resume: {error}", file=sys.stderr)
        return 2
    # A damaged shard, or init_from weights file.
    except (ShardError, SafetensorError, ChecksumError) as error:
        print(f"moeut train: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, DiskFullError) as error:
        print(f"moeut train: {error}", file=sys.stderr)
        return 1
    return 0


def config_yaml(config) -> str:
    """The fully resolved config as YAML that `load_config` reads back to an equal config."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def dry_run(config, world_size: int | None) -> str:
    """Check the run as a start would and describe it; no process group, no training step."""
    from moeut_dist.train.config import check_run
    from moeut_dist.train.dry_run import describe_run
    from moeut_dist.train.loop import world_size_from_environment

    world_size = world_size or world_size_from_environment()
    plan = check_run(config, world_size)
    return (
        describe_run(config, plan, world_size) + "\ndry run: the config, layout and data are valid"
    )


def config_reference() -> str:
    """Every config key with its default and its comment, section by section."""
    from moeut_dist.train.config import TrainConfig

    return "config keys (default; comment):\n" + "\n".join(_key_lines(TrainConfig, ""))


def _key_lines(cls: type, prefix: str) -> list[str]:
    from moeut_dist.train.config import ModelSection

    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        section = hints[f.name]
        optional_section = [a for a in typing.get_args(section) if dataclasses.is_dataclass(a)]
        if optional_section:  # `X | None`: a section that is off unless given
            lines.append(f"  {key}: null  # {comments.get(f.name, '')}; set its keys to use it")
            lines += _key_lines(optional_section[0], key + ".")
        elif section is ModelSection:
            lines.append(
                f"  {key}.profile: tiny  # a profile (moeut-44m … moeut-1b, tiny), plus any "
                "MoEUTConfig field to replace the profile's (d_model, n_experts, kernel, …)"
            )
        elif dataclasses.is_dataclass(section):
            lines += _key_lines(section, key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "(required)" if default == "" else "null" if default is None else default
            if isinstance(default, tuple):
                shown = list(default)
            if typing.get_origin(section) is typing.Literal:
                shown = f"{shown}  [{' | '.join(map(str, typing.get_args(section)))}]"
            comment = f"  # {comments[f.name]}" if f.name in comments else ""
            lines += textwrap.wrap(f"  {key}: {shown}{comment}", 100, subsequent_indent="      # ")
    return lines


def _field_comments(cls: type) -> dict[str, str]:
    """The comment of each field in a dataclass's source: at the end of its line, or the
    comment lines right above it."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above: list[str] = []
        for line in inspect.getsource(klass).splitlines():
            comment = re.fullmatch(r"    # (.*)", line)
            field_line = re.fullmatch(r"    (\w+): [^#]*?(?:  # (.*))?", line)
            if comment:
                above.append(comment.group(1))
            elif field_line:
                text = field_line.group(2) or " ".join(above)
                if text:
                    comments[field_line.group(1)] = text
                above = []
            else:
                above = []
    return comments


class _HelpWithConfigKeys(argparse.Action):
    """`--help` that lists the config keys; built only when asked for, since it imports the
    training modules (which `moeut --help` and other commands should not wait for)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.epilog = config_reference()
        parser.print_help()
        parser.exit()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` and `export` to the `moeut` command."""
    parser = subparsers.add_parser(
        "train",
        help="train a MoEUT (torchrun / deepspeed / plain process)",
        description=TRAIN_DESCRIPTION,
        add_help=False,
    )
    parser.add_argument(
        "-h", "--help", action=_HelpWithConfigKeys, nargs=0,
        help="show this help, with every config key and its default, and exit",
    )  # fmt: skip
    parser.add_argument("--config", help="YAML run config (launch/configs/ has examples)")
    parser.add_argument(
        "--resume",
        help="'auto' (as checkpoint.resume; its default): continue from the latest complete "
        "checkpoint if there is one, stopping if a file of it is corrupt; 'latest-intact': the "
        "same, falling back to the newest intact checkpoint; 'never'; or a checkpoint directory",
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--print-config",
        action="store_true",
        help="print the fully resolved config as YAML (loadable with --config) and exit",
    )
    modes.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, layout and data, print the layout, the model and the per-rank "
        "memory estimate, and exit without training",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        help="for --dry-run: the number of processes to plan for (default: the launcher's, or 1)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. optim.lr=1e-3 parallel.expert=2",
    )
    parser.set_defaults(handler=_run)

    exporter = subparsers.add_parser(
        "export", help="consolidate a training checkpoint into one model directory"
    )
    exporter.add_argument("checkpoint", help="run directory, its checkpoints/, or one checkpoint")
    exporter.add_argument("out_dir", help="model directory to write")
    exporter.add_argument(
        "--official", action="store_true",
        help="also write the authors' checkpoint format (official_model.pt)",
    )  # fmt: skip
    exporter.set_defaults(handler=_export)


@reports_bad_input("export")
def _export(args: argparse.Namespace) -> int:
    from moeut_dist.train.consolidate import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, args.official)
    print(f"wrote {out}: model.safetensors, config.json, tokenizer.model")
    return 0
