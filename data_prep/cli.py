"""`moeut prep tokenizer` and `moeut prep shards`: thin layers over `data_prep`'s functions."""

from __future__ import annotations

import argparse
import re
from typing import get_args

from data_prep.readers import TextUnit
from moeut_dist.cli_errors import reports_bad_input

_SIZE = re.compile(r"(\d+)\s*([KMG]i?B?)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from a size like "512MB", "1GiB" or "1000000" (K/M/G are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1GB)")
    number, unit = match.groups()
    return int(number) * 1024 ** ("KMG".index(unit[0].upper()) + 1 if unit else 0)


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="files, folders or glob patterns")
    parser.add_argument("--text-field", default="text", help="JSONL/Parquet text field")
    parser.add_argument(
        "--text-unit",
        choices=get_args(TextUnit),
        default="file",
        help="what a document is in a plain text file",
    )
    parser.add_argument(
        "--max-bad-records",
        type=int,
        default=1000,
        help="malformed records tolerated before stopping (-1: no limit)",
    )


def _bad_record_budget(args: argparse.Namespace) -> int | None:
    return None if args.max_bad_records < 0 else args.max_bad_records


@reports_bad_input("prep tokenizer")
def _run_tokenizer(args: argparse.Namespace) -> int:
    from data_prep.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(
        args.inputs,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        split_digits=args.split_digits,
        byte_fallback=args.byte_fallback,
        max_sentences=args.max_sentences,
        text_field=args.text_field,
        text_unit=args.text_unit,
        max_bad_records=_bad_record_budget(args),
        seed=args.seed,
    )
    print(
        f"{tokenizer.path}: {tokenizer.vocab_size} pieces, end of document id "
        f"{tokenizer.eod_id}, sha256 {tokenizer.sha256}"
    )
    return 0


@reports_bad_input("prep shards")
def _run_shards(args: argparse.Namespace) -> int:
    from data_prep.shards import build_shards

    manifest = build_shards(
        args.inputs,
        args.out,
        args.tokenizer,
        args.seq_len,
        shard_bytes=args.shard_size,
        val_fraction=args.val_fraction,
        workers=args.workers,
        text_field=args.text_field,
        text_unit=args.text_unit,
        max_bad_records=_bad_record_budget(args),
        progress=not args.no_progress,
        progress_every_seconds=args.progress_every_seconds,
    )
    for name, split in manifest.splits.items():
        print(f"{name}: {len(split.shards)} shards, {split.samples} samples, {split.tokens} tokens")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `prep tokenizer` and `prep shards` to the `moeut` command."""
    prep = subparsers.add_parser("prep", help="prepare a corpus: tokenizer, token shards")
    steps = prep.add_subparsers(
        dest="prep_step", required=True, metavar="STEP", help="what to prepare"
    )

    tokenizer = steps.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    _add_input_arguments(tokenizer)
    tokenizer.add_argument("--out", required=True, help="model file to write")
    tokenizer.add_argument("--vocab-size", type=int, default=8000, help="pieces in the vocabulary")
    tokenizer.add_argument(
        "--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece algorithm"
    )
    tokenizer.add_argument(
        "--no-split-digits",
        dest="split_digits",
        action="store_false",
        help="let pieces span several digits",
    )
    tokenizer.add_argument("--byte-fallback", action="store_true", help="bytes for unknown text")
    tokenizer.add_argument(
        "--max-sentences", type=int, default=2_000_000, help="lines sampled for training"
    )
    tokenizer.add_argument("--seed", type=int, default=0, help="for sampling the training lines")
    tokenizer.set_defaults(handler=_run_tokenizer)

    shards = steps.add_parser("shards", help="tokenise into webdataset shards")
    _add_input_arguments(shards)
    shards.add_argument("--tokenizer", required=True, help="SentencePiece model file")
    shards.add_argument("--out", required=True, help="shard directory")
    shards.add_argument(
        "--seq-len", type=int, required=True, help="tokens per sample (each stores seq_len + 1)"
    )
    shards.add_argument("--shard-size", type=parse_size, default="256MB", help="target shard size")
    shards.add_argument(
        "--val-fraction", type=float, default=0.005, help="documents held out for validation"
    )
    shards.add_argument("--workers", type=int, default=1, help="tokeniser processes")
    shards.add_argument(
        "--no-progress", action="store_true", help="no progress bar or progress lines"
    )
    shards.add_argument(
        "--progress-every-seconds",
        type=float,
        default=60.0,
        help="without a terminal: seconds between progress lines",
    )
    shards.set_defaults(handler=_run_shards)
