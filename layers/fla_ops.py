"""GPU path of the linear family through flash-linear-attention (`pip install ovqprof[fla]`, import `fla`).

Same arguments and results as the PyTorch core in `gated_linear_core` (layout [B, H, T, D], log-space gates,
state [B, H, dk, dv] float32); fla's kernels take [B, T, H, D], so tensors are transposed on the way in and
out. fla is imported lazily: only when a CUDA tensor reaches a layer and the package is installed.
Signatures checked against fla-core 0.6.0 (fla/ops/gla, simple_gla, gated_delta_rule).
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


_FLA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_fla(x: torch.Tensor) -> bool:
    """Whether the fla kernels run for x (the layer's accumulation-dtype q): a CUDA tensor of a dtype fla's
    Triton kernels take (not float64), and fla installed."""
    return x.is_cuda and x.dtype in _FLA_DTYPES and fla_available()


def _btd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous()


def fla_decay(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
              initial_state: torch.Tensor | None, recurrent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T. g [B, H, T, dk] runs fla's GLA kernels, g [B, H, T] its
    simple-GLA kernels (one decay per head); `recurrent` picks fused_recurrent (decode) over chunk."""
    qt, kt, vt = _btd(q), _btd(k), _btd(v)
    gt = _btd(g.float())
    h0 = None if initial_state is None else initial_state.float().contiguous()
    if g.dim() == 4:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla

        if recurrent:
            o, S = fused_recurrent_gla(qt, kt, vt, gk=gt, scale=scale, initial_state=h0,
                                       output_final_state=True)
        else:
            o, S = chunk_gla(qt, kt, vt, gt, scale=scale, initial_state=h0, output_final_state=True)
    else:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        fn = fused_recurrent_simple_gla if recurrent else chunk_simple_gla
        o, S = fn(qt, kt, vt, g=gt, scale=scale, initial_state=h0, output_final_state=True)
    return o.transpose(1, 2), S


def fla_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
              scale: float, initial_state: torch.Tensor | None, recurrent: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule; DeltaNet passes g=None and runs it with g = 0 (fla's chunk_delta_rule refuses
    float32).
    q, k already L2-normalised; beta already through its sigmoid."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    qt, kt, vt = _btd(q), _btd(k), _btd(v)
    bt = _btd(beta).to(q.dtype)
    gt = torch.zeros_like(bt, dtype=torch.float32) if g is None else _btd(g.float())
    h0 = None if initial_state is None else initial_state.float().contiguous()
    fn = fused_recurrent_gated_delta_rule if recurrent else chunk_gated_delta_rule
    o, S = fn(qt, kt, vt, g=gt, beta=bt, scale=scale, initial_state=h0, output_final_state=True)
    return o.transpose(1, 2), S
