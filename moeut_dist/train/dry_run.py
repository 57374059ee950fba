"""`moeut train --dry-run`: what a run would be, from its config alone, without training.

The config, the layout and the data are checked as a real start checks them (`check_run`); the
model is built on the meta device (no memory, no initialisation) to count its parameters. The
memory estimate covers what lives for the whole run on one rank (weights, gradients, AdamW
state) and leaves out activations, which depend on the batch, the sequence length and
`checkpoint_activations`.
"""

from __future__ import annotations

import torch

from moeut_dist import arch
from moeut_dist.train.config import RunPlan, TrainConfig


def _size(n_bytes: float) -> str:
    if n_bytes < 2**30:
        return f"{n_bytes / 2**20:.2f} MiB"
    return f"{n_bytes / 2**30:.2f} GiB"


def describe_run(config: TrainConfig, plan: RunPlan, world_size: int) -> str:
    """The layout, the model summary and the per-rank memory estimate, as printable text."""
    parallel = config.parallel
    spec = arch.of(plan.model)
    with torch.device("meta"):
        model = spec.model_class(plan.model)
    # Split as the layout splits them: over the tensor- or the expert-parallel group, or not.
    counts = {"expert": 0, "tensor": 0, "replicated": 0}
    for name, parameter in model.state_dict().items():
        rule = spec.shard_rule(name, plan.model)
        counts[rule.axis if rule else "replicated"] += parameter.numel()
    expert_data_parallel = world_size // parallel.expert
    per_rank_dense = counts["tensor"] / parallel.tensor + counts["replicated"]
    per_rank_expert = counts["expert"] / parallel.expert
    weight_bytes = 2 if config.bf16 else 4
    # AdamW's two moments in fp32, plus the fp32 master copy in bf16 runs; ZeRO partitions
    # them (and at stage 2 the gradients) over each parameter's data-parallel group.
    state_bytes = 12 if config.bf16 else 8
    optimizer = state_bytes * (
        per_rank_dense / plan.data_parallel + per_rank_expert / expert_data_parallel
    )
    gradients = weight_bytes * (per_rank_dense + per_rank_expert)
    if parallel.zero_stage == 2:
        gradients = weight_bytes * (
            per_rank_dense / plan.data_parallel + per_rank_expert / expert_data_parallel
        )
    weights = weight_bytes * (per_rank_dense + per_rank_expert)
    summary = spec.summary(plan.model, config.data.seq_len)
    data = config.data
    lines = [
        f"layout: {world_size} processes = tensor {parallel.tensor} × data {plan.data_parallel}; "
        f"expert {parallel.expert} (expert data parallel {expert_data_parallel}); "
        f"ZeRO stage {parallel.zero_stage}; {'bf16' if config.bf16 else 'fp32'}",
        f"batch: {data.global_batch_size} sequences × {data.seq_len} tokens per step = "
        f"{data.micro_batch_size} per micro-batch × {plan.grad_accumulation} accumulation × "
        f"{plan.data_parallel} data-parallel ranks; {config.schedule.steps} steps",
        f"model: profile {config.model.profile}, {summary.describe()}; "
        f"{counts['expert'] / 1e6:.2f}M parameters in experts",
        f"memory per rank (activations not included): weights {_size(weights)}, gradients "
        f"{_size(gradients)}, optimizer state {_size(optimizer)}; total "
        f"{_size(weights + gradients + optimizer)}",
    ]
    return "\n".join(lines)
