"""Rotary position embedding (RoPE, rotate-half convention) shared by the layers that use it, with the
interleaved channel layout and YaRN frequency scaling that DeepSeek-V2/V3 use.

cos/sin are computed in float64 from integer positions, elementwise, then cast: a position gets bit-identical
angles whether it is rotated inside a long prefill or alone in a decode step.
"""

from __future__ import annotations

import math

import torch

# YaRN's ramp bounds, in turns over the original context (the paper's alpha, beta; DeepSeek-V2/V3 use them).
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def rope_inv_freq(dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Frequencies theta^(-2i/dim), i < dim/2, of an even rotary width `dim`, in float64 -> [dim/2]."""
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def yarn_inv_freq(dim: int, theta: float, factor: float, original_context: int) -> torch.Tensor:
    """YaRN (arXiv 2309.00071) frequencies of an even rotary width `dim`, in float64 -> [dim/2].

    Pair i keeps its frequency f_i = theta^(-2i/dim) when it turns more than YARN_BETA_FAST times over
    `original_context` positions, is interpolated to f_i / factor when it turns fewer than YARN_BETA_SLOW
    times, and blends the two linearly in between; the bounds are rounded outwards to whole pairs (as
    DeepSeek-V2/V3 and HF transformers' `yarn` rope type do).
    """
    def pair_turning(rotations: float) -> float:  # the (fractional) pair index that turns `rotations` times
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_turning(YARN_BETA_FAST)), 0)
    high = min(math.ceil(pair_turning(YARN_BETA_SLOW)), dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    inv_freq = rope_inv_freq(dim, theta)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1 or mscale = 0)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
            scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions[T] (int), inv_freq[r/2] (float64) -> cos, sin [T, r] times `scale`, cast to dtype."""
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, r/2]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions[T] (int) -> cos, sin [T, dim] for an even rotary width `dim`, frequencies theta^(-2i/dim)."""
    return cos_sin(positions, rope_inv_freq(dim, theta, positions.device), dtype)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """x[..., r] with rotary pairs interleaved, (x0, x1), (x2, x3), ... (DeepSeek's layout) -> the same
    channels as [x0, x2, ..., x1, x3, ...]. Rotate-half RoPE on the result rotates exactly the interleaved
    pairs, in the rotate-half channel order; q and k reordered alike keep every q . k."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


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
