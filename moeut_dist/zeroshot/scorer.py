"""Zero-shot scoring: the log-likelihood a language model gives each candidate continuation.

Conventions (those of common practice, e.g. the LM evaluation harness):

- Every sequence starts with the end-of-document id, which is what precedes a document in the
  training stream; so a candidate with an empty context (BLiMP) is scored from its first token.
- A candidate's score is the sum of its tokens' log-probabilities given the context.
- "choice" tasks report `acc` (the highest score is the gold candidate) and `acc_norm` (the same
  with each score divided by the candidate's length in characters, which removes the bias
  towards short candidates).
- "cloze" tasks (LAMBADA) report `acc` (every target token is the model's greedy choice) and
  `ppl`, the perplexity of the target tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from moeut_dist.model import perplexity
from moeut_dist.zeroshot.tasks import Item, Task

# tokens [B, T] -> next-token logits [B, T, V]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


class TextEncoder(Protocol):
    @property
    def eod_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # summed over the continuation's tokens, in nats
    tokens: int
    greedy: bool  # every continuation token is the model's most likely next token


@dataclass(frozen=True)
class TaskResult:
    task: str
    items: int
    metrics: dict[str, float]


def model_logits(model: nn.Module) -> LogitsFn:
    """A `LogitsFn` running `model` (in eval mode, as `load_pretrained` returns it) on the
    device its parameters are on."""
    device = next(model.parameters()).device
    return lambda tokens: model(tokens.to(device)).logits


def score_continuations(
    logits_fn: LogitsFn,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
) -> list[ContinuationScore]:
    """Scores of (context ids, continuation ids) pairs, in the order given; contexts and
    continuations must be non-empty.

    Sequences are batched longest first and right-padded: under causal attention nothing after
    a sequence's last token changes its logits, so padding needs no mask.
    """
    for context, continuation in requests:
        if not context or not continuation:
            raise ValueError("contexts and continuations must each hold at least one token")
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    scores: list[ContinuationScore | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        sequences = [[*requests[i][0], *requests[i][1]] for i in batch]
        inputs = torch.zeros(len(batch), max(map(len, sequences)) - 1, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            inputs[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
        with torch.inference_mode():
            logprobs = logits_fn(inputs).float().log_softmax(-1)
        for row, i in enumerate(batch):
            context, continuation = requests[i]
            first = len(context) - 1  # the position whose output predicts the first target
            predicted = logprobs[row, first : first + len(continuation)]
            targets = torch.tensor(continuation, device=predicted.device)
            scores[i] = ContinuationScore(
                logprob=predicted.gather(-1, targets[:, None]).sum().item(),
                tokens=len(continuation),
                greedy=bool((predicted.argmax(-1) == targets).all()),
            )
    return scores


def evaluate_task(
    task: Task,
    items: Sequence[Item],
    logits_fn: LogitsFn,
    tokenizer: TextEncoder,
    batch_size: int = 16,
) -> TaskResult:
    """Score every candidate of every item and report the task's metrics."""
    requests = [
        ([tokenizer.eod_id, *tokenizer.encode(item.context)], tokenizer.encode(candidate))
        for item in items
        for candidate in item.candidates
    ]
    scores = iter(score_continuations(logits_fn, requests, batch_size))
    per_item = [[next(scores) for _ in item.candidates] for item in items]
    if task.scoring == "cloze":
        target_scores = [
            item_scores[item.gold] for item, item_scores in zip(items, per_item, strict=True)
        ]
        metrics = {
            "acc": _mean(score.greedy for score in target_scores),
            "ppl": perplexity(
                -sum(score.logprob for score in target_scores)
                / sum(score.tokens for score in target_scores)
            ),
        }
    else:
        metrics = {
            "acc": _mean(
                _argmax([score.logprob for score in item_scores]) == item.gold
                for item, item_scores in zip(items, per_item, strict=True)
            ),
            "acc_norm": _mean(
                _argmax(
                    [s.logprob / len(c) for s, c in zip(item_scores, item.candidates, strict=True)]
                )
                == item.gold
                for item, item_scores in zip(items, per_item, strict=True)
            ),
        }
    return TaskResult(task.name, len(items), metrics)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _mean(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)
