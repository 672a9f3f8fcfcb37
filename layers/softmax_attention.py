"""Causal softmax attention (MHA, GQA, MQA, sliding window) on torch SDPA, with a KV-cache decode path.

Shapes: B batch, T length, D d_model, H query heads, G kv heads, dh head_dim, W window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ovqprof.phases import phase

from .base import Cost, LayerConfigError, LayerOptions, SequenceLayer

# Query block of the sliding-window path: each block of C queries attends C + W - 1 keys, so the work wasted
# on masked keys is C / W of the useful work and the gathered K/V copies hold (C + W - 1) / C times K and V.
WINDOW_BLOCK = 256
# Smallest capacity a full KV cache grows to when `step` runs past it.
MIN_GROWN_CAPACITY = 16


class SoftmaxAttentionOptions(LayerOptions):
    kv_heads: int | None = Field(
        None, ge=1, description="key/value heads G: None = heads (MHA), 1 = MQA, else GQA; must divide heads")
    window: int | None = Field(
        None, ge=1, description="sliding window W: token t attends keys t-W+1..t; None = full causal")


@dataclass
class KVCache:
    """Decode state: k, v [B, G, cap, dh] preallocated storage and `length` tokens seen.

    Full attention: slots 0..length-1 hold positions 0..length-1. Sliding window: a ring of cap <= W slots,
    position p in slot p % W; with no positional encoding the order of keys inside the ring is irrelevant.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int


