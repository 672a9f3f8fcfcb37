"""Associative-memory read of plain softmax attention, shared by the probe_memory hooks of softmax-family
layers whose core is softmax(q k^T * scale) V over the written keys (no state update beyond appending)."""

from __future__ import annotations

import math

import torch


def probe_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a probe: float32 for fp16/bf16, else the given dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def softmax_read(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                 scale: float | None = None) -> torch.Tensor:
    """keys[B, H, N, dk], values[B, H, N, dv], queries[B, H, M, dk] -> softmax(q k^T * scale) v [B, H, M, dv].

    Every query reads all N written keys (the state after the last write; queries are not written).
    scale defaults to 1/sqrt(dk). Computed in the accumulation dtype of the inputs (float32 for half).
    """
    dt = probe_dtype(keys.dtype)
    k, v, q = keys.to(dt), values.to(dt), queries.to(dt)
    s = scale if scale is not None else 1.0 / math.sqrt(k.shape[-1])
    return torch.softmax((q @ k.transpose(-1, -2)) * s, dim=-1) @ v
