"""Compressed convolutional attention, CCA and CCGQA (Zyphra, arXiv 2510.04476): attention entirely in a
latent space C times narrower than the model's heads, with short causal convolutions on q and k, a q-k mean
residual, a half-channel value shift and L2-normalised q, k with a learned temperature.

Shapes: B batch, T length, D d_model, H heads, C compression, Hl = H / C latent query heads, G latent kv
heads (CCA: G = Hl; CCGQA: G < Hl), dh head_dim (kept: the latent narrows the head count, as in ZAYA1),
Cqk = (Hl + G) * dh conv channels, L = (kernel_size - 1) + (channel_kernel_size - 1) conv tail, Sv the value
channels taken from the previous token (G * (dh//2) per_head, G*dh//2 whole_heads).

ZAYA1 as it runs (HF transformers `ZayaAttention`; 8 latent query heads, 2 kv heads: ccgqa): rope_fraction
0.5, rope_theta 5e6, value_shift whole_heads, temperature_init 0. The defaults keep the layer profiled before
these options existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .attention_probe import probe_dtype, softmax_read
from .base import Cost, LayerConfigError, LayerOptions, SequenceLayer
from .rope import apply_rope, rope_cos_sin

MIN_GROWN_CAPACITY = 16


class CCAOptions(LayerOptions):
    compression: int = Field(2, ge=1, description="C: latent query heads = heads / C (must divide heads); q, k, v "
                                                  "are down-projected to heads/C * head_dim channels")
    kv_heads: int | None = Field(None, ge=1, description="latent kv heads G: None = heads / C (CCA); fewer = "
                                                          "CCGQA kv sharing in the latent; must divide heads / C")
    kernel_size: int = Field(2, ge=1, description="taps of the first conv: depthwise, causal along time")
    channel_kernel_size: int = Field(2, ge=1, description="taps along time of the second conv: grouped per head, "
                                                          "mixing the channels within each q or k head")
    rope: bool = Field(True, description="RoPE on the normalised latent q and k (ZAYA1 applies it)")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (ZAYA1: 5e6)")
    rope_fraction: float = Field(1.0, gt=0, le=1, description="share of head_dim RoPE rotates, the first "
                                                              "channels, rounded down to an even width "
                                                              "(ZAYA1: 0.5)")
    value_shift: Literal["per_head", "whole_heads"] = Field(
        "per_head", description="which value channels come from the previous token: the last dh//2 of every "
                                "head (the paper) or the second half of the concatenated G*dh vector, so "
                                "whole heads are current or delayed when G is even (ZAYA1)")
    temperature_init: float = Field(1.0, description="initial learned key temperature (per kv head; ZAYA1: "
                                                     "0, which attends uniformly until trained)")


class CCGQAOptions(CCAOptions):
    kv_heads: int | None = Field(2, ge=1, description="latent kv heads G shared by heads / C query heads "
                                                       "(ZAYA1: 2); must divide heads / C; None = heads / C")


@dataclass
class CCAState:
    """Decode state: latent k, v [B, G, cap, dh] preallocated (slots 0..length-1 = positions), qk_tail
    [B, Cqk, L] the last L pre-conv q|k projections (zeros before position 0), v_prev [B, Sv] the
    previous token's shifted-value projection (zeros before position 0), and `length` tokens seen."""

    k: torch.Tensor
    v: torch.Tensor
    qk_tail: torch.Tensor
    v_prev: torch.Tensor
    length: int


