"""Perplexity and bits per byte of a model directory on a split of token shards.

Definitions, over every target token of the split (each stored sample of `seq_len + 1` tokens
gives `seq_len` targets, end-of-document ids included):

- perplexity = exp(total NLL / number of target tokens), the NLL in nats;
- bits per byte = total NLL / ln 2 / number of UTF-8 bytes the target tokens decode to.

The bytes are those of the text the tokenizer decodes, i.e. of the SentencePiece-normalised
corpus, not of the raw files (the two differ where normalisation changed the text, and an
unknown piece decodes to " ⁇ "). Counting them token by token needs two corrections, since
SentencePiece writes a word's leading space into its first piece and drops that space at the
start of a decoded text: a document's first piece stands for no space (the dummy prefix that
SentencePiece adds to every text), while a sample that starts inside a document has its first
targets' space restored by decoding them after the sample's first token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moeut_dist.data import Tokenizer, TokenLoader, read_manifest
from moeut_dist.export import TOKENIZER_FILE, ModelDirectoryError, load_pretrained
from moeut_dist.model import MoEUTLM, perplexity


@dataclass(frozen=True)
class LanguageModelingResult:
    nll: float  # summed over the targets, in nats
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes


def load_model_and_tokenizer(
    model_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[MoEUTLM, Tokenizer]:
    """The model of a model directory and the tokenizer saved with it, checked to fit.

    The model's vocabulary may be larger than the tokenizer's (padded, e.g. for tensor
    parallelism to divide it); the padding ids never occur in text, so they only take some
    probability mass, as they did in training.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} not found")
    if not (model_dir / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{model_dir} has no {TOKENIZER_FILE}: it was saved without one")
    model = load_pretrained(model_dir, device)  # checks every file against its checksum
    tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ModelDirectoryError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} pieces, more than the "
            f"model's vocabulary of {model.config.vocab_size}"
        )
    return model, tokenizer


def target_bytes(sample: Sequence[int], tokenizer: Tokenizer) -> int:
    """UTF-8 bytes of the text that `sample[1:]` decodes to, `sample[0]` being its left
    context (see the module docstring)."""
    total = 0
    run_start = 0
    for end in [*(i for i, token in enumerate(sample) if token == tokenizer.eod_id), len(sample)]:
        run = sample[run_start:end]
        if run:
            total += _utf8_length(tokenizer.decode(run))
            if run_start == 0:  # sample[0] is context, not a target
                total -= _utf8_length(tokenizer.decode(run[:1]))
        run_start = end + 1
    return total


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8"))


@torch.inference_mode()
def evaluate_batches(
    model: nn.Module, batches: Iterable[torch.Tensor], tokenizer: Tokenizer
) -> LanguageModelingResult:
    """Totals over batches `[B, seq_len + 1]` of stored samples."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens, n_bytes = 0.0, 0, 0
    try:
        for batch in batches:
            logits = model(batch[:, :-1].to(device)).logits
            targets = batch[:, 1:].to(device)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
            nll += loss.item()  # summed in float64: an fp32 total drifts over millions of tokens
            tokens += targets.numel()
            n_bytes += sum(target_bytes(sample, tokenizer) for sample in batch.tolist())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no batches to evaluate")
    return LanguageModelingResult(nll, tokens, n_bytes)


def evaluate_shards(
    model: nn.Module,
    tokenizer: Tokenizer,
    shard_dir: str | Path,
    *,
    split: str = "val",
    batch_size: int = 8,
) -> LanguageModelingResult:
    """One pass over a split of a shard directory built with `tokenizer`; refuses shards
    built with another tokenizer (`ManifestMismatchError`) and a missing or empty split."""
    manifest = read_manifest(shard_dir)
    if manifest.split(split).samples == 0:
        raise ValueError(f"split {split!r} of {shard_dir} holds no samples to evaluate")
    loader = TokenLoader(
        shard_dir,
        seq_len=manifest.seq_len,
        tokenizer=tokenizer,
        batch_size=batch_size,
        split=split,
        epochs=1,
    )
    return evaluate_batches(model, loader, tokenizer)
