"""Run a function on N local CPU processes joined by a gloo process group.

Each spawn costs seconds (interpreter start plus torch/megatron/DeepSpeed imports), so tests run
several checks per spawn. The function runs on every rank; an exception on any rank fails the
test with that rank's traceback. What rank 0 returns is handed back to the caller.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # world_size processes share the CI machine's few cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> Any:
    """`fn(*args)` on `world_size` gloo ranks; returns rank 0's result. `fn` must be importable
    (a module-level function)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size)
        path = os.path.join(out_dir, "result.pt")
        return torch.load(path, weights_only=False) if os.path.exists(path) else None
