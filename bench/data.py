"""Data pipeline throughput: shard building against raw SentencePiece encoding, and the loader.

    python bench/data.py [--documents 6000] [--seq-len 1024]

Builds a synthetic corpus (`data_prep.synthetic`) and a paper-sized tokenizer (BPE, 8000 pieces)
in a temporary directory, then measures, on the same text:
  - raw encode: `Tokenizer.encode_documents` on one thread (the ceiling for one core),
  - shard building with 1 and 2 workers (reading JSONL, tokenising, writing shards),
  - the loader reading one epoch in one process (`num_workers=0`).
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from resource import RUSAGE_CHILDREN, RUSAGE_SELF

from data_prep.shards import build_shards
from data_prep.synthetic import synthetic_documents, write_jsonl
from data_prep.tokenizer import train_tokenizer
from moeut_dist.data import TokenLoader


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the build's worker pool)."""
    own, children = (resource.getrusage(who) for who in (RUSAGE_SELF, RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(function):
    """Result, wall seconds and CPU seconds of a call; on a shared machine only CPU seconds
    show what the code costs."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = function()
    return result, time.perf_counter() - wall, _cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=6000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        texts = synthetic_documents(args.documents)
        corpus = write_jsonl(work / "corpus.jsonl", texts)
        tokenizer = train_tokenizer([corpus], work / "tok.model", max_sentences=20_000)

        encoded, seconds, cpu = _timed(lambda: tokenizer.encode_documents(texts))
        raw_tokens = sum(map(len, encoded))
        raw_rate, raw_cpu_rate = raw_tokens / seconds, raw_tokens / cpu
        rows = [("raw SentencePiece encode, 1 thread", raw_rate, raw_cpu_rate, "1.00 (ceiling)")]

        for workers in (1, 2):
            manifest, seconds, cpu = _timed(
                lambda w=workers: build_shards(
                    [corpus],
                    work / f"shards-{w}",
                    tokenizer.path,
                    args.seq_len,
                    val_fraction=0.0,
                    workers=w,
                    progress=False,
                )
            )
            tokens = manifest.split("train").tokens
            ratio = f"{tokens / cpu / raw_cpu_rate:.2f}"
            rows.append(
                (f"shard build, {workers} worker(s)", tokens / seconds, tokens / cpu, ratio)
            )

        loader = TokenLoader(
            work / "shards-1",
            seq_len=args.seq_len,
            tokenizer=tokenizer,
            batch_size=args.batch_size,
            epochs=1,
        )
        tokens, seconds, cpu = _timed(lambda: sum(batch.numel() for batch in loader))
        rows.append(
            (
                f"loader, 1 process, batch {args.batch_size}",
                tokens / seconds,
                tokens / cpu,
                "goal ≥ 1M tokens/s",
            )
        )

    print(
        f"{args.documents} synthetic documents, {sum(map(len, texts)) / 1e6:.1f} MB of text, "
        f"{manifest.split('train').tokens / 1e6:.2f}M tokens, seq_len {args.seq_len}\n"
    )
    print("| measurement | tokens/s (wall) | tokens per CPU-second | per-core ratio to raw |")
    print("|---|---:|---:|---|")
    for name, rate, cpu_rate, note in rows:
        print(f"| {name} | {rate / 1e6:.2f}M | {cpu_rate / 1e6:.2f}M | {note} |")


if __name__ == "__main__":
    main()
