"""Forward + backward throughput of whole models on the CPU, single process.

    python bench/model.py [--steps 3] [--threads N]

Times MoEUT profiles (`tiny`, `moeut-44m`) and the parameter-matched dense baseline of 44M with
the PyTorch kernel path, fp32, AdamW excluded (forward + backward only). The CPU is shared and
noisy, so compare rows as ratios within one run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from moeut_dist import DenseLM, MoEUTConfig, MoEUTLM, profiles
from moeut_dist.model import lm_loss

# (label, builder, batch, seq_len)
CASES = [
    ("tiny", lambda: MoEUTLM(MoEUTConfig.from_profile("tiny")), 16, 128),
    ("moeut-44m", lambda: MoEUTLM(MoEUTConfig.from_profile("moeut-44m")), 2, 256),
    ("dense-44m", lambda: DenseLM(profiles.get_dense("dense-44m")), 2, 256),
]


def time_forward_backward(model: torch.nn.Module, batch: int, seq_len: int, steps: int) -> float:
    """Median seconds of one forward + backward over fresh random tokens (one warm-up step)."""
    vocab = model.config.vocab_size
    times = []
    for step in range(steps + 1):
        tokens = torch.randint(vocab, (batch, seq_len + 1))
        started = time.perf_counter()
        out = model(tokens[:, :-1])
        (lm_loss(out.logits, tokens[:, 1:]) + out.reg_loss).backward()
        if step:  # the first step pays for allocation and thread start-up
            times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'model':<10} {'params':>8} {'tokens':>7} {'fwd+bwd s':>10} {'tokens/s':>9}")
    for label, build, batch, seq_len in CASES:
        model = build().train()
        params = sum(p.numel() for p in model.parameters())
        seconds = time_forward_backward(model, batch, seq_len, args.steps)
        tokens = batch * seq_len
        print(
            f"{label:<10} {params / 1e6:7.2f}M {tokens:7d} {seconds:10.3f} {tokens / seconds:9.0f}"
        )


if __name__ == "__main__":
    main()
