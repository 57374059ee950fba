"""`moeut demo`: the embedded default job.

Trains the tiny MoEUT in one process on a generated, patterned token stream and prints the loss
falling against the stream's unigram entropy (what a model that ignores context can reach).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from moeut_dist.config import MoEUTConfig
from moeut_dist.model import MoEUTLM, lm_loss


def patterned_tokens(
    n_sequences: int,
    length: int,
    successor: torch.Tensor,
    generator: torch.Generator,
    noise: float = 0.1,
) -> torch.Tensor:
    """[n_sequences, length] tokens where each token is `successor[previous token]`, except
    that with probability `noise` a uniformly random token is drawn instead."""
    vocab_size = successor.numel()
    tokens = torch.empty(n_sequences, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab_size, (n_sequences,), generator=generator)
    for t in range(1, length):
        random = torch.randint(vocab_size, (n_sequences,), generator=generator)
        keep = torch.rand(n_sequences, generator=generator) >= noise
        tokens[:, t] = torch.where(keep, successor[tokens[:, t - 1]], random)
    return tokens


def train_on_patterns(
    config: MoEUTConfig,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
    log_every: int = 0,
) -> list[float]:
    """Train `MoEUTLM(config)` on fresh patterned batches; returns the LM loss of every step."""
    torch.manual_seed(seed)
    data_generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(config.vocab_size, generator=data_generator)
    model = MoEUTLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for step in range(1, steps + 1):
        batch = patterned_tokens(batch_size, seq_len + 1, successor, data_generator)
        out = model(batch[:, :-1])
        loss = lm_loss(out.logits, batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        (loss + out.reg_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == 1):
            print(f"step {step:4d}  loss {loss.item():.3f}  reg {out.reg_loss.item():+.4f}")
    return losses


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train the tiny MoEUT on a generated pattern")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_demo_command)


def _demo_command(args: argparse.Namespace) -> int:
    config = MoEUTConfig.from_profile("tiny")
    print(
        f"tiny MoEUT, vocab {config.vocab_size}; unigram entropy {math.log(config.vocab_size):.3f}"
    )
    started = time.perf_counter()
    losses = train_on_patterns(
        config, args.steps, batch_size=16, seq_len=64, lr=3e-3, seed=args.seed, log_every=25
    )
    print(
        f"loss {losses[0]:.3f} → {sum(losses[-10:]) / 10:.3f} in {args.steps} steps "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return 0
