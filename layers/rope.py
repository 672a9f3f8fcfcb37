"""Rotary position embedding (RoPE, rotate-half convention) shared by the layers that use it.

cos/sin are computed in float64 from integer positions, elementwise, then cast: a position gets bit-identical
angles whether it is rotated inside a long prefill or alone in a decode step.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions[T] (int) -> cos, sin [T, dim] for an even rotary width `dim`, frequencies theta^(-2i/dim)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x[..., T, d] (cos, sin [T, r], r even, r <= d); the
    remaining d - r channels pass through. Pairs are (i, i + r/2) (rotate-half, as Llama/DeepSeek in HF)."""
    r = cos.shape[-1]
    if r == 0:
        return x
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)
