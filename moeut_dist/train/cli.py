"""`moeut train` and `moeut export`: runs and their checkpoints.

`moeut train --config FILE.yaml [key=value ...]` is one process of a (possibly multi-node) run:
start it once per process with `torchrun`, the `deepspeed` launcher (`--no_local_rank`), or as a
plain process for a one-process run; see `launch/`. `moeut export` turns a run's checkpoint into
one model directory, in a single process.
"""

from __future__ import annotations

import argparse
import sys

from moeut_dist.cli_errors import reports_bad_input


def _run(args: argparse.Namespace) -> int:
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` and `export` to the `moeut` command."""
    parser = subparsers.add_parser(
        "train",
        help="train a MoEUT (torchrun / deepspeed / plain process)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--config", help="YAML run config (launch/configs/ has examples)")
    parser.add_argument(
        "--resume",
        help="'auto' (default): continue from the latest complete checkpoint if there is one, "
        "stopping if a file of it is corrupt; 'latest-intact': the same, falling back to the "
        "newest intact checkpoint; 'never'; or a checkpoint directory",
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
    exporter.add_argument(
        "checkpoint",
        help="run directory, its checkpoints/, or one checkpoint; with --hf also a model directory",
    )
    exporter.add_argument("out_dir", help="model directory to write")
    exporter.add_argument(
        "--official", action="store_true",
        help="also write the authors' checkpoint format (official_model.pt)",
    )  # fmt: skip
    exporter.add_argument(
        "--hf", action="store_true",
        help="write a Hugging Face transformers directory (needs the [hf] extra)",
    )  # fmt: skip
    exporter.set_defaults(handler=_export)


@reports_bad_input("export")
def _export(args: argparse.Namespace) -> int:
    from moeut_dist.train.consolidate import export_checkpoint

    if args.hf:
        from moeut_dist.hf.export import export_hf, export_hf_via, is_model_dir

        if args.official:
            raise ValueError("--official writes our model directory, --hf a transformers one")
        if is_model_dir(args.checkpoint):
            out = export_hf(args.checkpoint, args.out_dir)
        else:
            out = export_hf_via(args.out_dir, lambda ours: export_checkpoint(args.checkpoint, ours))
        print(f"wrote {out}: a transformers directory (trust_remote_code=True)")
        return 0
    out = export_checkpoint(args.checkpoint, args.out_dir, args.official)
    print(f"wrote {out}: model.safetensors, config.json, tokenizer.model")
    return 0
