"""DeltaNet (Schlag et al. 2021; Yang et al. 2024) and Gated DeltaNet (Yang et al. 2025): linear attention
whose state update is one online regression step per token (the delta rule), optionally with a decay.

Per head, with dk = dv = head_dim, q and k L2-normalised after a short causal conv + SiLU:
    beta_t = sigmoid(w_b x_t)
    alpha_t = exp(-exp(A_log) * softplus(w_a x_t + dt_bias))   (Gated DeltaNet; DeltaNet: alpha_t = 1)
    S_t = alpha_t S_{t-1} + beta_t k_t (v_t - (alpha_t S_{t-1})^T k_t)^T                       [dk, dv]
        = (I - beta_t k_t k_t^T) alpha_t S_{t-1} + beta_t k_t v_t^T
    o_t = dk^-1/2 S_t^T q_t,   y_t = W_o RMSNorm(o_t)  (gated: W_o (RMSNorm(o_t) * swish(W_g x_t)))
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import LayerOptions
from .gated_linear_core import causal_conv, rms_norm
from .recurrent_base import RecurrentLayer, RecurrentState


class DeltaNetOptions(LayerOptions):
    chunk_size: int = Field(64, ge=1, description="tokens per block of the chunked (WY) forward")
    conv_size: int = Field(4, ge=1, description="taps of the causal depthwise convolution on q, k, v")
    norm_eps: float = Field(1e-5, gt=0, description="eps of the per-head output RMSNorm")
    probe_beta: float = Field(1.0, gt=0, le=1, description="capacity probe only: the fixed write strength "
                                                           "beta (1 = overwrite the recalled value)")


class GatedDeltaNetOptions(DeltaNetOptions):
    probe_decay: float = Field(1.0, gt=0, le=1, description="capacity probe only: the fixed decay alpha per "
                                                            "write (1 = no forgetting)")


class DeltaNet(RecurrentLayer):
    """DeltaNet: delta-rule state update with L2-normalised q, k, learned beta, short conv on q, k, v.

    Projections q, k, v: D -> H*dh; beta: D -> H (sigmoid); conv over the 3*H*dh channels of q, k, v (no bias,
    then SiLU); per-head RMSNorm; o: H*dh -> D. Math and S[B, H, dh, dh] in float32 for fp16/bf16 layers; the
    decode state also holds the conv tail [B, conv_size-1, 3*H*dh] in the layer dtype.

    Forward memory: q, k, v, beta [B, H, T, dh]; the chunked form holds per chunk A, K K^T, Q K^T
    [B, H, T, C], the WY factors Wv, Wk [B, H, T, dh] and one state per chunk [B, H, T/C, dh, dh].

    Cost model (per head and padded token, C = chunk_size, dh = dk = dv): mix = 2*C*dk (K K^T)
    + C*(dv + dk) (triangular solve) + 2*C*dk (Q K^T) + 2*C*dv (P @ U) + 6*dk*dv (Wk S, Q S, state update);
    decode mix = 7*dk*dv (recall S^T k, rank-1 update, read, decay). Projections and the conv: 2 FLOPs per
    weight per token; bytes see RecurrentLayer.cost.
    """

    Options = DeltaNetOptions
    gated: ClassVar[bool] = False

    def __init__(self, d_model: int, heads: int, head_dim: int, options: DeltaNetOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        inner = heads * head_dim
        self.dk = self.dv = head_dim
        self.conv_size = self.options.conv_size
        self.conv_channels = 3 * inner
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.b_proj = nn.Linear(d_model, heads, bias=False)
        self.conv_weight = nn.Parameter(torch.randn(3 * inner, self.conv_size) / math.sqrt(self.conv_size))
        self.norm_weight = nn.Parameter(torch.ones(head_dim))
        if self.gated:
            self.a_proj = nn.Linear(d_model, heads, bias=False)
            dt = torch.empty(heads).uniform_(math.log(0.001), math.log(0.1)).exp()
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
            self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.out_proj = nn.Linear(inner, d_model, bias=False)

    def _run(self, x: torch.Tensor, state: RecurrentState | None, recurrent: bool
             ) -> tuple[torch.Tensor, RecurrentState]:
        acc, dh = self.accum_dtype, self.head_dim
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        tail_in = None if state is None else state.conv
        conv, tail = causal_conv(qkv.to(acc), self.conv_weight.to(acc), None, tail_in)
        q, k, v = (self._heads(t, dh) for t in F.silu(conv).chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.b_proj(x).to(acc)).transpose(1, 2)  # [B, H, T]
        g = None
        if self.gated:
            dt = F.softplus(self.a_proj(x).to(acc) + self.dt_bias.to(acc)).transpose(1, 2)
            g = -self.A_log.to(acc).exp()[:, None] * dt  # [B, H, T], log decay
        o, S = self._delta(q, k, v, beta, g, dh ** -0.5, None if state is None else state.S, recurrent)
        out = self._merge(rms_norm(o, self.norm_weight.to(acc), self.options.norm_eps))
        if self.gated:
            out = out * F.silu(self.g_proj(x).to(acc))
        return self.out_proj(out.to(x.dtype)), RecurrentState(S, tail.to(self.dtype))

    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The delta rule with keys and queries L2-normalised (part of the mechanism), beta = probe_beta and,
        gated, alpha = probe_decay for every write; no conv, no scale on the read S^T q."""
        decay = math.log(self.options.probe_decay) if self.gated else None
        return self._probe_delta(keys, values, queries, self.options.probe_beta, decay)

    def _mix_flops_per_token(self, C: int) -> float:
        dk, dv = self.dk, self.dv
        return 4 * C * dk + C * (dk + dv) + 2 * C * dv + 6 * dk * dv

    def _decode_mix_flops(self) -> float:
        return 7 * self.dk * self.dv


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: DeltaNet with a Mamba2-style data-dependent decay alpha_t and a swish output gate.

    Adds to DeltaNet: a: D -> H with dt_bias and A_log per head
    (alpha_t = exp(-exp(A_log) softplus(a + dt_bias))), output gate D -> H*dh.
    Same state, memory and cost model as DeltaNet.
    """

    Options = GatedDeltaNetOptions
    gated = True
