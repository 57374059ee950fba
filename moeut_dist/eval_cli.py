"""`moeut generate` and `moeut eval`: sampling from and evaluating a model directory."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from moeut_dist.cli_errors import reports_bad_input

if TYPE_CHECKING:
    import torch

    from moeut_dist.data import Tokenizer
    from moeut_dist.generate import SamplingConfig
    from moeut_dist.zeroshot import Item


def stream_text(
    tokenizer: Tokenizer, prompt_ids: Sequence[int], tokens: Iterable[int]
) -> Iterator[str]:
    """The text that each of `tokens` adds after the prompt, as they arrive, up to the end of
    the document.

    SentencePiece decodes a word's leading space only inside a text, so the tokens are decoded
    after the prompt's; text ending in an incomplete character (a byte piece of a longer UTF-8
    sequence, decoded as U+FFFD) is held back until the character completes.
    """
    ids = list(prompt_ids)
    emitted = tokenizer.decode(ids)
    for token in tokens:
        if token == tokenizer.eod_id:
            return
        ids.append(token)
        text = tokenizer.decode(ids)
        if len(text) > len(emitted) and text.startswith(emitted) and not text.endswith("\ufffd"):
            yield text[len(emitted) :]
            emitted = text


def device_or_default(requested: str | None) -> torch.device:
    """The device to run on: `requested`, checked to exist here, or CUDA when there is one."""
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"unknown device {requested!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {requested!r} is not available: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return device


@reports_bad_input("generate")
def _generate_command(args: argparse.Namespace) -> int:
    from moeut_dist.evaluate import load_model_and_tokenizer
    from moeut_dist.generate import SamplingConfig

    sampling = SamplingConfig(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    model, tokenizer = load_model_and_tokenizer(args.model_dir, device_or_default(args.device))
    write_generation(model, tokenizer, args.prompt, sampling, sys.stdout)
    return 0


def write_generation(
    model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig,
    out: TextIO,
) -> None:  # fmt: skip
    """Write `prompt` and then its continuation to `out`, piece by piece as tokens arrive."""
    import torch

    from moeut_dist.generate import generate

    # The end-of-document id opens a document in the training stream, so it starts the prompt.
    prompt_ids = [tokenizer.eod_id, *tokenizer.encode(prompt)]
    device = next(model.parameters()).device
    tokens = generate(
        model,
        torch.tensor([prompt_ids], device=device),
        sampling,
        stop_token=tokenizer.eod_id,
        vocab_size=tokenizer.vocab_size,
    )
    out.write(prompt)
    out.flush()
    for piece in stream_text(tokenizer, prompt_ids, (step.item() for step in tokens)):
        out.write(piece)
        out.flush()
    out.write("\n")


def _task_file(text: str) -> tuple[str, str]:
    from moeut_dist.zeroshot.tasks import TASKS

    name, separator, path = text.partition("=")
    if not separator or not path:
        raise argparse.ArgumentTypeError(f"expected TASK=PATH, got {text!r}")
    if name not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return name, path


@reports_bad_input("eval")
def _eval_command(args: argparse.Namespace) -> int:
    from moeut_dist.evaluate import evaluate_shards, load_model_and_tokenizer
    from moeut_dist.zeroshot import (
        TASKS,
        builtin_sample,
        evaluate_task,
        get_task,
        model_logits,
        read_task_file,
    )

    task_files = list(args.task)
    if args.builtin_tasks:
        task_files += [(name, str(builtin_sample(name))) for name in TASKS]
    if args.shards is None and not task_files:
        raise ValueError("nothing to evaluate: give --shards, --task or --builtin-tasks")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = device_or_default(args.device)
    # Read every task file before the model runs, so a malformed line fails fast.
    tasks = [(get_task(name), read_task_file(name, path), path) for name, path in task_files]
    model, tokenizer = load_model_and_tokenizer(args.model_dir, device)
    for task, items, _ in tasks:
        _refuse_candidates_without_tokens(task.name, items, tokenizer)
    report: dict[str, Any] = {"tasks": []}
    if args.shards is not None:
        result = evaluate_shards(
            model, tokenizer, args.shards, split=args.split, batch_size=args.batch_size
        )
        report["language_modeling"] = {
            "split": args.split,
            "tokens": result.tokens,
            "bytes": result.bytes,
            "perplexity": result.perplexity,
            "bits_per_byte": result.bits_per_byte,
        }
        print(
            f"{args.split}: perplexity {result.perplexity:.3f}, bits per byte "
            f"{result.bits_per_byte:.4f} ({result.tokens} tokens, {result.bytes} bytes)"
        )
    for task, items, path in tasks:
        result = evaluate_task(task, items, model_logits(model), tokenizer, args.batch_size)
        report["tasks"].append(
            {"task": task.name, "file": path, "items": result.items, **result.metrics}
        )
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items())
        print(f"{task.name}: {metrics} ({result.items} items, {path})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _refuse_candidates_without_tokens(
    task_name: str, items: Sequence[Item], tokenizer: Tokenizer
) -> None:
    """Refuse, naming file:line, a candidate that the tokenizer encodes to no tokens (such as
    one made of zero-width characters): it has no likelihood to score."""
    from moeut_dist.zeroshot import TaskFormatError

    for item in items:
        for candidate in item.candidates:
            if not tokenizer.encode(candidate):
                raise TaskFormatError(
                    f"{item.source}: {task_name}: the candidate {candidate!r} encodes to no tokens"
                )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `generate` and `eval` to the `moeut` command."""
    generate = subparsers.add_parser(
        "generate", help="sample a continuation of a prompt, streaming it as it is produced"
    )
    generate.add_argument("model_dir", help="a model directory (moeut_dist.export)")
    generate.add_argument("--prompt", default="", help="text to continue")
    generate.add_argument("--max-tokens", type=int, default=128, help="tokens to generate")
    generate.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1: no filter")
    generate.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    generate.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    generate.set_defaults(handler=_generate_command)

    evaluate = subparsers.add_parser(
        "eval", help="perplexity and bits per byte on shards; zero-shot task accuracy"
    )
    evaluate.add_argument("model_dir", help="a model directory (moeut_dist.export)")
    evaluate.add_argument("--shards", help="shard directory built with the model's tokenizer")
    evaluate.add_argument("--split", default="val", help="split of the shards to evaluate")
    evaluate.add_argument(
        "--task",
        type=_task_file,
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="a JSONL task file; TASK is lambada, blimp, piqa, hellaswag, arc_easy or cbt "
        "(repeatable)",
    )
    evaluate.add_argument(
        "--builtin-tasks", action="store_true", help="also score the built-in task samples"
    )
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    evaluate.add_argument("--json", help="also write the results to this JSON file")
    evaluate.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    evaluate.set_defaults(handler=_eval_command)
