"""Shared test helper: run a layer in streaming decode (prefill, then one step per token)."""

from __future__ import annotations

import torch


def decode_all(layer, x: torch.Tensor, prefix: int, capacity: int | None = None):
    """Prefill x[:, :prefix], then one step per remaining token; returns the concatenated outputs [B, T, D]
    and the last state."""
    y, state = layer.prefill(x[:, :prefix], capacity)
    outs = [y]
    for t in range(prefix, x.shape[1]):
        y_t, state = layer.step(x[:, t:t + 1], state)
        outs.append(y_t)
    return torch.cat(outs, dim=1), state
