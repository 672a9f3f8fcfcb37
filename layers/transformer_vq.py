"""Transformer-VQ (Lingle 2023, "Transformer-VQ: Linear-Time Transformers via Vector Quantization"):
causal softmax attention with keys quantised to a codebook, block-recurrent, with a compressed cache.

Shapes: B batch, T length, D d_model, H heads, dh head_dim (= dk = dv), S codebook size, L block length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from .base import Cost, LayerOptions, SequenceLayer


class TransformerVQOptions(LayerOptions):
    codebook_size: int = Field(512, ge=1, description="codes S per head; the paper's runs use 512")
    block_size: int = Field(
        512, ge=1, description="block length L: exact attention over the current and the previous block; "
                               "older keys live in the per-code cache")


@dataclass
class VQState:
    """Decode state after `length` tokens, constant in size: per head S (dv + 1) + 2L (dk + dv) numbers.

    counts[B, H, S], sums[B, H, S, dv]: how many keys of blocks 0..b-2 were quantised to each code and the sum
    of their values (accumulation dtype: float32 for fp16/bf16); prev_k, prev_v[B, H, L, dh]: quantised keys
    and values of block b-1 (zeros while b = 0); cur_k, cur_v[B, H, L, dh]: block b, slots 0..r-1 filled,
    where b = (length - 1) // L is the block of the last token and r = length - b L.
    """

    counts: torch.Tensor
    sums: torch.Tensor
    prev_k: torch.Tensor
    prev_v: torch.Tensor
    cur_k: torch.Tensor
    cur_v: torch.Tensor
    length: int


class TransformerVQ(SequenceLayer):
    """Transformer-VQ: keys quantised to a per-head codebook, exact attention over two blocks, a per-code cache.

    Projections q, k, v: D -> H*dh, o: H*dh -> D, no bias, no positional encoding, scale 1/sqrt(dh). Keys are
    replaced by their nearest code (Euclidean) in the codebook C[H, S, dh], an nn.Parameter; the quantised key
    is C[z] + (k - k.detach()) (straight-through: the gradient reaches both the key projection and the chosen
    code; the paper's commitment loss and EMA k-means codebook update belong to a training loop, not the layer).
    Keys older than the two-block window live only as code counts, so their logits q.C_s pass gradient to the
    codebook and the queries but not back to those keys' projections (truncated straight-through).
    Token t of block n attends, in one softmax, (a) the current block causally and the whole previous block
    with their quantised keys, and (b) every code s with logit q.C_s / sqrt(dh) + log(count_s) and value
    sum_s / count_s, where count_s and sum_s count and sum the values of keys of blocks 0..n-2 quantised to s.
    exp(q.C_s) count_s mean_s is the sum of exp(q.k_i) v_i over those keys, so the layer is exact causal softmax
    attention over the quantised keys, in time linear in T. Not included: the paper's layer norm of q and k,
    gating and its positional biases. Cache counts and sums, and the softmax, run in float32 for fp16/bf16.

    Cost model (el = bytes per element, ea = accumulation element bytes, blocks n = 0..N-1 of length L_n,
    P = proj FLOPs per token = 2*D*3*H*dh + 2*H*dh*D):
    - fwd: flops = B*T*P + quantise 2*B*T*H*S*dh + sum_n 4*B*H*dh*L_n*(L_n + L[n>=1] + S[n>=2])
                   (scores and weighted values over the two blocks as full matrices, masked, and over the S
                   codes) + folding B*H*L*(dh + 1) per block n >= 2;
           bytes = weights + 2*B*T*D*el + 8*B*T*H*dh*el (q, k, v, o written and read once)
                   + per block n >= 2 the cache read and rewritten 2*B*H*S*(dh + 1)*ea.
    - bwd (forward + backward): flops = 3*proj + quantise + 3.5*(attention + folding), as for softmax
           attention; bytes = 3 * fwd bytes (an estimate).
    - decode (a step at context seq, position p = seq in block b = p // L, slot r = p % L):
           flops = B*P + 2*B*H*S*dh + 4*B*H*dh*(r + 1 + L[b>=1] + S[b>=2]) and, when r = 0 and b >= 2 (the
           previous block is folded into the cache), B*H*L*(2*S*dh + dh + 1) (re-quantise and fold);
           bytes = weights + 2*B*D*el + cache B*H*S*(dh + 1)*ea read (and written when folding)
                   + keys/values read 2*B*H*(r + 1 + L[b>=1])*dh*el + new k, v written 2*B*H*dh*el.
    """

    kind = "vq"
    Options = TransformerVQOptions
    # step branches on the Python length (folding at block boundaries), but a replay from one state always takes
    # the same branch with the same shapes and syncs nothing with the host: capturable
    supports_cuda_graph = True

    def __init__(self, d_model: int, heads: int, head_dim: int, options: TransformerVQOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        self.codebook_size = self.options.codebook_size
        self.block_size = self.options.block_size
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=False)
        # std 1/sqrt(3): the scale of k_proj outputs for unit-variance inputs under nn.Linear's default init
        self.codebook = nn.Parameter(torch.randn(heads, self.codebook_size, head_dim) / math.sqrt(3.0))

    # --- pieces ----------------------------------------------------------------------------------------
    def _acc_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x[B, T, D] -> q, k, v[B, H, T, dh]."""
        B, T, _ = x.shape
        return tuple(p(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
                     for p in (self.q_proj, self.k_proj, self.v_proj))

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def _quantise(self, k: torch.Tensor, codebook: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """k[B, H, T, dh] -> (quantised keys [B, H, T, dh] with the straight-through gradient, codes[B, H, T]);
        `codebook` [H, S, dh] defaults to the layer's."""
        acc = self._acc_dtype(k.dtype)
        C = (self.codebook if codebook is None else codebook).to(k.dtype)
        Cf, kf = C.detach().to(acc), k.detach().to(acc)
        # ||k - c||^2 without the ||k||^2 term, which does not change the argmin
        dist = (Cf * Cf).sum(-1)[:, None, :] - 2.0 * (kf @ Cf.transpose(-1, -2))
        codes = dist.argmin(dim=-1)
        heads = torch.arange(self.heads, device=k.device).view(1, -1, 1)
        return C[heads, codes] + (k - k.detach()), codes

    def _fold(self, counts: torch.Tensor, sums: torch.Tensor, codes: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add a block's keys (codes[B, H, n]) and values v[B, H, n, dv] to the cache; out of place."""
        ones = torch.ones(codes.shape, dtype=counts.dtype, device=codes.device)
        counts = counts.scatter_add(2, codes, ones)
        sums = sums.scatter_add(2, codes.unsqueeze(-1).expand(*codes.shape, v.shape[-1]), v.to(sums.dtype))
        return counts, sums

    def _attend(self, q: torch.Tensor, counts: torch.Tensor | None, sums: torch.Tensor | None,
                k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                codebook: torch.Tensor | None = None) -> torch.Tensor:
        """One softmax over [cache codes, block keys]: q[B, H, M, dk], cache counts[B, H, S], sums[B, H, S, dv]
        (None: empty cache), block keys k[B, H, N, dk], values v[B, H, N, dv], mask[M, N] (True = visible) or
        None -> o[B, H, M, dv] in q's dtype."""
        acc = self._acc_dtype(q.dtype)
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = (q @ k.transpose(-1, -2)).to(acc) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        if counts is None:
            p = torch.softmax(scores, dim=-1)
            return (p.to(v.dtype) @ v).to(q.dtype)
        C = (self.codebook if codebook is None else codebook).to(acc)
        code_scores = (q.to(acc) @ C.transpose(-1, -2)) * scale + torch.log(counts).unsqueeze(-2)  # log 0 = -inf
        p = torch.softmax(torch.cat([code_scores, scores], dim=-1), dim=-1)
        S = counts.shape[-1]
        means = sums / counts.clamp_min(1.0).unsqueeze(-1)
        o = p[..., :S] @ means + (p[..., S:].to(v.dtype) @ v).to(acc)
        return o.to(q.dtype)

    def _scan(self, q: torch.Tensor | None, kh: torch.Tensor, codes: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Block-recurrent pass over T tokens. q (None: write only), kh[B, H, T, dk], codes[B, H, T],
        v[B, H, T, dv] -> (o[B, H, T, dv] or None, counts, sums of blocks 0..b-2 with b the last block; None
        when b < 2)."""
        B, H, T, _ = kh.shape
        L, S = self.block_size, self.codebook_size
        acc = self._acc_dtype(v.dtype)
        counts = sums = None
        outs = []
        for n in range(-(-T // L)):
            s0, s1 = n * L, min(T, (n + 1) * L)
            if n >= 2:  # block n-2 leaves the window
                if counts is None:
                    counts = v.new_zeros(B, H, S, dtype=acc)
                    sums = v.new_zeros(B, H, S, v.shape[-1], dtype=acc)
                f0 = (n - 2) * L
                counts, sums = self._fold(counts, sums, codes[:, :, f0:f0 + L], v[:, :, f0:f0 + L])
            if q is None:
                continue
            b0 = max(0, s0 - L)  # keys of the previous and current block are one slice
            rows = torch.arange(s0, s1, device=kh.device).view(-1, 1)
            cols = torch.arange(b0, s1, device=kh.device).view(1, -1)
            outs.append(self._attend(q[:, :, s0:s1], counts, sums, kh[:, :, b0:s1], v[:, :, b0:s1], cols <= rows))
        return (torch.cat(outs, dim=2) if q is not None else None), counts, sums

    def _state(self, kh: torch.Tensor, v: torch.Tensor, counts: torch.Tensor | None,
               sums: torch.Tensor | None) -> VQState:
        """The decode state after T = kh.shape[2] tokens, from the scan's cache and the last two blocks."""
        B, H, T, dh = kh.shape
        L, S = self.block_size, self.codebook_size
        acc = self._acc_dtype(v.dtype)
        b = (T - 1) // L
        prev_k, prev_v, cur_k, cur_v = (kh.new_zeros(B, H, L, dh), v.new_zeros(B, H, L, v.shape[-1]),
                                        kh.new_zeros(B, H, L, dh), v.new_zeros(B, H, L, v.shape[-1]))
        with torch.no_grad():  # inference state, not part of the autograd graph
            cur_k[:, :, :T - b * L] = kh[:, :, b * L:]
            cur_v[:, :, :T - b * L] = v[:, :, b * L:]
            if b >= 1:
                prev_k.copy_(kh[:, :, (b - 1) * L:b * L])
                prev_v.copy_(v[:, :, (b - 1) * L:b * L])
        if counts is None:
            counts = v.new_zeros(B, H, S, dtype=acc)
            sums = v.new_zeros(B, H, S, v.shape[-1], dtype=acc)
        return VQState(counts.detach(), sums.detach(), prev_k, prev_v, cur_k, cur_v, T)

    # --- the interface ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, T, D] -> y[B, T, D]."""
        q, k, v = self._project(x)
        kh, codes = self._quantise(k)
        o, _, _ = self._scan(q, kh, codes, v)
        return self._output(o)

    def prefill(self, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, VQState]:
        """Run the prompt x[B, T, D]; return y[B, T, D] and the state. `capacity` is ignored: the state has a
        fixed size whatever the length."""
        q, k, v = self._project(x)
        kh, codes = self._quantise(k)
        o, counts, sums = self._scan(q, kh, codes, v)
        return self._output(o), self._state(kh, v, counts, sums)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: VQState) -> tuple[torch.Tensor, VQState]:
        """Consume x_t[B, 1, D]; return y_t[B, 1, D] and the state one token longer.

        Inside a block the new k, v go in place into the current block's slot r (beyond the input's length).
        At a block boundary the previous block is folded into new cache tensors, the current block becomes
        the previous one (shared, never written again) and a fresh block is allocated: the input state is
        never changed.
        """
        L = self.block_size
        q, k, v = self._project(x_t)
        kh, _ = self._quantise(k)
        p = state.length
        b, r = divmod(p, L)
        counts, sums = state.counts, state.sums
        prev_k, prev_v, cur_k, cur_v = state.prev_k, state.prev_v, state.cur_k, state.cur_v
        if r == 0:  # p >= L after a prefill of >= 1 token: block b starts
            if b >= 2:  # block b-2 (the previous block) leaves the window
                _, prev_codes = self._quantise(prev_k)  # quantised keys are codes: their own nearest code
                counts, sums = self._fold(counts, sums, prev_codes, prev_v)
            prev_k, prev_v = cur_k, cur_v
            cur_k, cur_v = torch.zeros_like(cur_k), torch.zeros_like(cur_v)
        cur_k[:, :, r] = kh[:, :, 0]
        cur_v[:, :, r] = v[:, :, 0]
        block_k = torch.cat([prev_k, cur_k[:, :, :r + 1]], dim=2) if b >= 1 else cur_k[:, :, :r + 1]
        block_v = torch.cat([prev_v, cur_v[:, :, :r + 1]], dim=2) if b >= 1 else cur_v[:, :, :r + 1]
        o = self._attend(q, counts if b >= 2 else None, sums, block_k, block_v, None)
        return self._output(o), VQState(counts, sums, prev_k, prev_v, cur_k, cur_v, p + 1)

    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Associative-memory probe (see SequenceLayer.probe_memory): the keys are quantised with the layer's
        own codebook (untrained in a fresh layer: random codes, so random keys are written coarsely; where dk
        differs from head_dim, a fresh codebook [H, S, dk] drawn with the same init from seed 0) and written
        block by block, blocks leaving the two-block window folded into the per-code counts and value sums;
        each query then reads the state after the last write through the one softmax over [codes with
        log-count bias, previous block, current block], scale 1/sqrt(dk).
        keys[B, H, N, dk], values[B, H, N, dv], queries[B, H, M, dk] -> reads[B, H, M, dv] in the
        accumulation dtype (float32 for fp16/bf16)."""
        if keys.shape[1] != self.heads:
            raise ValueError(f"probe keys must have the layer's {self.heads} heads; got {list(keys.shape)}")
        acc = self._acc_dtype(self.dtype)
        keys, values, queries = keys.to(acc), values.to(acc), queries.to(acc)
        codebook = self.codebook
        if keys.shape[-1] != self.head_dim:
            gen = torch.Generator().manual_seed(0)
            codebook = torch.randn(self.heads, self.codebook_size, keys.shape[-1], generator=gen) / math.sqrt(3.0)
        codebook = codebook.detach().to(device=keys.device, dtype=acc)
        with torch.no_grad():
            kh, codes = self._quantise(keys, codebook)
            _, counts, sums = self._scan(None, kh, codes, values)
            state = self._state(kh, values, counts, sums)
            N, L = keys.shape[2], self.block_size
            b = (N - 1) // L
            r = N - b * L
            block_k = torch.cat([state.prev_k, state.cur_k[:, :, :r]], dim=2) if b >= 1 else state.cur_k[:, :, :r]
            block_v = torch.cat([state.prev_v, state.cur_v[:, :, :r]], dim=2) if b >= 1 else state.cur_v[:, :, :r]
            return self._attend(queries, state.counts if b >= 2 else None, state.sums, block_k, block_v, None,
                                codebook)

    def state_bytes(self, batch: int, seq: int) -> int:
        """batch * H * (S (dv + 1) * ea + 2L (dk + dv) * el), whatever `seq`: cache counts and value sums in
        the accumulation dtype, the previous and current block's keys and values in the layer's dtype."""
        ea = torch.empty((), dtype=self._acc_dtype(self.dtype)).element_size()
        S, L, dh = self.codebook_size, self.block_size, self.head_dim
        return batch * self.heads * (S * (dh + 1) * ea + 2 * L * 2 * dh * self.element_size)

    # --- cost model (see the class docstring) --------------------------------------------------------
    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        B, T, D, H, dh = batch, seq, self.d_model, self.heads, self.head_dim
        S, L = self.codebook_size, self.block_size
        el = self.element_size
        ea = torch.empty((), dtype=self._acc_dtype(self.dtype)).element_size()
        weights = self.weight_bytes()
        proj_per_token = 2 * D * 3 * H * dh + 2 * H * dh * D
        quant_per_token = 2 * H * S * dh
        cache_bytes = B * H * S * (dh + 1) * ea
        if mode in ("fwd", "bwd"):
            attn = fold = 0
            cache_traffic = 0
            for n in range(-(-T // L)):
                Ln = min(T, (n + 1) * L) - n * L
                attn += 4 * B * H * dh * Ln * (Ln + (L if n >= 1 else 0) + (S if n >= 2 else 0))
                if n >= 2:
                    fold += B * H * L * (dh + 1)
                    cache_traffic += 2 * cache_bytes
            proj, quant = B * T * proj_per_token, B * T * quant_per_token
            nbytes = weights + 2 * B * T * D * el + 8 * B * T * H * dh * el + cache_traffic
            if mode == "fwd":
                return Cost(float(proj + quant + attn + fold), float(nbytes))
            return Cost(float(3 * proj + quant + 3.5 * (attn + fold)), float(3 * nbytes))
        if mode == "decode":
            b, r = divmod(seq, L)
            keys = r + 1 + (L if b >= 1 else 0)
            flops = B * (proj_per_token + quant_per_token) + 4 * B * H * dh * (keys + (S if b >= 2 else 0))
            nbytes = weights + 2 * B * D * el + cache_bytes + 2 * B * H * keys * dh * el + 2 * B * H * dh * el
            if r == 0 and b >= 2:
                flops += B * H * L * (2 * S * dh + dh + 1)
                nbytes += cache_bytes
            return Cost(float(flops), float(nbytes))
        raise ValueError(f"unknown mode {mode!r}; allowed: fwd, bwd, decode")

    def implementation(self) -> str:
        return "torch-blocked"

