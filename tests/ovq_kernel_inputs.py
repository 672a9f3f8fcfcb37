"""Shared test helper: random inputs of the OVQ core kernels (unit-norm q and k, Gaussian v, beta per head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ovq_inputs(B: int, H: int, T: int, dk: int, dtype: torch.dtype, seed: int, device: str) -> list[torch.Tensor]:
    """[q, k, v] [B, H, T, dk] in `dtype` and beta [H] float32 in [3, 4), drawn from a generator seeded by
    `seed` (the same values on every device), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, H, T, dk, generator=gen), dim=-1)
    v = torch.randn(B, H, T, dk, generator=gen)
    beta = 3.0 + torch.rand(H, generator=gen)
    return [t.to(device, dtype) for t in (q, k, v)] + [beta.to(device)]
