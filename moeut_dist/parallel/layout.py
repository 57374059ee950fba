"""The parallel layout of a run and the process groups that realise it.

Groups come from `megatron.core.parallel_state`, with experts *folded* onto the dense ranks
(expert tensor parallelism 1): the expert-parallel group is a block of `expert` consecutive
ranks, so with TP > 1 it contains whole TP groups and TP ranks own disjoint experts instead of
slicing each 128-wide expert (see `expert_parallel`). Dense parameters are replicated over
`world / tensor` data-parallel ranks, expert parameters over `world / expert` expert-data-parallel
ranks.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moeut_dist import arch
from moeut_dist.arch import ModelConfig
from moeut_dist.config import ConfigError
from moeut_dist.dataclass_dict import DictConvertible


@dataclass(frozen=True)
class ParallelConfig(DictConvertible):
    tensor: int = 1  # TP: attention heads and vocabulary are split over this many ranks
    expert: int = 1  # EP: σ-MoE experts are partitioned over this many ranks
    zero_stage: int = 1  # DeepSpeed ZeRO stage (1: optimizer states, 2: + gradients)
    checkpoint_activations: bool = False  # recompute each layer application in backward

    def __post_init__(self) -> None:
        for name in ("tensor", "expert"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} parallel size must be >= 1, got {getattr(self, name)}")
        if self.zero_stage not in (1, 2):
            raise ConfigError(f"zero_stage must be 1 or 2, got {self.zero_stage}")

    def data(self, world_size: int) -> int:
        """Data-parallel size of the dense parameters."""
        return world_size // self.tensor

    def validate(self, model: ModelConfig, world_size: int) -> None:
        """Reject a layout that does not fit `model` on `world_size` ranks, naming the numbers."""
        tp, ep = self.tensor, self.expert
        spec = arch.of(model)
        n_experts = spec.n_experts(model)
        if ep > 1 and n_experts == 0:
            raise ConfigError(
                f"expert parallelism (parallel.expert={ep}) needs experts, and a {spec.name} "
                "model has none; set parallel.expert=1"
            )
        problems = []
        if model.n_heads % tp:
            problems.append(f"tensor parallel size {tp} does not divide n_heads {model.n_heads}")
        if model.vocab_size % tp:
            problems.append(
                f"tensor parallel size {tp} does not divide vocab_size {model.vocab_size}"
            )
        if n_experts and ep > n_experts:
            problems.append(f"expert parallel size {ep} exceeds n_experts {n_experts}")
        if world_size % tp or world_size % ep:
            problems.append(
                f"world size {world_size} is not a multiple of tensor parallel size {tp} "
                f"and expert parallel size {ep}"
            )
        # Folding: an expert-parallel block of ranks must hold whole tensor-parallel groups (or
        # lie inside one), otherwise a TP group's tokens would be split between EP groups.
        if ep % tp and tp % ep:
            problems.append(
                f"expert parallel size {ep} and tensor parallel size {tp} must divide one another"
            )
        if problems:
            raise ConfigError("invalid parallel layout: " + "; ".join(problems))


def init_distributed(backend: str | None = None) -> None:
    """`torch.distributed` from the torchrun environment: NCCL with GPUs, gloo without."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(minutes=30)
    store = _restart_safe_agent_store(timeout)
    if store is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )


# Where torchrun's agent shares its rendezvous store with the workers (its default since torch
# 2.4), the store outlives a restart of the workers, and the process groups' keys carry no
# attempt: restarted workers read the dead workers' addresses from it and fail with "Gloo
# connectFullMesh failed … Connection refused" (pytorch/pytorch#135712).
_SHARED_STORE_FIX = (
    "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment of torchrun on every node "
    "(launch/torchrun.sh and launch/slurm.sbatch do)"
)


def _restart_safe_agent_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The store of this attempt's process groups under torchrun's shared agent store; None
    where `init_process_group` may create its own (no torchrun, or no store sharing).

    With one agent (one node), every worker of an attempt sees the same
    `TORCHELASTIC_RESTART_COUNT`, so the attempt's keys go under a prefix of their own. Agents
    on several nodes count restarts apart (one that restarts for another node's failure does
    not count it), so there the only safe store is an unshared one: a restart says what to set.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        if attempt > 0:
            raise ConfigError(
                f"torchrun restarted the workers (attempt {attempt}) while sharing its "
                f"rendezvous store with them, so they cannot reconnect; {_SHARED_STORE_FIX}"
            )
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and _is_first_worker():
            warnings.warn(
                f"torchrun --max-restarts on several nodes cannot restart this run: "
                f"{_SHARED_STORE_FIX}",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,  # the agent hosts it
        timeout=timeout,
    )
    return dist.PrefixStore(f"moeut/attempt_{attempt}", store)


def _is_first_worker() -> bool:
    return os.environ.get("RANK") == "0"


def initialize(parallel: ParallelConfig, model: ModelConfig) -> None:
    """Validate the layout, then create megatron-core's TP/EP/DP groups.

    `torch.distributed` must be initialised (see `init_distributed`). Safe to call again with a
    new layout: the previous groups are destroyed first.
    """
    parallel.validate(model, dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=1,
        # The gloo twins of NCCL groups are only needed for CPU-side collectives on GPU runs;
        # on a gloo world every group already is one.
        create_gloo_process_groups=dist.get_backend() != "gloo",
    )


def expert_group_name(parallel: ParallelConfig) -> str:
    """DeepSpeed's name for the expert groups (it parses the size back out of `ep_size_N`)."""
    return f"ep_size_{parallel.expert}"
