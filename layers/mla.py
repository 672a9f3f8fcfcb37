"""Multi-head latent attention (MLA, DeepSeek-V2): keys and values up-projected from a small latent, plus a
decoupled RoPE key shared by all heads; decode in absorbed form over a cache of latents only.

Shapes: B batch, T length, D d_model, H heads, dh head_dim (no-RoPE part of q/k and the value head dim),
dc kv_latent, dr rope_dim, dq q_latent.

DeepSeek-V2/V3 as they run (HF transformers `DeepseekV3Attention`, `DeepseekV2Attention`): latent_norm true,
rope_layout interleaved, yarn_factor 40 with yarn_original_context 4096 (yarn_mscale and yarn_mscale_all_dim
1.0 for V3, 0.707 for V2). The defaults keep the simpler layer profiled before these options existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention_probe import softmax_read
from .base import Cost, LayerConfigError, LayerOptions, SequenceLayer
from .rope import apply_rope, cos_sin, deinterleave, rope_inv_freq, yarn_inv_freq, yarn_mscale

# Smallest capacity a latent cache grows to when `step` runs past it.
MIN_GROWN_CAPACITY = 16
# DeepSeek-V2/V3's latent RMSNorm epsilon (their attention builds the norms with it, not with rms_norm_eps).
LATENT_NORM_EPS = 1e-6


class MLAOptions(LayerOptions):
    kv_latent: int = Field(512, ge=1, description="d_c: width of the cached latent c = W_dkv h (DeepSeek-V2: 512)")
    rope_dim: int = Field(64, ge=0, description="d_rope: width of the decoupled RoPE part of q and of the shared "
                                                "RoPE key (DeepSeek-V2: 64); even, 0 = no positional encoding")
    q_latent: int | None = Field(None, ge=1, description="d_q: queries through their own latent W_uq W_dq h "
                                                         "(DeepSeek-V2: 1536); None = direct projection")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    latent_norm: bool = Field(False, description="RMSNorm (learned scale, eps 1e-6) on the kv latent c "
                                                 "before it is cached and on the query latent "
                                                 "(DeepSeek-V2/V3: true)")
    rope_layout: Literal["rotate_half", "interleaved"] = Field(
        "rotate_half", description="RoPE channel pairs of q_rope and the RoPE key: (i, i + dr/2) or "
                                   "(2i, 2i+1) (DeepSeek-V2/V3 checkpoints: interleaved)")
    yarn_factor: float | None = Field(None, ge=1, description="YaRN context-extension factor s of the "
                                                              "RoPE frequencies (DeepSeek-V2/V3: 40); "
                                                              "None = plain RoPE")
    yarn_original_context: int = Field(4096, ge=1, description="YaRN: context length the model was "
                                                               "pretrained at (DeepSeek-V2/V3: 4096)")
    yarn_mscale: float = Field(1.0, ge=0, description="YaRN: RoPE cos/sin times m(s, yarn_mscale) / "
                                                      "m(s, yarn_mscale_all_dim), m(s, a) = 0.1 a ln s + 1 "
                                                      "(DeepSeek-V3: 1.0, V2: 0.707)")
    yarn_mscale_all_dim: float = Field(1.0, ge=0, description="YaRN: softmax scale times m(s, "
                                                              "yarn_mscale_all_dim)^2 (DeepSeek-V3: 1.0, "
                                                              "V2: 0.707)")


@dataclass
class LatentCache:
    """Decode state: ckv[B, cap, dc + dr] preallocated, slot p holding position p as [c_p, rope(k_rope_p)]
    (shared by all heads), and `length` tokens seen. Nothing per head is cached."""

    ckv: torch.Tensor
    length: int


class MultiHeadLatentAttention(SequenceLayer):
    """Multi-head latent attention (DeepSeek-V2 MLA): K, V up-projected from a small latent, absorbed decode.

    A dc-wide latent plus a RoPE key shared by all heads; decode caches dc + dr values per token.

    Per token h[D]: [c, k_r] = W_dkv h (dc + dr, one projection), k_h = [W_uk,h c, rope(k_r)],
    v_h = W_uv,h c, q_h = [q_nope_h, rope(q_rope_h)] from W_q h (or W_uq W_dq h with q_latent);
    o = W_o [softmax(q_h k_h^T / sqrt(dh + dr) + causal) v_h]_h. No bias. With latent_norm, c (before it is
    cached) and the query latent W_dq h pass an RMSNorm, as in DeepSeek-V2/V3; per token, they change neither
    the cache size nor the decode algebra. rope_layout interleaved de-interleaves q_rope and k_r before a
    rotate-half RoPE (the same rotation as DeepSeek's interleaved pairs). With yarn_factor s, the RoPE
    frequencies are YaRN's (rope.yarn_inv_freq), cos/sin are scaled by m(s, yarn_mscale) / m(s,
    yarn_mscale_all_dim) and the softmax scale by m(s, yarn_mscale_all_dim)^2 (DeepSeek's mscale).

    Prefill/forward (non-absorbed): q, k [B, H, T, dh + dr], v [B, H, T, dh] through SDPA. The qk head dim
    differs from the v head dim: torch's flash backend needs them equal, so on CUDA fp16/bf16 v is zero-padded
    to dh + dr and the output sliced (`sdpa-flash-vpad`); on CPU the same padding lets SDPA use its CPU flash
    kernel instead of the T x T math backend (`sdpa-vpad`); otherwise (CUDA fp32, or flash refused) SDPA picks
    the efficient or math backend, which take a differing v dim (`sdpa`). rope_dim 0 needs no padding.
    Decode (absorbed): W_uk is folded into the query, q_abs_h = W_uk,h^T q_nope_h [dc], so the scores are
    [q_abs_h, rope(q_rope_h)] . [c_p, rope(k_r,p)] read straight off the latent cache; the heads become H queries
    of one shared key/value head ([B, 1, H, dc + dr] against [B, 1, n, dc + dr], values the first dc columns),
    and W_uv is applied after the weighted sum: o_h = W_uv,h (sum_p a_hp c_p).

    Cost model (FLOPs and bytes; el bytes per element, Wq = H*(dh+dr), S(T) = T(T+1)/2 causal pairs):
    - projections per token: q: 2*D*Wq (or 2*D*dq + 2*dq*Wq), kv down: 2*D*(dc+dr), forward-only up
      projections k, v: 4*dc*H*dh, output: 2*H*dh*D.
      RMSNorms and RoPE are O(dc + dq + H*dr) per token and left out.
    - fwd:  flops = B*T*proj + attn, attn = 2*B*H*S(T)*(dh+dr) + 2*B*H*S(T)*dh (QK^T and PV);
            bytes = weights + 2*B*T*D*el + 2*B*T*el*(2*Wq + 2*H*dh + dc + dr) (q, k, v, o and the latent
            written once and read once) + 2*B*T*el*(dc + dq) with latent_norm (the normed latents; dq = 0
            without q_latent).
    - bwd: 3 * fwd projection flops + 3.5 * attn; bytes 3 * fwd bytes (an estimate).
    - decode at context seq (n = seq + 1 keys): flops = B*(q proj + 2*D*(dc+dr) + 4*H*dh*dc (absorb in and
            out) + 2*H*dh*D) + 2*B*H*n*(dc+dr) + 2*B*H*n*dc;
            bytes = weights + latent cache read B*n*(dc+dr)*el + its write B*(dc+dr)*el + 2*B*D*el.
    """

    kind = "softmax"
    Options = MLAOptions
    supports_cuda_graph = False  # the step takes a Python int position into the RoPE table

    def __init__(self, d_model: int, heads: int, head_dim: int, options: MLAOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        opts = self.options
        if opts.rope_dim % 2:
            raise LayerConfigError("rope_dim", "must be even (RoPE rotates channel pairs)", opts.rope_dim,
                                   "an even integer >= 0, e.g. 64")
        self.kv_latent, self.rope_dim = opts.kv_latent, opts.rope_dim
        H, dh, dc, dr = heads, head_dim, opts.kv_latent, opts.rope_dim
        q_width = H * (dh + dr)
        if opts.q_latent is None:
            self.q_proj = nn.Linear(d_model, q_width, bias=False)
        else:
            q_norm = [nn.RMSNorm(opts.q_latent, eps=LATENT_NORM_EPS)] if opts.latent_norm else []
            self.q_proj = nn.Sequential(nn.Linear(d_model, opts.q_latent, bias=False), *q_norm,
                                        nn.Linear(opts.q_latent, q_width, bias=False))
        self.kv_down = nn.Linear(d_model, dc + dr, bias=False)  # [c, k_rope]
        self.kv_norm = nn.RMSNorm(dc, eps=LATENT_NORM_EPS) if opts.latent_norm else None
        self.k_up = nn.Linear(dc, H * dh, bias=False)
        self.v_up = nn.Linear(dc, H * dh, bias=False)
        self.o_proj = nn.Linear(H * dh, d_model, bias=False)
        self.scale = 1.0 / math.sqrt(dh + dr)
        self.rope_scale = 1.0  # cos, sin multiplier
        if opts.yarn_factor is None:
            self._inv_freq = rope_inv_freq(dr, opts.rope_theta)
        else:
            s = opts.yarn_factor
            self._inv_freq = yarn_inv_freq(dr, opts.rope_theta, s, opts.yarn_original_context)
            self.rope_scale = yarn_mscale(s, opts.yarn_mscale) / yarn_mscale(s, opts.yarn_mscale_all_dim)
            self.scale *= yarn_mscale(s, opts.yarn_mscale_all_dim) ** 2
        self._impl: str | None = None
        self._flash_failed = False

    # --- shared pieces -------------------------------------------------------------------------------
    def _queries(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x[B, T, D] at positions start.. -> q_nope[B, H, T, dh], q_rope[B, H, T, dr] (rotated)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.head_dim, self.rope_dim], dim=-1)
        return q_nope, self._rotate(q_rope, start)

    def _latents(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x[B, T, D] -> ckv[B, T, dc + dr]: the latent c and the rotated shared RoPE key, as cached."""
        ckv = self.kv_down(x)
        c, k_rope = ckv.split([self.kv_latent, self.rope_dim], dim=-1)
        if self.kv_norm is not None:
            c = self.kv_norm(c)
        return torch.cat([c, self._rotate(k_rope, start)], dim=-1)

    def _rotate(self, t: torch.Tensor, start: int) -> torch.Tensor:
        """RoPE on t[..., T, dr] for positions start..start+T-1 (interleaved pairs come out in rotate-half
        order, for q and k alike)."""
        if self.rope_dim == 0:
            return t
        if self._inv_freq.device != t.device:  # moved once: the frequencies stay float64 whatever the dtype
            self._inv_freq = self._inv_freq.to(t.device)
        pos = torch.arange(start, start + t.shape[-2], device=t.device)
        cos, sin = cos_sin(pos, self._inv_freq, t.dtype, self.rope_scale)
        if self.options.rope_layout == "interleaved":
            t = deinterleave(t)
        return apply_rope(t, cos, sin)

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        """o[B, H, T, dh] -> y[B, T, D]."""
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    # --- forward (non-absorbed) ----------------------------------------------------------------------
    def _full_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x[B, T, D] -> q, k [B, H, T, dh + dr], v [B, H, T, dh], ckv [B, T, dc + dr]."""
        B, T, _ = x.shape
        H, dh = self.heads, self.head_dim
        q_nope, q_rope = self._queries(x, 0)
        ckv = self._latents(x, 0)
        c, k_rope = ckv.split([self.kv_latent, self.rope_dim], dim=-1)
        k_nope = self.k_up(c).view(B, T, H, dh).transpose(1, 2)
        v = self.v_up(c).view(B, T, H, dh).transpose(1, 2)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, H, T, self.rope_dim)], dim=-1)
        return torch.cat([q_nope, q_rope], dim=-1), k, v, ckv

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal SDPA with qk head dim dh + dr and v head dim dh -> o[B, H, T, dh]."""
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not self._flash_failed:
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    v_pad = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
                    o = F.scaled_dot_product_attention(q, k, v_pad, is_causal=True, scale=self.scale)
                self._impl = "sdpa-flash-vpad"
                return o[..., : v.shape[-1]]
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError:
                self._flash_failed = True  # e.g. dh + dr > 256 or a pre-Ampere GPU
        if not q.is_cuda and v.shape[-1] != q.shape[-1]:
            # torch's CPU flash kernel also needs equal head dims; without it SDPA's math backend builds T x T
            v_pad = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
            o = F.scaled_dot_product_attention(q, k, v_pad, is_causal=True, scale=self.scale)
            self._impl = "sdpa-vpad"
            return o[..., : v.shape[-1]]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        self._impl = "sdpa"
        return o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, T, D] -> y[B, T, D]."""
        q, k, v, _ = self._full_qkv(x)
        return self._output(self._attend(q, k, v))

    # --- decode (absorbed) ---------------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, LatentCache]:
        """Run the prompt x[B, T, D] non-absorbed; return y[B, T, D] and a latent cache of `capacity` slots
        (default T)."""
        B, T, _ = x.shape
        q, k, v, ckv = self._full_qkv(x)
        y = self._output(self._attend(q, k, v))
        cache = ckv.new_zeros(B, max(capacity or T, T), self.kv_latent + self.rope_dim)
        with torch.no_grad():
            cache[:, :T] = ckv
        return y, LatentCache(cache, T)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: LatentCache) -> tuple[torch.Tensor, LatentCache]:
        """Consume x_t[B, 1, D] in absorbed form; return y_t[B, 1, D] and the state one token longer.

        Writes the new latent into slot `length` (beyond what the input state holds), growing a full cache into
        a new copy, so repeating a call with the same state gives the same result.
        """
        B = x_t.shape[0]
        H, dh, dc = self.heads, self.head_dim, self.kv_latent
        cache, pos = state.ckv, state.length
        if pos >= cache.shape[1]:
            grown = cache.new_zeros(B, max(2 * cache.shape[1], MIN_GROWN_CAPACITY), cache.shape[2])
            grown[:, : cache.shape[1]] = cache
            cache = grown
        cache[:, pos] = self._latents(x_t, pos)[:, 0]
        q_nope, q_rope = self._queries(x_t, pos)  # [B, H, 1, dh], [B, H, 1, dr]
        w_uk = self.k_up.weight.view(H, dh, dc)
        q_abs = torch.einsum("bhd,hdc->bhc", q_nope[:, :, 0], w_uk)  # W_uk folded into the query
        q_lat = torch.cat([q_abs, q_rope[:, :, 0]], dim=-1).unsqueeze(1)  # [B, 1, H, dc + dr]: H queries
        kv = cache[:, : pos + 1].unsqueeze(1)  # [B, 1, n, dc + dr], one head shared by all query heads
        ctx = F.scaled_dot_product_attention(q_lat, kv, kv[..., :dc], scale=self.scale)  # [B, 1, H, dc]
        w_uv = self.v_up.weight.view(H, dh, dc)
        o = torch.einsum("bhc,hdc->bhd", ctx[:, 0], w_uv)  # W_uv applied after the weighted sum
        self._impl = "absorbed-sdpa"
        return self._output(o.unsqueeze(2)), LatentCache(cache, pos + 1)

    def state_bytes(self, batch: int, seq: int) -> int:
        """batch * seq * (dc + dr) * el: the latent cache, shared by all heads."""
        return batch * seq * (self.kv_latent + self.rope_dim) * self.element_size

    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Associative-memory probe (SequenceLayer.probe_memory): with identity projections the core of MLA is
        softmax attention over every written key, softmax(q k^T / sqrt(dk)) V (the latent is the key and the
        value; the decoupled RoPE part carries position only and is left out). keys[B, H, N, dk],
        values[B, H, N, dv], queries[B, H, M, dk] -> reads[B, H, M, dv] in float32 (float64 stays float64)."""
        return softmax_read(keys, values, queries)

    # --- cost model (see the class docstring) --------------------------------------------------------
    def _q_proj_flops(self) -> int:
        wq = self.heads * (self.head_dim + self.rope_dim)
        dq = self.options.q_latent
        return 2 * self.d_model * wq if dq is None else 2 * self.d_model * dq + 2 * dq * wq

    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        B, T, D, H, dh = batch, seq, self.d_model, self.heads, self.head_dim
        dc, dr = self.kv_latent, self.rope_dim
        el, weights = self.element_size, self.weight_bytes()
        wq = H * (dh + dr)
        if mode in ("fwd", "bwd"):
            pairs = T * (T + 1) // 2
            proj = B * T * (self._q_proj_flops() + 2 * D * (dc + dr) + 4 * dc * H * dh + 2 * H * dh * D)
            attn = 2 * B * H * pairs * (dh + dr) + 2 * B * H * pairs * dh
            io_bytes = weights + 2 * B * T * D * el + 2 * B * T * el * (2 * wq + 2 * H * dh + dc + dr)
            if self.options.latent_norm:
                io_bytes += 2 * B * T * el * (dc + (self.options.q_latent or 0))
            if mode == "fwd":
                return Cost(float(proj + attn), float(io_bytes))
            return Cost(float(3 * proj + 3.5 * attn), float(3 * io_bytes))
        if mode == "decode":
            n = seq + 1
            proj = B * (self._q_proj_flops() + 2 * D * (dc + dr) + 4 * H * dh * dc + 2 * H * dh * D)
            attn = 2 * B * H * n * (dc + dr) + 2 * B * H * n * dc
            nbytes = weights + B * n * (dc + dr) * el + B * (dc + dr) * el + 2 * B * D * el
            return Cost(float(proj + attn), float(nbytes))
        raise ValueError(f"unknown mode {mode!r}; allowed: fwd, bwd, decode")

    def implementation(self) -> str:
        """`sdpa-flash-vpad`, `sdpa-vpad` or `sdpa` (prefill/forward), `absorbed-sdpa` (decode): what the
        latest call ran; before any call, what forward expects to run on the layer's device."""
        if self._impl is not None:
            return self._impl
        if self.rope_dim == 0:
            return "sdpa"
        if self.device.type == "cuda":
            return "sdpa-flash-vpad" if self.dtype in (torch.float16, torch.bfloat16) else "sdpa"
        return "sdpa-vpad"
