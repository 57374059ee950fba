"""DeepSpeed ZeRO (stage 1/2) for a parallelised MoEUT, and checkpoints that keep every expert.

Every use of DeepSpeed beyond its documented API is in this module, listed here with its reason;
`tests/test_parallel_zero.py` (`_check_deepspeed_contract` and the layout checks) fails if a
DeepSpeed release changes any of them:

1. `ExpertLayersMarker` subclasses `deepspeed.moe.layer.MoE` without being one: the engine
   gives ZeRO the expert groups and MoE parameter groups only when it finds an `MoE` module
   (`engine.has_moe_layers`), and our experts are our own layers.
2. `groups._create_expert_and_data_parallel` and `groups._get_expert_(data_)parallel_group`:
   DeepSpeed has no public way to create its expert groups but `MoE.__init__`; they are
   created by DeepSpeed (not written into its tables) and checked to hold the ranks of
   megatron-core's, which our dispatcher uses.
3. `zero.scaled_global_norm` is replaced, reading ZeRO's `params_in_partition`,
   `averaged_gradients` and `device`: DeepSpeed's own norm is not the global norm under
   TP × EP (it sums expert partitions over the dense data-parallel group, then averages them
   over the expert-data-parallel group), and clipping happens inside ZeRO's step.
4. `link_optimizer_state` calls ZeRO's `_lazy_init_hp_params_optimizer_state`: ZeRO maps
   parameters onto AdamW's state (what `safe_get/set_full_optimizer_state` read and write)
   after the first group's first update, leaving the expert groups unmapped, and not at all
   on an engine that has not stepped yet.
5. `engine.checkpoint_engine` is replaced by `SafeCheckpointEngine` (durable, unpickling
   nothing); DeepSpeed's config has no such choice for the torch engine.

* Expert parameters (`allreduce = False`, `group_name`, set by `build.parallelize`) go into
  DeepSpeed's MoE parameter groups (`split_params_into_different_moe_groups_for_optimizer`) and
  are reduced and partitioned over their expert-data-parallel group.
* A step whose gradient norm is not finite is skipped, in bf16 too (`bf16.check_grad_overflow`).
* Checkpoints: DeepSpeed writes the optimizer partitions and engine state; its model file
  would hold only one expert-parallel rank's experts (it recognises experts by DeepSpeed's
  own module names), so the weights are written here instead: one safetensors file per
  (TP rank, EP rank), written atomically, together holding every TP shard and every expert.
  Checkpoint files may come from elsewhere, so loading never unpickles code: weights are
  safetensors and DeepSpeed's own files are read with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import types
from typing import TYPE_CHECKING

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import groups, safe_set_full_fp32_param
from deepspeed.utils.tensor_fragment import fragment_address
from megatron.core import parallel_state
from safetensors.torch import load_file, save_file

from moeut_dist import arch
from moeut_dist.atomic_files import fsync_path, write_atomically
from moeut_dist.parallel.build import read_local_shards
from moeut_dist.parallel.layout import ParallelConfig, expert_group_name
from moeut_dist.parallel.shards import shard_file, shard_metadata

if TYPE_CHECKING:  # the run's config, read without importing DeepSpeed
    from moeut_dist.train.config import OptimSection


class MegatronMPU:
    """The `mpu` interface DeepSpeed queries, answered by megatron-core's parallel_state."""

    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(
        parallel_state.get_tensor_model_parallel_world_size
    )
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size
    )
    get_pipeline_model_parallel_group = staticmethod(
        parallel_state.get_pipeline_model_parallel_group
    )

    @staticmethod
    def get_data_parallel_group():
        return parallel_state.get_data_parallel_group()

    @staticmethod
    def get_data_parallel_rank() -> int:
        return parallel_state.get_data_parallel_rank()

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return parallel_state.get_data_parallel_world_size()


class ExpertLayersMarker(MoE):
    """Parameter-free module whose type tells DeepSpeed's engine that the model has experts
    (private use 1 of the module docstring).

    It holds no experts itself (`num_local_experts = 0`), so DeepSpeed's per-expert checkpoint
    files stay empty; `save_checkpoint` writes the experts.
    """

    def __init__(self, n_experts: int, group_name: str) -> None:
        torch.nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's own experts
        self.num_experts = n_experts
        self.num_local_experts = 0
        self.expert_group_name = group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed would create its expert groups here; `register_expert_groups` has already
        created them, checked against megatron-core's."""

    def forward(self, *args):
        raise RuntimeError("ExpertLayersMarker is a marker for DeepSpeed, not a layer")


def register_expert_groups(parallel: ParallelConfig) -> None:
    """Have DeepSpeed create its expert-parallel and expert-data-parallel groups for
    `parallel`, and check that they hold megatron-core's ranks."""
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing world
    groups._create_expert_and_data_parallel(parallel.expert)
    name = expert_group_name(parallel)
    for what, ours, theirs in (
        ("expert-parallel", parallel_state.get_expert_model_parallel_group(),
         groups._get_expert_parallel_group(name)),
        ("expert-data-parallel", parallel_state.get_expert_data_parallel_group(),
         groups._get_expert_data_parallel_group(name)),
    ):  # fmt: skip
        if dist.get_process_group_ranks(ours) != dist.get_process_group_ranks(theirs):
            raise RuntimeError(
                f"DeepSpeed's {what} group {dist.get_process_group_ranks(theirs)} is not "
                f"megatron-core's {dist.get_process_group_ranks(ours)}: this DeepSpeed release "
                "lays out expert groups differently"
            )