class CompressedConvAttention(SequenceLayer):
    """Compressed convolutional attention (CCA): causal softmax attention in a latent of heads/C heads.

    CCGQA when kv_heads < heads/C; q and k mixed by two short causal convs, values half shifted by one token.

    Recipe (following HF transformers `models/zaya`, ZAYA1), per token x_t[D]:
    1. q = W_q x [Hl*dh], k = W_k x [G*dh] (the down-projection into the latent).
    2. mean residual: r_q = (q + k repeated to Hl heads) / 2 per head, r_k = mean of r_q over the Hl/G query
       heads of each kv head (the mean of pre-conv q and k, added to both after the convs).
    3. convs on the concatenation [q, k] (Cqk channels), causal in time (left zero padding of L positions):
       a depthwise conv with `kernel_size` taps, then a grouped conv with Hl + G groups (one per q or k head,
       so it mixes the dh channels of a head) with `channel_kernel_size` taps; both with bias. q, k = conv + r.
    4. q, k L2-normalised to norm sqrt(dh), k times a learned per-kv-head temperature tau (init
       temperature_init = 1; HF zaya inits it to 0, which loaded checkpoints overwrite but which would make an
       untrained layer attend uniformly), then RoPE (option rope, base rope_theta) on the first rope_fraction
       of the head dim (the rest passes through; ZAYA1 rotates half with base 5e6).
    5. value shift: value_shift per_head: in every value head the first dh - dh//2 channels are W_vc x_t and
       the last dh//2 are W_vp x_{t-1} (zeros at t = 0), the paper's description; whole_heads: the
       concatenated G*dh value vector is [W_vc x_t, W_vp x_{t-1}] with G*dh//2 delayed channels, as HF zaya
       does, so with G even whole heads are current or delayed (with G = 1 both are the same).
    6. o = causal SDPA over the latent (scale 1/sqrt(dh), so logits are sqrt(dh) * tau * cos(q, k)), then
       W_o: Hl*dh -> D. No projection bias.
    Decode caches the latent K and V (2*G*dh per token), the L-column conv tail and v_prev (Sv).

    Cost model (FLOPs and bytes; el bytes per element, S(T) = T(T+1)/2):
    - per token: proj = 2*D*(Hl+G)*dh + 2*D*G*dh + 2*Hl*dh*D; conv = 2*Cqk*kernel_size +
      2*Cqk*dh*channel_kernel_size (residual, norms and RoPE left out as O(Cqk)).
    - fwd:  flops = B*T*(proj + conv) + 4*B*Hl*dh*S(T);
            bytes = weights + 2*B*T*D*el + 2*B*T*el*(3*Cqk + (2*Hl + 2*G)*dh) (q|k raw, after each conv, and
            q, k, v, o, each written once and read once).
    - bwd: 3 * fwd (proj + conv) + 3.5 * attn; bytes 3 * fwd bytes (an estimate).
    - decode at context seq (n = seq + 1): flops = B*(proj + conv) + 4*B*Hl*dh*n;
            bytes = weights + 2*B*G*n*dh*el (K, V read) + 2*B*G*dh*el (written) + 2*B*Cqk*L*el (tail) +
            2*B*Sv*el (v_prev) + 2*B*D*el.
    """

    kind = "softmax"
    Options = CCAOptions
    supports_cuda_graph = False  # the step takes a Python int position into the RoPE table

    def __init__(self, d_model: int, heads: int, head_dim: int, options: CCAOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        opts = self.options
        if heads % opts.compression != 0:
            raise LayerConfigError("compression", f"must divide heads={heads}", opts.compression,
                                   "a divisor of heads: " + ", ".join(map(str, _divisors(heads))))
        latent = heads // opts.compression
        kv = latent if opts.kv_heads is None else opts.kv_heads
        if latent % kv != 0:
            raise LayerConfigError("kv_heads", f"must divide the latent query heads heads/compression={latent}",
                                   opts.kv_heads, "a divisor of heads/compression: "
                                   + ", ".join(map(str, _divisors(latent))))
        self.latent_heads, self.kv_heads = latent, kv
        dh = head_dim
        self.shift_dim = dh // 2  # per_head: channels of each value head taken from the previous token
        # Sv: channels of the concatenated G*dh value vector taken from the previous token
        self.shifted_width = kv * self.shift_dim if opts.value_shift == "per_head" else kv * dh // 2
        rotated = int(dh * opts.rope_fraction) if opts.rope else 0
        self.rope_width = rotated - rotated % 2
        self.qk_channels = (latent + kv) * dh
        self.tail = (opts.kernel_size - 1) + (opts.channel_kernel_size - 1)
        self.q_proj = nn.Linear(d_model, latent * dh, bias=False)
        self.k_proj = nn.Linear(d_model, kv * dh, bias=False)
        self.v_current = nn.Linear(d_model, kv * dh - self.shifted_width, bias=False)
        self.v_shifted = nn.Linear(d_model, self.shifted_width, bias=False)
        c = self.qk_channels
        self.conv_time = nn.Conv1d(c, c, opts.kernel_size, groups=c)
        self.conv_head = nn.Conv1d(c, c, opts.channel_kernel_size, groups=latent + kv)
        self.temperature = nn.Parameter(torch.full((kv,), float(opts.temperature_init)))
        self.o_proj = nn.Linear(latent * dh, d_model, bias=False)

    # --- q, k, v in the latent -----------------------------------------------------------------------
    def _qk(self, x: torch.Tensor, tail: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x[B, T, D] after the conv tail[B, Cqk, L], positions start.. -> q[B, Hl, T, dh], k[B, G, T, dh]
        (convolved, residual added, normalised, tempered, rotated) and the new tail [B, Cqk, L]."""
        B, T, _ = x.shape
        Hl, G, dh = self.latent_heads, self.kv_heads, self.head_dim
        q_raw, k_raw = self.q_proj(x), self.k_proj(x)
        q_heads = q_raw.view(B, T, Hl, dh)
        r_q = (q_heads + k_raw.view(B, T, G, 1, dh).expand(B, T, G, Hl // G, dh).reshape(B, T, Hl, dh)) / 2
        r_k = r_q.view(B, T, G, Hl // G, dh).mean(dim=3)
        seq = torch.cat([tail, torch.cat([q_raw, k_raw], dim=-1).transpose(1, 2)], dim=-1)  # [B, Cqk, L + T]
        # contiguous channels: q and k must end up with unit stride in dh or SDPA falls back to its math backend
        mixed = self._conv_head(self._conv_time(seq)).transpose(1, 2).contiguous()  # [B, T, Cqk]
        q = mixed[..., : Hl * dh].reshape(B, T, Hl, dh) + r_q
        k = mixed[..., Hl * dh:].reshape(B, T, G, dh) + r_k
        scale = math.sqrt(dh)
        eps = torch.finfo(q.dtype).eps
        q = q * (scale / q.norm(dim=-1, keepdim=True).clamp_min(eps))
        k = k * (scale / k.norm(dim=-1, keepdim=True).clamp_min(eps)) * self.temperature.view(1, 1, G, 1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.rope_width:
            pos = torch.arange(start, start + T, device=x.device)
            cos, sin = rope_cos_sin(pos, self.rope_width, self.options.rope_theta, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, seq[..., seq.shape[-1] - self.tail:]

    def _conv_time(self, seq: torch.Tensor) -> torch.Tensor:
        """Depthwise valid conv of seq[B, Cqk, n] -> [B, Cqk, n - kernel_size + 1], as F.conv1d with the
        weights of `conv_time`, written as a loop over the few taps (CPU oneDNN convs of this shape cost
        milliseconds per call and a second on first use; the taps are elementwise)."""
        w, K = self.conv_time.weight[:, 0], self.conv_time.kernel_size[0]  # w[Cqk, K]
        n = seq.shape[-1] - K + 1
        out = self.conv_time.bias[:, None] + w[:, 0, None] * seq[..., :n]
        for j in range(1, K):
            out = out + w[:, j, None] * seq[..., j:j + n]
        return out

    def _conv_head(self, seq: torch.Tensor) -> torch.Tensor:
        """Grouped valid conv (one group per q or k head, mixing its dh channels) of seq[B, Cqk, n] ->
        [B, Cqk, n - channel_kernel_size + 1], as F.conv1d with the weights of `conv_head`, one batched
        matmul per tap."""
        B, c, _ = seq.shape
        groups, dh, K = self.latent_heads + self.kv_heads, self.head_dim, self.conv_head.kernel_size[0]
        n = seq.shape[-1] - K + 1
        w = self.conv_head.weight.view(groups, dh, dh, K)  # [group, out, in, tap]
        x = seq.view(B, groups, dh, -1)
        out = self.conv_head.bias.view(1, groups, dh, 1)
        for j in range(K):
            out = out + torch.einsum("goi,bgit->bgot", w[..., j], x[..., j:j + n])
        return out.reshape(B, c, n)

    def _v(self, x: torch.Tensor, v_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x[B, T, D] after the previous token's shifted projection v_prev[B, Sv] -> v[B, G, T, dh] and the
        new v_prev (of the last token)."""
        B, T, _ = x.shape
        G, dh, s = self.kv_heads, self.head_dim, self.shift_dim
        shifted = self.v_shifted(x)  # [B, T, Sv]
        delayed = torch.cat([v_prev.unsqueeze(1), shifted[:, :-1]], dim=1)
        if self.options.value_shift == "per_head":
            v = torch.cat([self.v_current(x).view(B, T, G, dh - s), delayed.view(B, T, G, s)], dim=-1)
        else:
            v = torch.cat([self.v_current(x), delayed], dim=-1).view(B, T, G, dh)
        return v.transpose(1, 2), shifted[:, -1]

    def _initial_state_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        tail = x.new_zeros(B, self.qk_channels, self.tail)
        return tail, x.new_zeros(B, self.shifted_width)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        gqa = self.kv_heads < self.latent_heads
        if q.is_cuda and gqa:  # fused CUDA backends refuse enable_gqa: repeat rather than fall back to math
            rep = self.latent_heads // self.kv_heads
            k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.latent_heads * self.head_dim))

    # --- forward and decode --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, T, D] -> y[B, T, D]."""
        tail0, v_prev0 = self._initial_state_parts(x)
        q, k, _ = self._qk(x, tail0, 0)
        v, _ = self._v(x, v_prev0)
        return self._output(self._attend(q, k, v, causal=True))

    def prefill(self, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, CCAState]:
        """Run the prompt x[B, T, D]; return y[B, T, D] and the latent KV cache (capacity slots, default T)
        with the conv tail and v_prev."""
        B, T, _ = x.shape
        tail0, v_prev0 = self._initial_state_parts(x)
        q, k, tail = self._qk(x, tail0, 0)
        v, v_prev = self._v(x, v_prev0)
        y = self._output(self._attend(q, k, v, causal=True))
        cap = max(capacity or T, T)
        k_cache = k.new_zeros(B, self.kv_heads, cap, self.head_dim)
        v_cache = torch.zeros_like(k_cache)
        with torch.no_grad():
            k_cache[:, :, :T] = k
            v_cache[:, :, :T] = v
        return y, CCAState(k_cache, v_cache, tail.detach().clone(), v_prev.detach().clone(), T)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: CCAState) -> tuple[torch.Tensor, CCAState]:
        """Consume x_t[B, 1, D]; return y_t[B, 1, D] and the state one token longer. K, V are written into slot
        `length` (a full cache grows into a new copy); the tail and v_prev of the result are new tensors, so
        repeating a call with the same state gives the same result."""
        pos = state.length
        q, k, tail = self._qk(x_t, state.qk_tail, pos)
        v, v_prev = self._v(x_t, state.v_prev)
        k_cache, v_cache = state.k, state.v
        if pos >= k_cache.shape[2]:
            k_cache, v_cache = _grow(k_cache, pos), _grow(v_cache, pos)
        k_cache[:, :, pos] = k[:, :, 0]
        v_cache[:, :, pos] = v[:, :, 0]
        o = self._attend(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1], causal=False)
        return self._output(o), CCAState(k_cache, v_cache, tail.clone(), v_prev.clone(), pos + 1)

    def state_bytes(self, batch: int, seq: int) -> int:
        """(2*batch*G*seq*dh + batch*Cqk*L + batch*Sv) * el: latent K, V, conv tail, v_prev."""
        G, dh = self.kv_heads, self.head_dim
        elements = 2 * batch * G * seq * dh + batch * (self.qk_channels * self.tail + self.shifted_width)
        return elements * self.element_size

    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Associative-memory probe (SequenceLayer.probe_memory) of the latent core with identity projections
        and no convs, residual or value shift (they depend on learned weights): q, k L2-normalised to norm
        sqrt(dk), keys times the default temperature (temperature_init), softmax(q k^T / sqrt(dk)) V, i.e.
        logits sqrt(dk) * tau * cos(q, k). No RoPE (positions carry no content in the probe).
        keys[B, H, N, dk], values[B, H, N, dv], queries[B, H, M, dk] -> reads[B, H, M, dv] in float32
        (float64 stays float64)."""
        dt = probe_dtype(keys.dtype)
        dk = keys.shape[-1]
        k = F.normalize(keys.to(dt), dim=-1) * (math.sqrt(dk) * self.options.temperature_init)
        q = F.normalize(queries.to(dt), dim=-1) * math.sqrt(dk)
        return softmax_read(k, values.to(dt), q)

    # --- cost model (see the class docstring) --------------------------------------------------------
    def _per_token_flops(self) -> int:
        D, Hl, G, dh, c = self.d_model, self.latent_heads, self.kv_heads, self.head_dim, self.qk_channels
        proj = 2 * D * (Hl + G) * dh + 2 * D * G * dh + 2 * Hl * dh * D
        conv = 2 * c * self.options.kernel_size + 2 * c * dh * self.options.channel_kernel_size
        return proj + conv

    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        B, T, D, Hl, G, dh, c = batch, seq, self.d_model, self.latent_heads, self.kv_heads, self.head_dim, \
            self.qk_channels
        el, weights = self.element_size, self.weight_bytes()
        if mode in ("fwd", "bwd"):
            proj = B * T * self._per_token_flops()
            attn = 4 * B * Hl * dh * (T * (T + 1) // 2)
            io_bytes = weights + 2 * B * T * D * el + 2 * B * T * el * (3 * c + (2 * Hl + 2 * G) * dh)
            if mode == "fwd":
                return Cost(float(proj + attn), float(io_bytes))
            return Cost(float(3 * proj + 3.5 * attn), float(3 * io_bytes))
        if mode == "decode":
            n = seq + 1
            flops = B * self._per_token_flops() + 4 * B * Hl * dh * n
            nbytes = (weights + 2 * B * G * n * dh * el + 2 * B * G * dh * el + 2 * B * c * self.tail * el
                      + 2 * B * self.shifted_width * el + 2 * B * D * el)
            return Cost(float(flops), float(nbytes))
        raise ValueError(f"unknown mode {mode!r}; allowed: fwd, bwd, decode")

    def implementation(self) -> str:
        return "sdpa-latent"


class CompressedConvGQA(CompressedConvAttention):
    """CCGQA: compressed convolutional attention with kv-head sharing in the latent (default 2 kv heads)."""

    Options = CCGQAOptions


def _grow(cache: torch.Tensor, length: int) -> torch.Tensor:
    """A copy of cache[B, G, cap, dh] with max(2*cap, 16) slots holding its first `length`; input untouched."""
    grown = cache.new_zeros(*cache.shape[:2], max(2 * cache.shape[2], MIN_GROWN_CAPACITY), cache.shape[3])
    grown[:, :, :length] = cache[:, :, :length]
    return grown


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
