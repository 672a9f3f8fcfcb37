"""The autograd Function of the OVQ-attention core: a Triton forward and backward of one kernel variant.

Variants (same inputs, same results, so they are interchangeable and tested against the same reference):
- "per_head": one program per (batch, head) walks the chunks (forward.py, backward.py).
- "split": each (batch, head)'s slots are split over several programs that synchronise once per chunk
  (forward_split.py, backward_split.py), to fill a GPU when batch x heads is small.
"""

from __future__ import annotations

import torch

from .backward import ovq_backward_triton
from .backward_split import ovq_backward_split_triton
from .config import OVQConfig
from .forward import ovq_forward_triton
from .forward_split import ovq_forward_split_triton
from .unit_norm import unit_norm_backward, unit_norm_forward

VARIANTS = {"per_head": (ovq_forward_triton, ovq_backward_triton),
            "split": (ovq_forward_split_triton, ovq_backward_split_triton)}


def kernels_for(variant: str):
    """(forward, backward) kernels of `variant` (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown OVQ kernel variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    return VARIANTS[variant]


class OVQCoreFunction(torch.autograd.Function):
    """o = OVQ core(q, k, v, beta) with the Triton forward and backward kernels (q, k [B, H, T, dk],
    v [B, H, T, dv], beta [H]). With normalize_qk the Function L2-normalises q and k itself (float32 math) and
    saves the raw q, k, recomputing the unit vectors in the backward: one copy of each instead of two (raw
    for the normalisation's backward plus unit for the kernels'). Without it, q and k must be unit-norm.
    The final dictionary is not an output: call the variant's forward kernel directly when the state is needed.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, cfg: OVQConfig, normalize_qk: bool = False, variant: str = "per_head",
                dict_precision: str = "tf32"):
        forward, _ = kernels_for(variant)
        qn, kn = (_unit(q), _unit(k)) if normalize_qk else (q, k)
        o, lse, z, sk, sv, cnt = forward(qn, kn, v, beta, cfg, dict_precision=dict_precision)
        ctx.save_for_backward(q, k, v, o, lse, z, beta, sk, sv, cnt)
        ctx.cfg, ctx.normalize_qk, ctx.variant, ctx.dict_precision = cfg, normalize_qk, variant, dict_precision
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, z, beta, sk, sv, cnt = ctx.saved_tensors
        _, backward = kernels_for(ctx.variant)
        qn, kn = (_unit(q), _unit(k)) if ctx.normalize_qk else (q, k)
        dq, dk, dv, dbeta = backward(qn, kn, v, o, do, lse, z, beta, sk, sv, cnt, ctx.cfg,
                                     dict_precision=ctx.dict_precision)
        del qn, kn
        if ctx.normalize_qk:
            dq, dk = unit_norm_backward(q, dq), unit_norm_backward(k, dk)
        need = ctx.needs_input_grad
        return (dq.to(q.dtype) if need[0] else None, dk.to(k.dtype) if need[1] else None,
                dv.to(v.dtype) if need[2] else None, dbeta.to(beta.dtype) if need[3] else None, None, None, None, None)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """t / |t| along the last dim (float32 math) in t's dtype, contiguous for the kernels."""
    return unit_norm_forward(t, t.dtype).contiguous()


def ovq_core_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                    cfg: OVQConfig, normalize_qk: bool = False, variant: str = "per_head",
                    dict_precision: str = "tf32") -> torch.Tensor:
    """Differentiable core output o [B, H, T, dv] through the Triton kernels of `variant`; q and k unit-norm,
    or raw with normalize_qk (normalised inside, see OVQCoreFunction); dict_precision: see
    `forward.dict_mode`."""
    return OVQCoreFunction.apply(q, k, v, beta, cfg, normalize_qk, variant, dict_precision)