# Gradient elements ZeRO gathers before reducing them, at most: Megatron-Core's default bucket.
# DeepSpeed allocates its bucket anew for every backward, at 5e8 elements by default (2 GB in
# fp32, twice with `overlap_comm`), whatever the model's size.
REDUCE_BUCKET_ELEMENTS = 40_000_000


def deepspeed_config(
    parallel: ParallelConfig,
    settings: OptimSection,
    micro_batch_size: int,
    gradient_accumulation_steps: int = 1,
    data_parallel_size: int = 1,
    bf16: bool = False,
    gradient_elements: int = REDUCE_BUCKET_ELEMENTS,
) -> dict:
    """The DeepSpeed config of `create_engine`: a step is `gradient_accumulation_steps`
    micro-batches of `micro_batch_size` sequences on each of `data_parallel_size` ranks, of a
    model with `gradient_elements` parameters on each rank (sizing the reduce bucket)."""
    # ZeRO skips a step with a non-finite gradient norm in fp32 always, in bf16 only with
    # `check_grad_overflow`: set here, not left to a default DeepSpeed has changed (#5242, #6976).
    precision = {"enabled": True, "check_grad_overflow": True} if bf16 else {"enabled": False}
    return {
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * data_parallel_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": {
            "stage": parallel.zero_stage,
            "reduce_bucket_size": min(gradient_elements, REDUCE_BUCKET_ELEMENTS),
        },
        "zero_allow_untested_optimizer": True,
        "bf16": precision,
        "steps_per_print": 2**31 - 1,
    }


