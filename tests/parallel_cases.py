"""Shared pieces of the parallel tests: the test model, its batch and the one-process reference."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moeut_dist import arch
from moeut_dist.arch import ModelConfig
from moeut_dist.config import MoEUTConfig
from moeut_dist.model import lm_loss

SEED = 1234
BATCH, SEQ = 4, 16  # global batch; divisible by data-parallel sizes 1, 2 and 4


def model_config(**overrides) -> MoEUTConfig:
    """Tiny MoEUT with 10 experts, so that 4 expert-parallel ranks hold 3, 3, 2, 2 of them."""
    return MoEUTConfig.from_profile("tiny", n_experts=10, kernel="torch", **overrides)


def batch(config: ModelConfig, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED + step)
    return torch.randint(config.vocab_size, (BATCH, SEQ + 1), generator=generator)


def data_parallel_share(tokens: torch.Tensor) -> torch.Tensor:
    """This data-parallel rank's sequences of the global batch."""
    group = parallel_state.get_data_parallel_group()
    return tokens.chunk(dist.get_world_size(group))[dist.get_rank(group)]


def reference_model(config: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return arch.of(config).model_class(config)


def reference_loss(
    model: torch.nn.Module, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    output = model(tokens[:, :-1])
    return lm_loss(output.logits, tokens[:, 1:]), output.reg_loss


def assert_close_dicts(actual: dict, expected: dict, rtol: float, atol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: keys differ"
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}"
        )
