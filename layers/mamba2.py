"""Mamba2 / SSD (Dao & Gu 2024) with one B/C group: a scalar decay per head, i.e. simple GLA with q = C,
k = B, v = dt * x, log decay g = dt * A.

Per head h (P = head_dim channels of x, N = state_size):
    x, B, C = silu(causal_conv([x, B, C]))        (depthwise, conv_size taps)
    dt_t = softplus(dt_raw_t + dt_bias_h),  A_h = -exp(A_log_h)
    S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T                        [N, P]
    y_t = C_t^T S_t + D_h x_t,   out = W_out RMSNorm(y * silu(z))  (norm over the whole inner width)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import LayerConfigError, LayerOptions
from .gated_linear_core import causal_conv, rms_norm
from .recurrent_base import RecurrentLayer, RecurrentState


class Mamba2Options(LayerOptions):
    state_size: int = Field(64, ge=1, description="N: state entries per channel (width of B and C)")
    conv_size: int = Field(4, ge=1, description="taps of the causal depthwise convolution on x, B, C")
    chunk_size: int = Field(64, ge=1, description="tokens per block of the chunked (SSD) forward")
    dt_min: float = Field(0.001, gt=0, description="smallest initial step size dt (log-uniform init)")
    dt_max: float = Field(0.1, gt=0, description="largest initial step size dt (log-uniform init)")
    norm_eps: float = Field(1e-5, gt=0, description="eps of the gated output RMSNorm")
    probe_decay: float = Field(1.0, gt=0, le=1, description="capacity probe only: the fixed per-write decay "
                                                            "exp(dt*A) (1 = no forgetting)")


class Mamba2(RecurrentLayer):
    """Mamba2 / SSD block, one group: scalar per-head decay, causal conv on x/B/C, gated RMSNorm output.

    in_proj: D -> [z (H*P), x (H*P), B (N), C (N), dt (H)]; conv over the H*P + 2N channels of x, B, C (with
    bias); dt_bias, A_log, D per head; out_proj: H*P -> D. Math and S[B, H, N, P] in float32 for fp16/bf16
    layers; the decode state also holds the conv tail [B, conv_size-1, H*P + 2N] in the layer dtype.

    Forward memory: z, x, B, C, dt and y [B, T, ~2*H*P + 2N]; the chunked form holds scores [B, H, T, C] and
    one state per chunk [B, H, T/C, N, P].

    Cost model (per head and padded token, C = chunk_size, dk = N, dv = P): mix = 2*C*dk + 2*C*dv + 4*dk*dv
    (C B^T, scores @ (dt x), C S_prev, chunk state update); decode mix = 5*dk*dv. Projections and the conv:
    2 FLOPs per weight per token; bytes see RecurrentLayer.cost.
    """

    Options = Mamba2Options

    def __init__(self, d_model: int, heads: int, head_dim: int, options: Mamba2Options | None = None):
        super().__init__(d_model, heads, head_dim, options)
        opts = self.options
        if opts.dt_min > opts.dt_max:
            raise LayerConfigError("dt_min", "must not exceed dt_max", opts.dt_min,
                                   f"a value <= {opts.dt_max}")
        inner, N = heads * head_dim, opts.state_size
        self.dk, self.dv = N, head_dim
        self.inner = inner
        self.conv_size = opts.conv_size
        self.conv_channels = inner + 2 * N
        self.in_proj = nn.Linear(d_model, 2 * inner + 2 * N + heads, bias=False)
        conv_init = torch.randn(self.conv_channels, opts.conv_size) / math.sqrt(opts.conv_size)
        self.conv_weight = nn.Parameter(conv_init)
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_channels))
        log_dt = torch.empty(heads).uniform_(math.log(opts.dt_min), math.log(opts.dt_max))
        dt = log_dt.exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(heads))
        self.norm_weight = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d_model, bias=False)

    def _run(self, x: torch.Tensor, state: RecurrentState | None, recurrent: bool
             ) -> tuple[torch.Tensor, RecurrentState]:
        acc, P, N, H = self.accum_dtype, self.head_dim, self.options.state_size, self.heads
        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_channels, H], dim=-1)
        xbc_conv, tail = causal_conv(xbc.to(acc), self.conv_weight.to(acc), self.conv_bias.to(acc),
                                     None if state is None else state.conv)
        xs, Bm, Cm = F.silu(xbc_conv).split([self.inner, N, N], dim=-1)
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc)).transpose(1, 2)  # [B, H, T]
        g = dt * -self.A_log.to(acc).exp().unsqueeze(-1)  # log decay dt * A
        xh = self._heads(xs, P)  # [B, H, T, P]
        q = Cm.unsqueeze(1).expand(-1, H, -1, -1)  # one group: C and B shared by every head
        k = Bm.unsqueeze(1).expand(-1, H, -1, -1)
        o, S = self._decay(q, k, xh * dt.unsqueeze(-1), g, 1.0, None if state is None else state.S, recurrent)
        y = self._merge(o + self.D.to(acc)[:, None, None] * xh)
        y = rms_norm(y * F.silu(z.to(acc)), self.norm_weight.to(acc), self.options.norm_eps)
        return self.out_proj(y.to(x.dtype)), RecurrentState(S, tail.to(self.dtype))

    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """S <- probe_decay * S + B v^T with B = key, dt = 1 (v = value), read C^T S with C = query: the SSD
        core with its decay held at a fixed value instead of exp(dt*A); no conv, no D skip."""
        log_decay = torch.tensor(math.log(self.options.probe_decay), dtype=torch.float64)
        return self._probe_decay(keys, values, queries, log_decay)

    def _mix_flops_per_token(self, C: int) -> float:
        return 2 * C * self.dk + 2 * C * self.dv + 4 * self.dk * self.dv

    def _decode_mix_flops(self) -> float:
        return 5 * self.dk * self.dv
