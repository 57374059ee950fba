"""Communication benchmark of the expert-parallel dispatcher (writes numbers to stdout).

1. Bytes per token sent by one dispatch: ours (one copy per token and destination rank) vs a
   per-expert dispatcher (one copy per token and expert), from the routings of a randomly
   initialised MoEUT (every layer application, real tokens-through-the-model selections).
2. Step time (forward, backward, ZeRO-1 AdamW step) of a small MoEUT on 4 CPU processes at
   EP = 1, 2, 4 (data parallel 4 throughout).
3. With `--crossover`, instead of 2: 2 processes, EP = 2 against pure data parallel (EP = 1),
   over the number of experts E (the same k and expert size, so the same expert FLOPs per token
   while the expert parameters, their gradient reduction and optimizer step grow with E).

Usage: python -m bench.comm [--skip-step-time | --crossover]
"""

from __future__ import annotations

import argparse
import time

import torch

from moeut_dist.config import MoEUTConfig
from moeut_dist.model import MoEUTLM
from moeut_dist.parallel.expert_parallel import ExpertPartition, token_destinations

D_MODEL_REPORTED = 1024  # the 244M/318M/582M models' width
BF16_BYTES = 2


def routings(k: int, n_experts: int = 387, tokens: int = 2048) -> list[torch.Tensor]:
    """Expert ids [N, k] of every σ-MoE application of a random-init model on random text."""
    config = MoEUTConfig(
        vocab_size=8000,
        d_model=256,
        n_layers=4,
        group_size=2,
        n_heads=4,
        head_dim=64,
        n_experts=n_experts,
        experts_per_token=k,
        att_n_experts=4,
        kernel="torch",
    )
    torch.manual_seed(0)
    model = MoEUTLM(config).eval()
    captured = []

    def keep(module, inputs, output):
        captured.append(output[1].flatten(0, 1).topk(k, dim=-1).indices)

    for layer in model.transformer.layers:
        layer.ffn.register_forward_hook(keep)
    with torch.no_grad():
        model(torch.randint(config.vocab_size, (tokens // 256, 256)))
    return captured


def bytes_per_token(k: int, ep: int, experts: list[torch.Tensor]) -> tuple[float, float]:
    """Mean activation bytes per token (ours, per-expert) at d = 1024 in bf16."""
    partition = ExpertPartition(387, ep)
    owners = partition.owners()
    copies = sum(int(token_destinations(e, owners, ep).sum()) for e in experts)
    n_tokens = sum(e.shape[0] for e in experts)
    row = D_MODEL_REPORTED * BF16_BYTES
    return copies / n_tokens * row, k * row


STEP_TIME_SHAPES = dict(d_model=128, experts_per_token=8, expert_size=64, kernel="torch")
CROSSOVER_EXPERTS = (16, 32, 64, 256, 1024)


def _timed_steps(ep: int, steps: int, n_experts: int) -> float:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from moeut_dist.parallel.build import build_model, parallel_lm_loss
    from moeut_dist.parallel.engine import create_engine
    from moeut_dist.parallel.layout import ParallelConfig, initialize
    from moeut_dist.train.config import OptimSection

    config = MoEUTConfig.from_profile("tiny", n_experts=n_experts, **STEP_TIME_SHAPES)
    layout = ParallelConfig(expert=ep, zero_stage=1)
    initialize(layout, config)
    model = build_model(config, layout)
    engine = create_engine(model, layout, OptimSection(), micro_batch_size=4)
    dp = parallel_state.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(dp)
    durations = []
    for step in range(steps + 1):  # the first step warms up
        tokens = torch.randint(config.vocab_size, (4, 129), generator=generator)
        dist.barrier()
        start = time.perf_counter()
        engine.backward(parallel_lm_loss(engine, tokens).total)
        engine.step()
        dist.barrier()
        if step:
            durations.append(time.perf_counter() - start)
    return sum(durations) / len(durations)


def _step_times(steps: int, eps: tuple[int, ...], expert_counts: tuple[int, ...]):
    """Mean step seconds of every (E, EP)."""
    return {(e, ep): _timed_steps(ep, steps, e) for e in expert_counts for ep in eps}


def expert_parameter_share(n_experts: int) -> float:
    model = MoEUTLM(MoEUTConfig.from_profile("tiny", n_experts=n_experts, **STEP_TIME_SHAPES))
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    experts = sum(n for name, n in sizes.items() if name.endswith(("ffn.keys", "ffn.values")))
    return experts / sum(sizes.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-step-time", action="store_true")
    parser.add_argument(
        "--crossover", action="store_true", help="EP = 2 vs data parallel on 2 processes, over E"
    )
    args = parser.parse_args()

    print("| k | EP | ours B/token | per-expert B/token | ratio | bound min(k,EP)·d·2 |")
    print("|---|---|---|---|---|---|")
    for k in (12, 16, 24):
        experts = routings(k)
        for ep in (2, 4, 8, 16):
            ours, per_expert = bytes_per_token(k, ep, experts)
            bound = min(k, ep) * D_MODEL_REPORTED * BF16_BYTES
            print(
                f"| {k} | {ep} | {ours:.0f} | {per_expert:.0f} | {per_expert / ours:.2f}× "
                f"| {bound} |"
            )

    from tests.distributed_utils import run_distributed

    if args.crossover:
        times = run_distributed(_step_times, 2, 10, (1, 2), CROSSOVER_EXPERTS)
        print("\n| E | expert share of parameters | DP 2 step (s) | EP 2 step (s) | EP ÷ DP |")
        print("|---|---|---|---|---|")
        for e in CROSSOVER_EXPERTS:
            dp, ep = times[e, 1], times[e, 2]
            share = expert_parameter_share(e)
            print(f"| {e} | {share:.0%} | {dp:.3f} | {ep:.3f} | {ep / dp:.2f}× |")
    elif not args.skip_step_time:
        times = run_distributed(_step_times, 4, 5, (1, 2, 4), (64,))
        print("\n| EP | step time (s) | vs EP=1 |\n|---|---|---|")
        for (_, ep), seconds in times.items():
            print(f"| {ep} | {seconds:.3f} | {seconds / times[64, 1]:.2f}× |")


if __name__ == "__main__":
    main()
