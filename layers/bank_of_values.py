"""Bank of Values (arXiv 2606.02780): causal softmax attention whose values come from a learned per-layer
table indexed by token id, v_p = gamma * E_v[id_p]; q and k are projected from x as usual.

Shapes: B batch, T length, D d_model, H query heads, G kv heads, dh head_dim, |V| vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .attention_probe import softmax_read
from .base import Cost, LayerConfigError, LayerOptions, SequenceLayer

# Seed of the fixed hash multipliers: the same ids for the same x in every run and on every device.
HASH_SEED = 20260602
# Multipliers lie in [0, 2^31): a sum over D <= 2^32 channels stays exact in int64.
HASH_RANGE = 2**31
ID_DTYPE = torch.int32  # what the decode state stores per token
MIN_GROWN_CAPACITY = 16


class BankOfValuesOptions(LayerOptions):
    vocab_size: int = Field(32000, ge=1, lt=2**31, description="|V|: rows of the value table E_v")
    kv_heads: int | None = Field(
        None, ge=1, description="key/value heads G: None = heads (MHA), 1 = MQA, else GQA; must divide heads")
    token_ids: Literal["hash"] = Field(
        "hash", description="how token ids are drawn from the hidden states: hash = (sum_j [x_j > 0] m_j) mod "
                            "|V| with fixed random int64 multipliers m_j (a sign-bit hash, exact in any dtype)")
    gamma_init: float = Field(1.0, description="initial value of the learned scalar gamma")


@dataclass
class IdKCache:
    """Decode state: k[B, G, cap, dh] and ids[B, cap] (int32) preallocated, slots 0..length-1 holding
    positions 0..length-1. Values are not cached: they are gathered from the table at read time."""

    k: torch.Tensor
    ids: torch.Tensor
    length: int


class BankOfValues(SequenceLayer):
    """Bank of Values: softmax attention with values gamma * E_v(token id) from a learned per-layer table.

    Projections q: D -> H*dh, k: D -> G*dh, o: H*dh -> D, no bias, no positional encoding, scale 1/sqrt(dh);
    E_v an nn.Embedding(|V|, G*dh) (N(0, 1) init), gamma a learned scalar.
    Token ids: the profiler feeds hidden states, not tokens, so the layer draws an id per position from its
    own input, deterministically: id_p = (sum_j [x_pj > 0] * m_j) mod |V|, with m_j in [0, 2^31) drawn once
    from a generator seeded HASH_SEED (a buffer, int64). Only signs of x are used, compared elementwise with 0
    and summed in exact integer arithmetic, so prefill and step (and every dtype, barring exact zeros) give
    bit-identical ids for the same x_p; ids carry no gradient. Decode caches K and one int32 id per token.

    Cost model (FLOPs and bytes; el bytes per element, ei = 4 bytes per stored id, S(T) = T(T+1)/2):
    Wt = weights without the table (|V|*G*dh*el); the table is never read whole, only gathered.
    - fwd:  flops = proj + attn, proj = 2*B*T*D*(H+G)*dh + 2*B*T*H*dh*D (+ B*T*D for the hash, left out),
            attn = 4*B*H*dh*S(T);
            bytes = Wt + 2*B*T*D*el + rows gathered B*T*G*dh*el + q, k, v, o written once and read once
                    2*B*T*dh*(2H+2G)*el.
    - bwd: 3*proj + 3.5*attn; bytes 3 * fwd bytes + the dense table gradient written (|V|*G*dh*el; an
            estimate).
    - decode at context seq (n = seq + 1 keys): flops = 2*B*(D*(H+G)*dh + H*dh*D) + 4*B*H*dh*n;
            bytes = Wt + K read B*G*n*dh*el + ids read B*n*ei + table rows gathered B*G*n*dh*el
                    + new k and id written + 2*B*D*el.
    """

    kind = "softmax"
    Options = BankOfValuesOptions
    supports_cuda_graph = False  # the step takes a Python int length

    def __init__(self, d_model: int, heads: int, head_dim: int, options: BankOfValuesOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        opts = self.options
        kv_heads = heads if opts.kv_heads is None else opts.kv_heads
        if heads % kv_heads != 0:
            raise LayerConfigError("kv_heads", f"must divide heads={heads}", opts.kv_heads,
                                   "a divisor of heads: " + ", ".join(str(g) for g in range(1, heads + 1)
                                                                      if heads % g == 0))
        self.kv_heads = kv_heads
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.value_table = nn.Embedding(opts.vocab_size, kv_heads * head_dim)
        self.gamma = nn.Parameter(torch.tensor(float(opts.gamma_init)))
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=False)
        gen = torch.Generator().manual_seed(HASH_SEED)
        self.register_buffer("hash_multipliers", torch.randint(0, HASH_RANGE, (d_model,), generator=gen))

    # --- pieces --------------------------------------------------------------------------------------
    def token_ids(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, T, D] -> ids[B, T] (int64) in [0, vocab_size): the sign-bit hash of the class docstring."""
        bits = (x.detach() > 0).to(torch.int64)
        return (bits * self.hash_multipliers).sum(dim=-1) % self.options.vocab_size

    def _values(self, ids: torch.Tensor) -> torch.Tensor:
        """ids[B, T] -> v[B, G, T, dh] = gamma * E_v[ids]."""
        B, T = ids.shape
        v = self.value_table(ids) * self.gamma
        return v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)

    def _qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.kv_heads == self.heads else t.repeat_interleave(self.heads // self.kv_heads, dim=1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        gqa = self.kv_heads < self.heads
        if q.is_cuda and gqa:  # the fused CUDA backends refuse enable_gqa; repeat instead of falling to math
            k, v, gqa = self._repeat_kv(k), self._repeat_kv(v), False
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    # --- forward and decode --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, T, D] -> y[B, T, D]."""
        q, k = self._qk(x)
        return self._output(self._attend(q, k, self._values(self.token_ids(x)), causal=True))

    def prefill(self, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, IdKCache]:
        """Run the prompt x[B, T, D]; return y[B, T, D] and a K + id cache of `capacity` slots (default T)."""
        B, T, _ = x.shape
        q, k = self._qk(x)
        ids = self.token_ids(x)
        y = self._output(self._attend(q, k, self._values(ids), causal=True))
        cap = max(capacity or T, T)
        k_cache = k.new_zeros(B, self.kv_heads, cap, self.head_dim)
        id_cache = torch.zeros(B, cap, dtype=ID_DTYPE, device=x.device)
        with torch.no_grad():
            k_cache[:, :, :T] = k
            id_cache[:, :T] = ids
        return y, IdKCache(k_cache, id_cache, T)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: IdKCache) -> tuple[torch.Tensor, IdKCache]:
        """Consume x_t[B, 1, D]; return y_t[B, 1, D] and the state one token longer. Writes slot `length` only
        (a full cache is grown into a new copy), so repeating a call with the same state gives the same result.
        """
        q, k = self._qk(x_t)
        k_cache, id_cache, pos = state.k, state.ids, state.length
        if pos >= k_cache.shape[2]:
            cap = max(2 * k_cache.shape[2], MIN_GROWN_CAPACITY)
            grown_k = k_cache.new_zeros(*k_cache.shape[:2], cap, k_cache.shape[3])
            grown_k[:, :, :pos] = k_cache
            grown_ids = id_cache.new_zeros(id_cache.shape[0], cap)
            grown_ids[:, :pos] = id_cache
            k_cache, id_cache = grown_k, grown_ids
        k_cache[:, :, pos] = k[:, :, 0]
        id_cache[:, pos] = self.token_ids(x_t)[:, 0]
        n = pos + 1
        v = self._values(id_cache[:, :n])  # gathered from the table at read time
        o = self._attend(q, k_cache[:, :, :n], v, causal=False)
        return self._output(o), IdKCache(k_cache, id_cache, n)

    def state_bytes(self, batch: int, seq: int) -> int:
        """batch * seq * (G * dh * el + 4): the K cache and one int32 token id per token."""
        id_bytes = torch.empty((), dtype=ID_DTYPE).element_size()
        return batch * seq * (self.kv_heads * self.head_dim * self.element_size + id_bytes)

    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Associative-memory probe (SequenceLayer.probe_memory): the core is softmax attention over every
        written key, softmax(q k^T / sqrt(dk)) V, with the written values standing for the table rows
        gamma * E_v[id] (identity projections; the id lookup is the layer's value projection).
        keys[B, H, N, dk], values[B, H, N, dv], queries[B, H, M, dk] -> reads[B, H, M, dv] in float32
        (float64 stays float64)."""
        return softmax_read(keys, values, queries)

    # --- cost model (see the class docstring) --------------------------------------------------------
    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        B, T, D, H, G, dh = batch, seq, self.d_model, self.heads, self.kv_heads, self.head_dim
        el = self.element_size
        table = self.value_table.weight.numel() * el
        weights = self.weight_bytes() - table
        ei = torch.empty((), dtype=ID_DTYPE).element_size()
        proj_per_token = 2 * D * (H + G) * dh + 2 * H * dh * D
        if mode in ("fwd", "bwd"):
            proj = B * T * proj_per_token
            attn = 4 * B * H * dh * (T * (T + 1) // 2)
            io_bytes = weights + 2 * B * T * D * el + B * T * G * dh * el + 2 * B * T * dh * (2 * H + 2 * G) * el
            if mode == "fwd":
                return Cost(float(proj + attn), float(io_bytes))
            return Cost(float(3 * proj + 3.5 * attn), float(3 * io_bytes + table))
        if mode == "decode":
            n = seq + 1
            flops = B * proj_per_token + 4 * B * H * dh * n
            nbytes = (weights + 2 * B * G * n * dh * el + B * n * ei + B * (G * dh * el + ei) + 2 * B * D * el)
            return Cost(float(flops), float(nbytes))
        raise ValueError(f"unknown mode {mode!r}; allowed: fwd, bwd, decode")

    def implementation(self) -> str:
        return "sdpa+embedding-gather"
