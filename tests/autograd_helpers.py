"""Shared test helper: what autograd keeps for the backward."""

from __future__ import annotations

import torch


def saved_storage_bytes(fn, *args) -> list[int]:
    """Run fn(*args) and return the byte sizes of the distinct storages autograd saved for the backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return list(storages.values())
