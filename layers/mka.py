"""MKA and FastMKA (arXiv 2603.20586, "MKA: Memory-Keyed Attention for Efficient Long-Context Reasoning"):
causal attention over memory levels of the input, mixed per token by a learned router.

Shapes: B batch, T length, D d_model, H heads, dh head_dim, V memory levels (2: L1 = x, L2 = EMA of x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import Cost, LayerConfigError, LayerOptions, SequenceLayer

LEVELS = 2  # L1 local (x itself) and L2 session summary (causal EMA of x)
# Chunk of the EMA scan: a C x C decay matrix per chunk, then a recurrence over chunk ends as an N x N matrix.
EMA_CHUNK = 64
# Smallest capacity a KV cache grows to when `step` runs past it.
MIN_GROWN_CAPACITY = 16


class MKAOptions(LayerOptions):
    beta: float = Field(0.9, gt=0.0, lt=1.0,
                        description="EMA decay of the L2 memory: m_t = beta m_(t-1) + (1 - beta) x_t")
    router_hidden: int = Field(64, ge=1, description="hidden width of the router MLP softmax(MLP(q_t))")
    retrieval: bool = Field(False, description="L3 retrieved memory: not implemented, must stay false")


@dataclass
class MKACache:
    """Decode state: k, v [V', B, H, cap, dh] preallocated KV caches (V' = 2 levels for MKA, 1 mixed input
    for FastMKA), slots 0..length-1 filled; ema[B, D] the L2 memory after the last token (float32 for
    fp16/bf16), carried across calls."""

    k: torch.Tensor
    v: torch.Tensor
    ema: torch.Tensor
    length: int


def causal_ema(x: torch.Tensor, beta: float, m0: torch.Tensor | None = None) -> torch.Tensor:
    """m_t = beta m_(t-1) + (1 - beta) x_t with m_(-1) = m0 (default 0): x[B, T, D] -> m[B, T, D].

    Chunked, no Python loop over tokens or chunks: inside a chunk of C tokens a lower-triangular matrix of
    (1 - beta) beta^(i-j); across chunks the chunk-end values decay by beta^C per chunk, an N x N matrix.
    Only powers of beta <= 1 appear (no division), so long sequences cannot overflow.
    """
    B, T, D = x.shape
    C = min(EMA_CHUNK, T)
    N = -(-T // C)
    xc = F.pad(x, (0, 0, 0, N * C - T)).view(B, N, C, D)
    i = torch.arange(C, device=x.device)
    lag = (i.view(C, 1) - i.view(1, C)).to(x.dtype)
    inner = torch.where(lag >= 0, (1.0 - beta) * beta ** lag.clamp_min(0), torch.zeros((), dtype=x.dtype,
                                                                                         device=x.device))
    local = inner @ xc  # [B, N, C, D]: the EMA inside each chunk, starting from 0
    n = torch.arange(N, device=x.device)
    gap = (n.view(N, 1) - 1 - n.view(1, N)).to(x.dtype)  # chunk n sees the end of chunk j < n after n-1-j chunks
    across = torch.where(gap >= 0, (beta ** C) ** gap.clamp_min(0), torch.zeros((), dtype=x.dtype, device=x.device))
    carry = torch.einsum("nj,bjd->bnd", across, local[:, :, C - 1])  # m at the end of chunk n-1
    if m0 is not None:
        carry = carry + (beta ** C) ** n.to(x.dtype).view(1, N, 1) * m0.unsqueeze(1)
    m = local + beta ** (i + 1).to(x.dtype).view(1, 1, C, 1) * carry.unsqueeze(2)
    return m.reshape(B, N * C, D)[:, :T]


class MKA(SequenceLayer):
    """MKA: one causal attention per memory level (L1 = x, L2 = causal EMA of x), outputs mixed by a router.

    q = x W_q, router lambda_t = softmax(W_2 silu(W_1 q_t + b_1) + b_2) over the V = 2 levels (per token,
    shared by the heads); level l gives keys and values level_l W_k, level_l W_v (projections shared by the
    levels), o_l = causal SDPA(q, K_l, V_l), o = sum_l lambda_l o_l, y = o W_o. Projections have no bias, scale
    1/sqrt(dh), no positional encoding. The L3 retrieved memory of the paper is not implemented (option
    `retrieval` must stay false). The EMA runs in float32 for fp16/bf16 and its state is carried across decode
    calls (the official HF decode path resets it every call; that would make decode differ from forward).

    Cost model (el = bytes per element, ea = accumulation element bytes, A = attentions: 2 for MKA, 1 for
    FastMKA, P = per-token projection FLOPs = 2*D*H*dh (q) + A*4*D*H*dh (k, v) + 2*H*dh*D (o)
    + 2*(H*dh*R + R*V) (router, R = router_hidden) + 3*D (EMA) + 2*V*(H*dh for MKA, D for FastMKA) (mixing)):
    - fwd:  flops = B*T*P + A*4*B*H*dh*T(T+1)/2;
            bytes = weights + 2*B*T*D*el + EMA written and read 2*B*T*D*ea + q, o written and read
                    4*B*T*H*dh*el + k, v (and per-level o for MKA) written and read A*(4 + 2[MKA])*B*T*H*dh*el.
    - bwd:  flops = 3*proj + 3.5*attn; bytes = 3 * fwd bytes (an estimate), as for softmax attention.
    - decode (one step at context seq, n = seq + 1 keys): flops = B*P + A*4*B*H*dh*n;
            bytes = weights + A*2*B*H*n*dh*el (caches read, new k, v included) + EMA read and written
                    2*B*D*ea + x_t, y_t 2*B*D*el.
    """

    kind = "mka"
    Options = MKAOptions
    supports_cuda_graph = True  # as for the softmax KV cache: static shapes when replayed from one state
    fused: ClassVar[bool] = False  # FastMKA mixes the levels before one attention

    def __init__(self, d_model: int, heads: int, head_dim: int, options: MKAOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        if self.options.retrieval:
            raise LayerConfigError("retrieval", "the L3 retrieved memory is not implemented", True,
                                   "false (levels L1 = x and L2 = EMA of x)")
        self.beta = self.options.beta
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=False)
        self.router = nn.Sequential(nn.Linear(heads * head_dim, self.options.router_hidden), nn.SiLU(),
                                    nn.Linear(self.options.router_hidden, LEVELS))

    @property
    def attentions(self) -> int:
        return 1 if self.fused else LEVELS

    def _acc_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[..., B, T, H*dh] -> [..., B, H, T, dh]."""
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(-2, -3)

    def _core(self, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
        """x[B, T, D] and its EMA m[B, T, D] (accumulation dtype) -> (q[B, H, T, dh], lambda[B, T, V] in the
        accumulation dtype, k, v[V', B, H, T, dh]): the keys and values of each level (MKA) or of the mixed
        input (FastMKA)."""
        q = self.q_proj(x)
        lam = torch.softmax(self.router(q).to(m.dtype), dim=-1)
        if self.fused:
            inputs = (lam[..., 0:1] * x.to(m.dtype) + lam[..., 1:2] * m).to(x.dtype).unsqueeze(0)
        else:
            inputs = torch.stack([x, m.to(x.dtype)])
        return self._heads(q), lam, self._heads(self.k_proj(inputs)), self._heads(self.v_proj(inputs))

    def _mix(self, o: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """o[V', B, H, T, dh], lambda[B, T, V] -> y[B, T, D]: MKA mixes the level outputs by lambda."""
        if not self.fused:
            w = lam.permute(2, 0, 1).unsqueeze(2).unsqueeze(-1)  # [V, B, 1, T, 1]
            o = (w * o.to(lam.dtype)).sum(0).to(o.dtype)
        else:
            o = o[0]
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def _ema(self, x: torch.Tensor, m0: torch.Tensor | None = None) -> torch.Tensor:
        return causal_ema(x.to(self._acc_dtype(x.dtype)), self.beta, m0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, T, D] -> y[B, T, D]."""
        q, lam, k, v = self._core(x, self._ema(x))
        return self._mix(_attend(q, k, v, causal=True), lam)

    # --- decode --------------------------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, MKACache]:
        """Run the prompt x[B, T, D]; return y[B, T, D] and caches able to reach `capacity` tokens (default
        T) without reallocating, plus the EMA after the last token."""
        B, T, _ = x.shape
        m = self._ema(x)
        q, lam, k, v = self._core(x, m)
        o = _attend(q, k, v, causal=True)
        cap = max(capacity or T, T)
        k_cache = k.new_zeros(*k.shape[:3], cap, self.head_dim)
        v_cache = torch.zeros_like(k_cache)
        with torch.no_grad():  # inference state, not part of the autograd graph
            k_cache[:, :, :, :T] = k
            v_cache[:, :, :, :T] = v
        return self._mix(o, lam), MKACache(k_cache, v_cache, m[:, -1].detach().clone(), T)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: MKACache) -> tuple[torch.Tensor, MKACache]:
        """Consume x_t[B, 1, D]; return y_t[B, 1, D] and the state one token longer. The new k, v go in place
        beyond the input's length (a full cache is grown into a new copy); the EMA state is a new tensor."""
        acc = state.ema.dtype
        ema = self.beta * state.ema + (1.0 - self.beta) * x_t[:, 0].to(acc)
        q, lam, k, v = self._core(x_t, ema.unsqueeze(1))
        k_cache, v_cache, pos = state.k, state.v, state.length
        if pos >= k_cache.shape[3]:
            k_cache, v_cache = _grow(k_cache), _grow(v_cache)
        k_cache[:, :, :, pos] = k[:, :, :, 0]
        v_cache[:, :, :, pos] = v[:, :, :, 0]
        o = _attend(q, k_cache[:, :, :, :pos + 1], v_cache[:, :, :, :pos + 1], causal=False)
        return self._mix(o, lam), MKACache(k_cache, v_cache, ema, pos + 1)

    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Associative-memory probe (see SequenceLayer.probe_memory). With identity projections the levels
        are taken of the written pairs: since W_k, W_v are linear, EMA(x) W_k = EMA(x W_k), so L1 holds
        (k_i, v_i) and L2 their EMAs (beta). The learned router is replaced by its untrained expectation,
        uniform weights 1/V: MKA reads mean_l softmax(q K_l^T / sqrt(dk)) V_l, FastMKA reads softmax attention
        over the mixed pairs ((k_i + EMA(k)_i) / 2, (v_i + EMA(v)_i) / 2). (With the router fixed to L1 both
        would be plain softmax attention.) Every query reads all N written pairs.
        keys[B, H, N, dk], values[B, H, N, dv], queries[B, H, M, dk] -> reads[B, H, M, dv] in the
        accumulation dtype (float32 for fp16/bf16)."""
        acc = self._acc_dtype(self.dtype)
        keys, values, queries = keys.to(acc), values.to(acc), queries.to(acc)
        Bq, H, N, dk = keys.shape

        def ema(t: torch.Tensor) -> torch.Tensor:  # [B, H, N, d] along N
            return causal_ema(t.reshape(Bq * H, N, t.shape[-1]), self.beta).view(t.shape)

        k_levels, v_levels = [keys, ema(keys)], [values, ema(values)]
        if self.fused:
            k_levels, v_levels = [sum(k_levels) / LEVELS], [sum(v_levels) / LEVELS]
        reads = [torch.softmax(queries @ k.transpose(-1, -2) / math.sqrt(dk), dim=-1) @ v
                 for k, v in zip(k_levels, v_levels, strict=True)]
        return sum(reads) / len(reads)

    def state_bytes(self, batch: int, seq: int) -> int:
        """V' * 2 * batch * H * seq * dh * el (KV caches) + batch * D * ea (the EMA state)."""
        ea = torch.empty((), dtype=self._acc_dtype(self.dtype)).element_size()
        kv = self.attentions * 2 * batch * self.heads * seq * self.head_dim * self.element_size
        return kv + batch * self.d_model * ea

    # --- cost model (see the class docstring) --------------------------------------------------------
    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        B, T, D, H, dh, A = batch, seq, self.d_model, self.heads, self.head_dim, self.attentions
        R = self.options.router_hidden
        el, weights = self.element_size, self.weight_bytes()
        ea = torch.empty((), dtype=self._acc_dtype(self.dtype)).element_size()
        mix = 2 * LEVELS * (D if self.fused else H * dh)
        proj_per_token = (2 * D * H * dh + A * 4 * D * H * dh + 2 * H * dh * D + 2 * (H * dh * R + R * LEVELS)
                          + 3 * D + mix)
        if mode in ("fwd", "bwd"):
            proj = B * T * proj_per_token
            attn = A * 4 * B * H * dh * (T * (T + 1) // 2)
            per_attention = (4 if self.fused else 6) * B * T * H * dh * el
            nbytes = weights + 2 * B * T * D * el + 2 * B * T * D * ea + 4 * B * T * H * dh * el + A * per_attention
            if mode == "fwd":
                return Cost(float(proj + attn), float(nbytes))
            return Cost(float(3 * proj + 3.5 * attn), float(3 * nbytes))
        if mode == "decode":
            n = seq + 1
            flops = B * proj_per_token + A * 4 * B * H * dh * n
            nbytes = weights + A * 2 * B * H * n * dh * el + 2 * B * D * ea + 2 * B * D * el
            return Cost(float(flops), float(nbytes))
        raise ValueError(f"unknown mode {mode!r}; allowed: fwd, bwd, decode")

    def implementation(self) -> str:
        return "sdpa"


class FastMKA(MKA):
    """FastMKA: the memory levels (L1 = x, L2 = causal EMA of x) mixed per token by the router first, then one
    causal attention with keys and values from the mixed input.

    x_mixed_t = sum_l lambda_(t,l) level_(l,t) with lambda_t = softmax(MLP(q_t)); K, V = x_mixed W_k, x_mixed
    W_v; o = causal SDPA(q, K, V); y = o W_o. Decode keeps the KV cache of the mixed input and the EMA state.
    Everything else (options, EMA precision, cost model with A = 1) as in MKA.
    """

    kind = "mka"
    fused = True


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q[B, H, M, dh], k, v[V', B, H, N, dh] -> o[V', B, H, M, dh]: SDPA per level with the levels folded into
    the batch (4-D inputs keep SDPA on its fused kernels; 5-D or expanded ones fell back to the math path)."""
    V, B = k.shape[:2]
    q4 = q.unsqueeze(0).expand(V, *q.shape).reshape(V * B, *q.shape[1:]) if V > 1 else q
    o = F.scaled_dot_product_attention(q4, k.flatten(0, 1), v.flatten(0, 1), is_causal=causal)
    return o.view(V, *q.shape[:-1], v.shape[-1])


def _grow(cache: torch.Tensor) -> torch.Tensor:
    """A copy of cache[V', B, H, cap, dh] with twice the slots (at least MIN_GROWN_CAPACITY); input untouched."""
    cap = cache.shape[3]
    grown = cache.new_zeros(*cache.shape[:3], max(2 * cap, MIN_GROWN_CAPACITY), cache.shape[4])
    grown[:, :, :, :cap] = cache
    return grown
