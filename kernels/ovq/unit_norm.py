"""L2 normalisation of q and k heads for the Triton path, computed in float32 but saving only the input.

`F.normalize` on a float32 copy of a bf16 projection keeps that float32 copy alive for the backward:
[B, H, T, dh] x 4 bytes per tensor (512 MiB for each of q and k at B=1, H=16, T=64k, dh=128), which made the
OVQ layer's forward+backward peak exceed SDPA's (kernels/ovq/NOTES.md). This Function saves the input in its
own dtype (half the bytes for bf16) and recomputes the float32 norm in the backward.
"""

from __future__ import annotations

import torch


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in its own dtype when that is wider (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _norm_f32(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x[..., d] -> max(|x|, eps) [..., 1] in float32 or wider (F.normalize's clamp)."""
    return torch.linalg.vector_norm(_wide(x), dim=-1, keepdim=True).clamp_min(eps)


def unit_norm_forward(x: torch.Tensor, out_dtype: torch.dtype, eps: float = 1e-12) -> torch.Tensor:
    """x[..., d] / max(|x|, eps) with float32 (or wider) math, in out_dtype; no autograd."""
    return (_wide(x) / _norm_f32(x, eps)).to(out_dtype)


def unit_norm_backward(x: torch.Tensor, dy: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """dL/dx in x's dtype given dL/dy for y = x / max(|x|, eps): with u = x / n, (dy - u (u . dy)) / n where
    |x| > eps, dy / eps where the clamp is active (the same gradient as F.normalize)."""
    n = _norm_f32(x, eps)
    u = _wide(x) / n
    dy = _wide(dy)
    clamped = n <= eps
    return (torch.where(clamped, dy, dy - u * (u * dy).sum(-1, keepdim=True)) / n).to(x.dtype)


class UnitNormFunction(torch.autograd.Function):
    """y = x / max(|x|, eps) along the last dim, math in float32, y in `out_dtype`; saves only x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_dtype: torch.dtype, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.eps = eps
        return unit_norm_forward(x, out_dtype, eps)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        return unit_norm_backward(x, dy, ctx.eps), None, None


def unit_norm(x: torch.Tensor, out_dtype: torch.dtype | None = None, eps: float = 1e-12) -> torch.Tensor:
    """x[..., d] / |x| (float32 math) in `out_dtype` (default x.dtype); saves only x for the backward."""
    return UnitNormFunction.apply(x, out_dtype or x.dtype, eps)
