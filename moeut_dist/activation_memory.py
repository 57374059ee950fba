"""The bytes of activations autograd keeps for backward: what the benchmarks report per token,
and what the expert-path tests bound."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class SavedTensorBytes:
    """`with SavedTensorBytes(excluded) as saved:` counts the storages autograd saves for backward
    inside the block, each once, except those of `excluded` (the parameters, the inputs);
    `saved.bytes` is their total."""

    def __init__(self, excluded: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {tensor.untyped_storage().data_ptr() for tensor in excluded}
        self._kept: dict[int, int] = {}  # storage address -> its bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exception: Any) -> None:
        self._hooks.__exit__(*exception)

    @property
    def bytes(self) -> int:
        return sum(self._kept.values())
