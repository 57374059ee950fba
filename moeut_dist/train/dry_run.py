"""`moeut train --dry-run`: what a run would be, from its config alone, without training.

The config, the layout and the data are checked as a real start checks them (`check_run`); the
model is built on the meta device (no memory, no initialisation) to count its parameters. The
memory estimate covers what lives for the whole run on one rank (weights, gradients, AdamW
state) and leaves out activations, which depend on the batch, the sequence length and
`checkpoint_activations`.
"""

from __future__ import annotations

import re

import torch

from moeut_dist.model import MoEUTLM
from moeut_dist.train.config import RunPlan, TrainConfig
from moeut_dist.train.metrics import forward_flops_per_token

# Parameters partitioned over the expert-parallel group, and over the tensor-parallel group
# (SwitchHead's per-head tensors, the vocabulary); the rest (norms, selectors) is replicated.
_EXPERT = re.compile(r"\.ffn\.(keys|values)$")
_TENSOR = re.compile(
    r"(\.attention\.(v|o|sel_v|sel_o|q\.weight|k\.weight)|embedding\.weight|lm_head\.\w+)$"
)


def _size(n_bytes: float) -> str:
    if n_bytes < 2**30:
        return f"{n_bytes / 2**20:.2f} MiB"
    return f"{n_bytes / 2**30:.2f} GiB"


def describe_run(config: TrainConfig, plan: RunPlan, world_size: int) -> str:
    """The layout, the model summary and the per-rank memory estimate, as printable text."""
    parallel = config.parallel
    with torch.device("meta"):
        model = MoEUTLM(plan.model)
    counts = {"expert": 0, "tensor": 0, "replicated": 0}
    for name, parameter in model.named_parameters():
        kind = (
            "expert" if _EXPERT.search(name) else "tensor" if _TENSOR.search(name) else "replicated"
        )
        counts[kind] += parameter.numel()
    total = sum(counts.values())
    dense = counts["tensor"] + counts["replicated"]
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
    forward = forward_flops_per_token(plan.model, config.data.seq_len)
    data, model_config = config.data, plan.model
    lines = [
        f"layout: {world_size} processes = tensor {parallel.tensor} × data {plan.data_parallel}; "
        f"expert {parallel.expert} (expert data parallel {expert_data_parallel}); "
        f"ZeRO stage {parallel.zero_stage}; {'bf16' if config.bf16 else 'fp32'}",
        f"batch: {data.global_batch_size} sequences × {data.seq_len} tokens per step = "
        f"{data.micro_batch_size} per micro-batch × {plan.grad_accumulation} accumulation × "
        f"{plan.data_parallel} data-parallel ranks; {config.schedule.steps} steps",
        f"model: profile {config.model.profile}, {total / 1e6:.2f}M parameters "
        f"({counts['expert'] / 1e6:.2f}M in σ-MoE experts, {dense / 1e6:.2f}M dense), "
        f"d_model {model_config.d_model}, {model_config.n_layers} layers in groups of "
        f"{model_config.group_size}, {model_config.n_experts} experts "
        f"(k={model_config.experts_per_token}), vocabulary {model_config.vocab_size}",
        f"compute: {forward / 1e6:.1f} MFLOPs per token forward, {3 * forward / 1e6:.1f} to train",
        f"memory per rank (activations not included): weights {_size(weights)}, gradients "
        f"{_size(gradients)}, optimizer state {_size(optimizer)}; total "
        f"{_size(weights + gradients + optimizer)}",
    ]
    return "\n".join(lines)
