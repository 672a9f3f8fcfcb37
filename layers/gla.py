"""Gated linear attention (GLA, Yang et al. 2024): linear attention with a data-dependent per-channel decay.

Per head, with dk = dv = head_dim:
    alpha_t = exp(g_t),  g_t = logsigmoid(W2 W1 x_t + b) / gate_logit_normalizer     [dk]  (low-rank gate)
    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T                                             [dk, dv]
    o_t = dk^-1/2 q_t^T S_t,   y_t = W_o (RMSNorm(o_t) * swish(W_g x_t))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import LayerOptions
from .gated_linear_core import rms_norm
from .recurrent_base import RecurrentLayer, RecurrentState


class GLAOptions(LayerOptions):
    chunk_size: int = Field(16, ge=1, description="tokens per block of the chunked forward (per-channel "
                            "decay: intra-chunk memory grows as chunk_size * head_dim per token)")
    gate_low_rank: int = Field(16, ge=1, description="rank of the decay-gate projection D -> r -> H*dk")
    gate_logit_normalizer: float = Field(16.0, gt=0, description="log decay = logsigmoid(gate) / this")
    norm_eps: float = Field(1e-5, gt=0, description="eps of the per-head output RMSNorm")
    probe_decay: float = Field(1.0, gt=0, le=1, description="capacity probe only: the fixed decay alpha "
                               "of every channel per write (1 = no forgetting)")


class GLA(RecurrentLayer):
    """Gated linear attention: per-channel data-dependent decay from a low-rank gate, swish output gate.

    Projections q, k, v, output gate: D -> H*dh; decay gate D -> r -> H*dh (with bias); o: H*dh -> D; no other
    biases. Math and state S[B, H, dh, dh] in float32 for fp16/bf16 layers.

    Forward memory: q, k, v, g, gate [B, H, T, dh]; the chunked form holds the intra-chunk decay ratios and
    scores [B, H, T, C, dh] (per-channel decay) and one state per chunk [B, H, T/C, dh, dh].

    Cost model (per head and padded token, C = chunk_size, dh = dk = dv): mix = 3*C*dk (intra scores: k times
    the decay ratios, then the reduction with q) + 2*C*dv (scores @ V) + 4*dk*dv (q S_prev and the chunk
    state update); decode mix = 5*dk*dv (decay, k v^T, q^T S). Projections: 2 FLOPs per weight per token;
    bytes see RecurrentLayer.cost.
    """

    Options = GLAOptions

    def __init__(self, d_model: int, heads: int, head_dim: int, options: GLAOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        inner = heads * head_dim
        self.dk = self.dv = head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.gate_down = nn.Linear(d_model, self.options.gate_low_rank, bias=False)
        self.gate_up = nn.Linear(self.options.gate_low_rank, inner, bias=True)
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(head_dim))
        self.out_proj = nn.Linear(inner, d_model, bias=False)

    def _run(self, x: torch.Tensor, state: RecurrentState | None, recurrent: bool
             ) -> tuple[torch.Tensor, RecurrentState]:
        dh = self.head_dim
        q, k, v = (self._heads(p(x), dh) for p in (self.q_proj, self.k_proj, self.v_proj))
        gate = self._heads(self.gate_up(self.gate_down(x)), dh)
        g = F.logsigmoid(gate) / self.options.gate_logit_normalizer  # [B, H, T, dk], log decay
        o, S = self._decay(q, k, v, g, dh ** -0.5, None if state is None else state.S, recurrent)
        o = rms_norm(o, self.norm_weight.to(o.dtype), self.options.norm_eps)
        out = self._merge(o) * F.silu(self.g_proj(x).to(o.dtype))
        return self.out_proj(out.to(x.dtype)), RecurrentState(S)

    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """S <- probe_decay * S + k v^T per pair (every channel decays alike: the gate at a fixed value
        instead of its data-dependent one), read q^T S. With probe_decay = 1: plain linear attention."""
        log_decay = torch.tensor(math.log(self.options.probe_decay), dtype=torch.float64)
        return self._probe_decay(keys, values, queries, log_decay)

    def _mix_flops_per_token(self, C: int) -> float:
        return 3 * C * self.dk + 2 * C * self.dv + 4 * self.dk * self.dv

    def _decode_mix_flops(self) -> float:
        return 5 * self.dk * self.dv
