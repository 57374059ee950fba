"""`model.compile`: every layer one graph (the expert custom ops inside it), equal to eager, and
routing changes never recompile; under tensor and expert parallelism, graphs between the
collectives."""

from __future__ import annotations

import pytest
import torch

from moeut_dist.config import MoEUTConfig
from moeut_dist.model import MoEUTLM, lm_loss
from moeut_dist.parallel.build import build_model, parallel_lm_loss
from moeut_dist.parallel.layout import ParallelConfig, initialize
from tests.distributed_utils import run_distributed
from tests.parallel_cases import SEED, batch, data_parallel_share, model_config


def _tiny(**overrides: object) -> MoEUTLM:
    torch.manual_seed(0)
    return MoEUTLM(MoEUTConfig.from_profile("tiny", kernel="torch", **overrides)).train()


def test_a_layer_is_one_graph_without_breaks() -> None:
    layer = _tiny().transformer.layers[0]
    layer.ffn.count_expert_usage()  # the trainer's expert-usage counting is traced too
    explained = torch._dynamo.explain(layer)(torch.randn(2, 8, 64), None, None)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def _loss_and_grads(model: MoEUTLM, tokens: torch.Tensor):
    output = model(tokens[:, :-1])
    loss = lm_loss(output.logits, tokens[:, 1:]) + output.reg_loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return output.logits, loss, grads


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def test_compiled_model_equals_eager_and_new_routings_do_not_recompile() -> None:
    eager, compiled = _tiny(), _tiny(compile=True)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    compiled.load_state_dict(eager.state_dict())
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 17), generator=generator) for _ in range(2)]
    for step, tokens in enumerate(batches):
        # Other tokens route to other experts: the second step must reuse the first's graphs.
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = _loss_and_grads(compiled, tokens)
        want = _loss_and_grads(eager, tokens)
        for actual, expected in zip(
            [got[0], got[1], *got[2]], [want[0], want[1], *want[2]], strict=True
        ):
            assert _relative_error(actual, expected) <= 1e-5


def _compiled_parallel_model_checks() -> None:
    """On this rank of a TP = 2 × EP = 2 layout: the compiled model's loss and gradients equal
    eager's, and a second batch (another routing, other split sizes) reuses the graphs."""
    layout = ParallelConfig(tensor=2, expert=2)
    results = []
    for compile_ in (False, True):
        config = model_config(compile=compile_)
        initialize(layout, config)
        model = build_model(config, layout, seed=SEED)
        for step in range(2):
            with torch._dynamo.config.patch(error_on_recompile=compile_ and step > 0):
                loss = parallel_lm_loss(model, data_parallel_share(batch(config, step))).total
                loss.backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    for actual, expected in zip(results[1], results[0], strict=True):
        assert _relative_error(actual, expected) <= 1e-5


@pytest.mark.slow
def test_compiled_model_under_tensor_and_expert_parallel_equals_eager() -> None:
    # The collectives run between compiled graphs; inside one, dynamo fails on megatron-core's
    # copy to the tensor-parallel region, and every routing would recompile the dispatch.
    run_distributed(_compiled_parallel_model_checks, 2)