class SoftmaxAttention(SequenceLayer):
    """Causal softmax attention through torch SDPA: MHA, GQA/MQA (kv_heads) and sliding window (window).

    Projections q: D -> H*dh, k, v: D -> G*dh, o: H*dh -> D, no bias, no positional encoding, scale 1/sqrt(dh).

    Cost model (FLOPs and bytes; el = bytes per element; S(T) = sum_{t=1..T} min(t, W), = T(T+1)/2 when
    there is no window, the keys each query attends):
    - fwd:  flops = proj + attn with proj = 2*B*T*D*(H+2G)*dh + 2*B*T*H*dh*D and
            attn = 4*B*H*dh*S(T) (QK^T and PV, 2 FLOPs per multiply-add, causal keys only);
            bytes = weights + x read + y write + q, k, v, o each written once and read once
                  = weights + 2*B*T*D*el + 2*B*T*dh*(2H+2G)*el.
    - bwd (forward + backward): flops = 3*proj + 3.5*attn (backward of attention is 2.5x its forward, as in
            FlashAttention-2, which recomputes the scores); bytes = 3 * fwd bytes (an estimate).
    - decode (one step at context seq, attending n = min(seq+1, W) keys):
            flops = 2*B*(D*(H+2G)*dh + H*dh*D) + 4*B*H*dh*n;
            bytes = weights + KV cache read 2*B*G*n*dh*el + new k, v write 2*B*G*dh*el + x_t, y_t 2*B*D*el.
    """

    kind = "softmax"
    Options = SoftmaxAttentionOptions
    supports_cuda_graph = True

    def __init__(self, d_model: int, heads: int, head_dim: int, options: SoftmaxAttentionOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        opts = self.options
        kv_heads = heads if opts.kv_heads is None else opts.kv_heads
        if heads % kv_heads != 0:
            raise LayerConfigError("kv_heads", f"must divide heads={heads}", opts.kv_heads,
                                   f"a divisor of {heads}: " + ", ".join(str(g) for g in _divisors(heads)))
        self.kv_heads = kv_heads
        self.window = opts.window
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=False)
        self._impl: str | None = None  # what the latest forward/step ran
        self._flash_failed = False  # the flash backend refused this layer once: do not pay the retry per call

    # --- forward -------------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x[B, T, D] -> q[B, H, T, dh], k, v[B, G, T, dh]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        """o[B, H, T, dh] -> y[B, T, D]."""
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, T, D] -> y[B, T, D]."""
        with phase("projections"):
            q, k, v = self._project(x)
        with phase("core"):
            o = self._attend(q, k, v)
        with phase("output projection"):
            return self._output(o)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q[B, H, T, dh], k, v[B, G, T, dh] -> o[B, H, T, dh]; a window covering all of T is plain causal."""
        if self.window is not None and self.window < q.shape[2]:
            return self._attend_window(q, k, v)
        return self._attend_causal(q, k, v)

    def _attend_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = self.kv_heads < self.heads
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not self._flash_failed:
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                self._impl = "sdpa-flash"
                return o
            except torch.cuda.OutOfMemoryError:
                raise  # out of memory is a result, not a reason to try another backend
            except RuntimeError:
                self._flash_failed = True  # e.g. head_dim too large or a pre-Ampere GPU
        if q.is_cuda and gqa:  # memory-efficient SDPA refuses enable_gqa and would fall back to O(T^2) math
            k, v = self._repeat_kv(k), self._repeat_kv(v)
            gqa = False
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        self._impl = "sdpa"
        return o

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        """[N, G, L, dh] -> [N, H, L, dh], query head h reading kv head h // (H/G), as enable_gqa does."""
        return t if self.kv_heads == self.heads else t.repeat_interleave(self.heads // self.kv_heads, dim=1)

    def _attend_window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Sliding-window attention as a blocked band, never a T x T mask: memory linear in T.

        Extra memory: the gathered K and V 2*B*H*nb*(C+W-1)*dh elements (about (C+W)/C times K and V), the mask
        B*nb*C*(C+W-1) bools, and, where SDPA falls back to its math backend, scores B*H*nb*C*(C+W-1).

        Queries are cut into nb blocks of C; block i (queries iC..iC+C-1) attends keys iC-W+1..iC+C-1, a
        strided view of K/V left-padded by W-1. All blocks run in one SDPA call with the block index folded
        into the batch dimension; the per-block mask keeps the band and drops the left padding. KV heads are
        repeated up front because no fused SDPA backend takes a mask together with enable_gqa.
        q[B, H, T, dh], k, v[B, G, T, dh] -> o[B, H, T, dh].
        """
        B, H, T, dh = q.shape
        G, W = self.kv_heads, self.window
        C = min(W, WINDOW_BLOCK)
        nb = -(-T // C)
        L = C + W - 1  # keys per block
        # Right padding of queries (and keys, to keep the strided view in range) is sliced off at the end.
        qb = F.pad(q, (0, 0, 0, nb * C - T)).view(B, H, nb, C, dh).transpose(1, 2).reshape(B * nb, H, C, dh)

        def blocks(t: torch.Tensor) -> torch.Tensor:  # [B, G, T, dh] -> [B*nb, H, L, dh]
            padded = F.pad(t, (0, 0, W - 1, nb * C - T))
            return self._repeat_kv(padded.unfold(2, L, C).permute(0, 2, 1, 4, 3).reshape(B * nb, G, L, dh))

        r = torch.arange(C, device=q.device).view(1, C, 1)
        col = torch.arange(L, device=q.device).view(1, 1, L)
        start = torch.arange(nb, device=q.device).view(nb, 1, 1) * C - (W - 1)  # position of key column 0
        # key l of block i is position iC-W+1+l, query r is iC+r: keep r-W+1 <= l-W+1 <= r and position >= 0
        mask = (col >= r) & (col - r < W) & (start + col >= 0)  # [nb, C, L]
        mask = mask.unsqueeze(0).expand(B, nb, C, L).reshape(B * nb, 1, C, L)
        o = F.scaled_dot_product_attention(qb, blocks(k), blocks(v), attn_mask=mask)
        self._impl = "sdpa-window-blocked"
        return o.view(B, nb, H, C, dh).transpose(1, 2).reshape(B, H, nb * C, dh)[:, :, :T]

    # --- decode --------------------------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, KVCache]:
        """Run the prompt x[B, T, D]; return y[B, T, D] and a KV cache able to reach `capacity` tokens
        (default T) without reallocating; a windowed cache holds at most W slots."""
        B, T, _ = x.shape
        q, k, v = self._project(x)
        o = self._attend(q, k, v)
        cap = max(capacity or T, T)
        if self.window is not None:
            cap = min(cap, self.window)
        k_cache = k.new_zeros(B, self.kv_heads, cap, self.head_dim)
        v_cache = torch.zeros_like(k_cache)
        keep = min(T, cap)  # the last `keep` positions stay visible: all of them, or the last W
        slots = torch.arange(T - keep, T, device=x.device) % cap  # cap == W whenever T > cap
        with torch.no_grad():  # the cache is inference state, not part of the autograd graph
            k_cache[:, :, slots] = k[:, :, T - keep:]
            v_cache[:, :, slots] = v[:, :, T - keep:]
        return self._output(o), KVCache(k_cache, v_cache, T)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Consume one token x_t[B, 1, D]; return y_t[B, 1, D] and the state one token longer.

        Writes the new k, v in place into the slot the new position owns (beyond the input's length, or for
        a full ring the slot of the position leaving the window), so repeating a call with the same state
        gives the same result. A full-attention cache that is full is grown into a new, larger copy.
        """
        with phase("projections"):
            q, k, v = self._project(x_t)  # q[B, H, 1, dh], k, v[B, G, 1, dh]
        k_cache, v_cache, pos = state.k, state.v, state.length
        cap = k_cache.shape[2]
        limit = self.window if self.window is not None else math.inf
        if pos >= cap and cap < limit:
            new_cap = int(min(max(2 * cap, MIN_GROWN_CAPACITY), limit))
            k_cache = _grow(k_cache, new_cap)
            v_cache = _grow(v_cache, new_cap)
            cap = new_cap
        slot = pos % cap  # == pos unless this is a full ring of W slots
        with phase("state update"):
            k_cache[:, :, slot] = k[:, :, 0]
            v_cache[:, :, slot] = v[:, :, 0]
        n = min(pos + 1, cap)
        with phase("read"):
            o = F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], is_causal=False,
                                               enable_gqa=self.kv_heads < self.heads)
        self._impl = "sdpa"
        with phase("output projection"):
            return self._output(o), KVCache(k_cache, v_cache, pos + 1)

    @torch.no_grad()
    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Associative-memory probe (see SequenceLayer.probe_memory): the KV cache keeps every written pair,
        or with a window only the last W, and a query reads softmax(q k^T / sqrt(dk)) V over them. kv_heads
        play no part: every probe head has its own keys. keys[B, H, N, dk], values[B, H, N, dv],
        queries[B, H, M, dk] -> reads[B, H, M, dv] in the input dtype."""
        if self.window is not None:
            keys, values = keys[:, :, -self.window:], values[:, :, -self.window:]
        return F.scaled_dot_product_attention(queries, keys, values)  # default scale: 1/sqrt(dk)

    def state_bytes(self, batch: int, seq: int) -> int:
        """2 * batch * G * min(seq, W) * dh * el: the K and V cache after `seq` tokens."""
        kept = seq if self.window is None else min(seq, self.window)
        return 2 * batch * self.kv_heads * kept * self.head_dim * self.element_size

    # --- cost model (see the class docstring) --------------------------------------------------------
    def _attended_keys(self, seq: int) -> int:
        """sum_{t=1..seq} min(t, W): keys attended by all queries of a causal (windowed) sequence."""
        W = self.window
        if W is None or seq <= W:
            return seq * (seq + 1) // 2
        return W * (W + 1) // 2 + (seq - W) * W

    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        B, T, D, H, G, dh = batch, seq, self.d_model, self.heads, self.kv_heads, self.head_dim
        el, weights = self.element_size, self.weight_bytes()
        proj_per_token = 2 * D * (H + 2 * G) * dh + 2 * H * dh * D
        if mode in ("fwd", "bwd"):
            proj = B * T * proj_per_token
            attn = 4 * B * H * dh * self._attended_keys(T)
            io_bytes = weights + 2 * B * T * D * el + 2 * B * T * dh * (2 * H + 2 * G) * el
            if mode == "fwd":
                return Cost(float(proj + attn), float(io_bytes))
            return Cost(float(3 * proj + 3.5 * attn), float(3 * io_bytes))
        if mode == "decode":
            n = seq + 1 if self.window is None else min(seq + 1, self.window)
            flops = B * proj_per_token + 4 * B * H * dh * n
            nbytes = weights + 2 * B * G * n * dh * el + 2 * B * G * dh * el + 2 * B * D * el
            return Cost(float(flops), float(nbytes))
        raise ValueError(f"unknown mode {mode!r}; allowed: fwd, bwd, decode")

    def implementation(self) -> str:
        """`sdpa-flash`, `sdpa` or `sdpa-window-blocked`: what the latest call ran (before any call, what
        the layer expects to run on its device)."""
        if self._impl is not None:
            return self._impl
        if self.window is not None:
            return "sdpa-window-blocked"
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return "sdpa-flash"
        return "sdpa"


def _grow(cache: torch.Tensor, capacity: int) -> torch.Tensor:
    """A copy of cache[B, G, cap, dh] with `capacity` slots; the input stays untouched."""
    grown = cache.new_zeros(*cache.shape[:2], capacity, cache.shape[3])
    grown[:, :, : cache.shape[2]] = cache
    return grown


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