def _global_grad_norm(optimizer) -> torch.Tensor:
    """‖g‖ over every parameter of the model, each counted once across all ranks.

    ZeRO partitions are disjoint within their (expert-)data-parallel group. Dense shards of
    different TP ranks are distinct; dense parameters replicated over TP are counted on TP rank 0
    only. Experts are folded over TP, so every rank's expert partition is distinct.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    counted = []
    for group, params in enumerate(optimizer.params_in_partition):
        # ZeRO's alignment padding, if any, comes last in a partition, after the parameters'
        # gradients (flagged `_zero_padding` or not, depending on the partition).
        grads = optimizer.averaged_gradients[group][: len(params)]
        for grad, param in zip(grads, params, strict=True):
            if (
                tp_rank == 0
                or getattr(param, "tensor_model_parallel", False)
                or is_moe_param(param)
            ):
                counted.append(grad)
    # One fused norm per gradient, squared and summed in fp32 where the gradients live: no
    # copies, no host sync, and NCCL (which has no CPU backend) can all-reduce the sum.
    squares = torch.zeros((), dtype=torch.float32, device=optimizer.device)
    if counted:
        squares = torch.stack(torch._foreach_norm(counted)).float().square().sum()
    dist.all_reduce(squares)
    return squares.sqrt()


def create_engine(
    model: torch.nn.Module,
    parallel: ParallelConfig,
    settings: OptimSection,
    micro_batch_size: int,
    gradient_accumulation_steps: int = 1,
    bf16: bool | None = None,
) -> deepspeed.DeepSpeedEngine:
    """DeepSpeed engine with AdamW and ZeRO `parallel.zero_stage` for a model from
    `build.build_model`; in bf16 (None: on GPUs) with fp32 master weights. Call
    `engine.backward(loss)` and `engine.step()` after every micro-batch; the optimizer steps
    after every `gradient_accumulation_steps` of them, on the mean of their gradients."""
    register_expert_groups(parallel)
    n_experts = arch.of(model.config).n_experts(model.config)
    if n_experts:
        model.add_module(
            "deepspeed_expert_marker", ExpertLayersMarker(n_experts, expert_group_name(parallel))
        )
    param_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "dense"}
    )
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=settings.lr,
        betas=settings.betas,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(
            parallel,
            settings,
            micro_batch_size,
            gradient_accumulation_steps,
            data_parallel_size=parallel_state.get_data_parallel_world_size(),
            bf16=torch.cuda.is_available() if bf16 is None else bf16,
            gradient_elements=sum(p.numel() for p in model.parameters()),
        ),
        mpu=MegatronMPU(),
    )
    zero = engine.optimizer
    zero.scaled_global_norm = types.MethodType(
        lambda self, norm_type=2: _global_grad_norm(self), zero
    )
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)  # keeps its serialization
    return engine


def optimizer_steps(engine: deepspeed.DeepSpeedEngine) -> int:
    """AdamW updates applied so far (its bias correction's step count; skipped steps are not
    counted)."""
    states = [state for state in engine.optimizer.state.values() if "step" in state]
    return int(states[0]["step"]) if states else 0


def materialize_optimizer_state(engine: deepspeed.DeepSpeedEngine, steps: int) -> None:
    """Give every parameter group without AdamW state (none has any before the first update)
    the state of `steps` updates with zero moments, and map every parameter onto its state, so
    that `safe_get/set_full_optimizer_state` work, before the first step too."""
    for group in engine.optimizer.param_groups:
        for param in group["params"]:
            state = engine.optimizer.state[param]
            if not state:  # torch's AdamW layout; its step count is a CPU scalar tensor
                state["step"] = torch.tensor(float(steps))
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    link_optimizer_state(engine)


def link_optimizer_state(engine: deepspeed.DeepSpeedEngine) -> None:
    """Map every parameter onto its slice of AdamW's state, which `safe_get_full_optimizer_state`
    and `safe_set_full_optimizer_state` read and write.

    ZeRO maps them once, after the first group's first update, when the other parameter groups
    (the experts') have no state yet: theirs stay unmapped. Mapping again once every group has
    state (after a full step, or `materialize_optimizer_state`) maps them all.
    """
    zero = engine.optimizer
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def load_initial_weights(engine: deepspeed.DeepSpeedEngine, path: str | os.PathLike) -> None:
    """Start from a single-process model's weights (the safetensors file of a model directory),
    under any layout: this rank's shards go into the module and, unrounded, into ZeRO's fp32
    master partitions, which DeepSpeed built from the module (in bf16, from a rounded copy)."""
    model = engine.module
    weights = read_local_shards(path, model.config)
    model.load_state_dict(weights, strict=True)
    for name, param in model.named_parameters():
        safe_set_full_fp32_param(param, weights[name].float())


def _model_coordinates() -> tuple[int, int]:
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_expert_model_parallel_rank(),
    )


def _is_shard_writer() -> bool:
    """One writer per (TP rank, EP rank): the lowest global rank holding those shards."""
    coordinates = [None] * dist.get_world_size()
    dist.all_gather_object(coordinates, _model_coordinates())
    return coordinates.index(_model_coordinates()) == dist.get_rank()


# Scripts DeepSpeed copies into every checkpoint. They unpickle the optimizer files with
# `weights_only=False`, so running one on a checkpoint from elsewhere runs whatever code it
# holds; `moeut export` does their job without unpickling anything.
_UNSAFE_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def save_checkpoint(engine: deepspeed.DeepSpeedEngine, save_dir: str, tag: str) -> None:
    """DeepSpeed checkpoint `save_dir/tag` plus this layout's weight shards in the same folder
    (and without DeepSpeed's recovery scripts)."""
    engine.save_checkpoint(save_dir, tag=tag, save_latest=False)  # our pointer is our own
    directory = os.path.join(save_dir, tag)
    for folder in (save_dir, directory):
        for script in _UNSAFE_RECOVERY_SCRIPTS:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, script))
    model = engine.module
    if _is_shard_writer():
        tp_rank, ep_rank = _model_coordinates()
        path = str(shard_file(directory, tp_rank, ep_rank))
        tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
        metadata = shard_metadata(
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        write_atomically(path, lambda p: save_file(tensors, str(p), metadata=metadata))
    dist.barrier()


# Classes DeepSpeed pickles into its optimizer files; plain data, safe to reconstruct.
_DEEPSPEED_SAFE_GLOBALS = [fragment_address, LossScaler, ZeroStageEnum]


class UnsafeCheckpointFileError(ValueError):
    """An optimizer file that was not loaded: it holds code, or it is damaged."""


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, made durable and safe: every file it saves is on
    disk before `save` returns (a checkpoint's completion marker must never outlive its files),
    and loading executes no pickled code: tensors, containers and the plain DeepSpeed data
    types its files hold are all it reconstructs."""

    def save(self, state_dict, path: str) -> None:
        super().save(state_dict, path)
        fsync_path(path)
        fsync_path(os.path.dirname(path))

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_DEEPSPEED_SAFE_GLOBALS):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as error:
                # torch's message advises `weights_only=False`: running the file's code.
                raise UnsafeCheckpointFileError(
                    f"{path} holds code (a pickled object other than tensors and plain data) "
                    "and was not loaded; a checkpoint written by moeut-dist holds none"
                ) from error
            except RuntimeError as error:  # torch's zip reader: a truncated or damaged file
                raise UnsafeCheckpointFileError(f"{path} is damaged: {error}") from error


def load_checkpoint(engine: deepspeed.DeepSpeedEngine, load_dir: str, tag: str) -> None:
    """Restore a checkpoint written by `save_checkpoint` under the same layout, without
    unpickling anything (`UnsafeCheckpointFileError` for a file that would run code)."""
    path = shard_file(os.path.join(load_dir, tag), *_model_coordinates())

    def load_shard(src, dst: torch.nn.Module) -> None:
        dst.load_state_dict(load_file(path), strict=True)

    engine.load_checkpoint(load_dir, tag=tag, custom_load_fn=load_shard)
