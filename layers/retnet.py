"""RetNet multi-scale retention (Sun et al. 2023): linear attention with a fixed decay per head.

Per head h (dk = dv = head_dim):
    gamma_h = 1 - 2^(-5-h)
    S_t = gamma_h S_{t-1} + k_t v_t^T                 [dk, dv]
    o_t = dk^-1/2 q_t^T S_t,   y_t = W_o (RMSNorm(o_t) * swish(W_g x_t))
The xPos/rotary position encoding of q and k is left out (same work as any RoPE: small next to the mixing).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from .base import LayerOptions
from .gated_linear_core import rms_norm
from .recurrent_base import RecurrentLayer, RecurrentState


def retention_decays(heads: int) -> torch.Tensor:
    """gamma_h = 1 - 2^(-5-h) for h = 0..heads-1 (float64)."""
    return 1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64))


class RetNetOptions(LayerOptions):
    chunk_size: int = Field(64, ge=1, description="tokens per block of the chunked forward")
    norm_eps: float = Field(1e-5, gt=0, description="eps of the per-head output RMSNorm")


class RetNet(RecurrentLayer):
    """RetNet retention: fixed per-head decay gamma_h = 1 - 2^(-5-h), chunked forward, swish output gate.

    Projections q, k, v, output gate: D -> H*dh; o: H*dh -> D; no biases. Math and state S[B, H, dh, dh] in
    float32 for fp16/bf16 layers.

    Forward memory: q, k, v, gate [B, H, T, dh]; the chunked form holds scores [B, H, T, C] and one state per
    chunk [B, H, T/C, dh, dh].

    Cost model (per head and padded token, C = chunk_size, dh = dk = dv): mix = 2*C*dk + 2*C*dv + 4*dk*dv
    (Q K^T with decay, scores @ V, Q S_prev, chunk state update); decode mix = 5*dk*dv. Projections: 2 FLOPs
    per weight per token; bytes see RecurrentLayer.cost.
    """

    Options = RetNetOptions

    def __init__(self, d_model: int, heads: int, head_dim: int, options: RetNetOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        inner = heads * head_dim
        self.dk = self.dv = head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(head_dim))
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        # head indices as an integer buffer: follows .to(device) but not .to(dtype), so log gamma is computed
        # in the accumulation dtype on the layer's device (no host copy in a captured decode step)
        self.register_buffer("head_index", torch.arange(heads), persistent=False)

    def _run(self, x: torch.Tensor, state: RecurrentState | None, recurrent: bool
             ) -> tuple[torch.Tensor, RecurrentState]:
        dh = self.head_dim
        q, k, v = (self._heads(p(x), dh) for p in (self.q_proj, self.k_proj, self.v_proj))
        B, H, T, _ = q.shape
        log_gamma = torch.log1p(-torch.exp2(-5.0 - self.head_index.to(q.dtype)))  # log(1 - 2^(-5-h))
        g = log_gamma[:, None].expand(B, H, T)
        o, S = self._decay(q, k, v, g, dh ** -0.5, None if state is None else state.S, recurrent)
        o = rms_norm(o, self.norm_weight.to(o.dtype), self.options.norm_eps)
        out = self._merge(o) * torch.nn.functional.silu(self.g_proj(x).to(o.dtype))
        return self.out_proj(out.to(x.dtype)), RecurrentState(S)

    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """S <- gamma_h S + k v^T per pair with the layer's own fixed decays (gamma_h for head h of the probe,
        h = 0..H-1; nothing learned), read q^T S."""
        return self._probe_decay(keys, values, queries, retention_decays(keys.shape[1]).log())

    def _mix_flops_per_token(self, C: int) -> float:
        return 2 * C * self.dk + 2 * C * self.dv + 4 * self.dk * self.dv

    def _decode_mix_flops(self) -> float:
        return 5 * self.dk * self.dv
