"""Layout-free training state: every parameter's fp32 master weights and AdamW moments as full
tensors, by parameter name, so that a run can continue under another layout.

A checkpoint's `portable/` folder holds `state_rankNNNNN.safetensors` files, together one
`fp32/<name>`, `exp_avg/<name>` and `exp_avg_sq/<name>` tensor per parameter of the
single-process model (`MoEUTLM(config).named_parameters()`), all fp32. Parameter `i` (in the
model's order) belongs to rank `i mod world size`, which writes it: the ranks write in parallel,
each streaming its tensors to disk one at a time (`export.write_safetensors_streaming`), so
memory is bounded by the largest tensor. A full tensor is assembled in two steps: DeepSpeed's
public `safe_get_full_*` calls gather a ZeRO partition over the parameter's (expert-)data-parallel
group, `build.gather_full` the TP / EP shards. Loading is the reverse for any layout: each rank
reads only its slices of each tensor and hands them to `safe_set_full_*`.
"""

from __future__ import annotations

import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors import safe_open

from moeut_dist.atomic_files import write_atomically
from moeut_dist.export import expected_state_dict, write_safetensors_streaming
from moeut_dist.model import MoEUTLM
from moeut_dist.parallel.build import gather_full, local_index
from moeut_dist.parallel.engine import materialize_optimizer_state, optimizer_steps

STATE_DIR = "portable"
_KINDS = ("fp32", "exp_avg", "exp_avg_sq")  # the master weights, then AdamW's two moments


def _state_file(directory: Path, rank: int) -> Path:
    return directory / f"state_rank{rank:05d}.safetensors"


def _local(param: torch.nn.Parameter, kind: str) -> torch.Tensor:
    """This rank's TP / EP shard of `kind`, whole over the data-parallel ranks (a collective
    over the parameter's data-parallel group)."""
    if kind == "fp32":
        return safe_get_full_fp32_param(param)
    return safe_get_full_optimizer_state(param, kind)


def save_state(engine: deepspeed.DeepSpeedEngine, directory: str | os.PathLike) -> None:
    """Write the portable state of `engine` into `directory`; called on every rank."""
    directory = Path(directory)
    model: MoEUTLM = engine.module
    config = model.config
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shapes = {name: t.shape for name, t in expected_state_dict(config, torch.float32).items()}
    parameters = list(model.named_parameters())
    mine = [name for i, (name, _) in enumerate(parameters) if i % world_size == rank]
    specs = {
        f"{kind}/{name}": (tuple(shapes[name]), torch.float32) for name in mine for kind in _KINDS
    }

    def tensors():
        # Every rank runs every collective, in the same order; the owner keeps the result.
        for i, (name, param) in enumerate(parameters):
            for kind in _KINDS:
                full = gather_full({name: _local(param, kind)}, config)[name]
                if i % world_size == rank:
                    yield f"{kind}/{name}", full.float().cpu()

    materialize_optimizer_state(engine, optimizer_steps(engine))  # zeros if no update yet
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    write_atomically(
        _state_file(directory, rank),
        lambda path: write_safetensors_streaming(Path(path), specs, tensors()),
    )


def _tensor_files(directory: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(directory.glob("state_rank*.safetensors")):
        with safe_open(path, framework="pt") as file:
            files.update(dict.fromkeys(file.keys(), path))
    return files


@torch.no_grad()
def load_state(engine: deepspeed.DeepSpeedEngine, directory: str | os.PathLike, steps: int) -> None:
    """Give `engine` (any layout) the portable state in `directory`: its module weights (in the
    module's dtype), ZeRO's fp32 master weights, AdamW's moments, and `steps` as AdamW's update
    count."""
    model: MoEUTLM = engine.module
    files = _tensor_files(Path(directory))
    expected = {f"{kind}/{name}" for name, _ in model.named_parameters() for kind in _KINDS}
    missing = sorted(expected - set(files))
    if missing:
        raise FileNotFoundError(f"{directory} lacks {missing[0]} ({len(missing)} in all)")
    materialize_optimizer_state(engine, steps)
    for name, param in model.named_parameters():
        for kind in _KINDS:
            with safe_open(files[f"{kind}/{name}"], framework="pt") as file:
                key = f"{kind}/{name}"
                index = local_index(name, file.get_slice(key).get_shape(), model.config)
                local = file.get_slice(key)[index] if index else file.get_tensor(key)
            local = local.reshape(param.shape).to(param.device)
            if kind == "fp32":
                param.copy_(local)  # the module's weights, rounded like ZeRO rounds them
                safe_set_full_fp32_param(param, local)
            else:
                safe_set_full_optimizer_state(param, local, kind)
