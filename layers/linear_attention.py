"""Causal linear attention (Katharopoulos et al. 2020) in a chunked PyTorch form, with a recurrent decode path.

Per head, with dk = dv = head_dim and phi the feature map:
    S_t = S_{t-1} + phi(k_t) v_t^T        [dk, dv]
    z_t = z_{t-1} + phi(k_t)              [dk]
    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)   (normalize)   or   phi(q_t)^T S_t
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ovqprof.phases import phase

from .base import Cost, LayerOptions, SequenceLayer

_HALF = (torch.float16, torch.bfloat16)


class LinearAttentionOptions(LayerOptions):
    feature_map: Literal["elu+1", "identity"] = Field("elu+1", description="phi applied to q and k: elu(x)+1 or x")
    normalize: bool = Field(True, description="divide by phi(q).z, the running sum of phi(k)")
    chunk_size: int = Field(64, ge=1, description="tokens per block of the chunked forward")
    eps: float = Field(1e-6, gt=0, description="added to the normaliser phi(q).z")


@dataclass
class LinearState:
    """Decode state: S[B, H, dk, dv] = sum phi(k) v^T and z[B, H, dk] = sum phi(k) (None without normalize),
    float32 when the layer is fp16/bf16 (a running sum in half precision drifts), else the layer dtype."""

    S: torch.Tensor
    z: torch.Tensor | None


class LinearAttention(SequenceLayer):
    """Causal linear attention with feature map elu+1 or identity: constant-size state, chunked forward.

    Projections q, k, v: D -> H*dh, o: H*dh -> D, no bias, no extra scaling. Math in float32 for fp16/bf16.

    Forward memory: besides q, k, v, o [B, H, T, dh], the chunked form holds per chunk the intra-chunk scores
    [B, H, T/C, C, C] (B*H*T*C elements) and the per-chunk states with their exclusive prefix sums
    [B, H, T/C, dh, dh] (2*B*H*T*dh^2/C elements).

    Cost model (FLOPs and bytes; C = chunk_size, Tp = T rounded up to a multiple of C (padding is computed),
    dh = dk = dv, el = layer bytes per element, ea = accumulation bytes per element (4 for fp16/bf16)):
    - fwd:  proj = 8*B*T*D*H*dh (q, k, v, o projections);
            mix  = B*H*Tp*(4*C*dh + 4*dh^2): intra-chunk phi(Q)phi(K)^T and its product with V over full
                   C x C blocks, per-chunk phi(K)^T V and the inter-chunk phi(Q) S_prev;
            + normalize: B*H*Tp*(C + 3*dh) (row sums, phi(Q) z_prev, the division); the chunk prefix sums
              (B*H*Tp*dh^2/C) and phi are left out as small.
            bytes = weights + x read + y write (2*B*T*D*el) + q, k, v, o written once and read once
                  (8*B*T*H*dh*el) + the chunk states written once and read once (2*B*H*(Tp/C)*dh^2*ea).
    - bwd (forward + backward, backward ~ 2x forward): 3 * fwd flops, 3 * fwd bytes (an estimate).
    - decode (one token, any context: the state is constant-size):
            flops = 8*B*D*H*dh + 4*B*H*dk*dv (update S, read out phi(q)^T S) + normalize: B*H*(3*dk + dv);
            bytes = weights + state read and written (2 * state_bytes) + x_t read, y_t write (2*B*D*el).
    """

    kind = "linear"
    Options = LinearAttentionOptions
    supports_cuda_graph = True

    def __init__(self, d_model: int, heads: int, head_dim: int, options: LinearAttentionOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        inner = heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    # --- helpers -------------------------------------------------------------------------------------
    @property
    def accum_dtype(self) -> torch.dtype:
        """dtype of the math and the decode state: float32 for fp16/bf16 layers, else the layer dtype."""
        return torch.float32 if self.dtype in _HALF else self.dtype

    def _phi(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0 if self.options.feature_map == "elu+1" else x

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x[B, T, D] -> phi(q), phi(k), v [B, H, T, dh] in the accumulation dtype."""
        B, T, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.heads, self.head_dim).transpose(1, 2).to(self.accum_dtype)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        return self._phi(q), self._phi(k), v

    def _output(self, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """o[B, H, T, dh] -> y[B, T, D], cast back to the input dtype."""
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim).to(dtype))

    def _chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, LinearState]:
        """Chunked parallel form. q, k = phi(q), phi(k), v [B, H, T, dh] -> o[B, H, T, dh], final state."""
        B, H, T, dh = q.shape
        C = self.options.chunk_size
        nb = -(-T // C)
        # Padding after phi: padded keys and values are zero, so they add nothing to scores or states, and
        # padded queries give o = 0 / eps = 0 before being sliced off.
        pad = nb * C - T
        qc, kc, vc = (F.pad(t, (0, 0, 0, pad)).view(B, H, nb, C, dh) for t in (q, k, v))
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, nb, C, C]
        chunk_kv = kc.transpose(-1, -2) @ vc  # [B, H, nb, dk, dv]: phi(K_c)^T V_c
        # Exclusive prefix over chunks: what every earlier chunk contributed, shifted so chunk 0 sees zero.
        kv_incl = chunk_kv.cumsum(dim=2)
        kv_prev = torch.cat([torch.zeros_like(kv_incl[:, :, :1]), kv_incl[:, :, :-1]], dim=2)
        o = scores @ vc + qc @ kv_prev
        z_final = None
        if self.options.normalize:
            chunk_k = kc.sum(dim=3)  # [B, H, nb, dk]
            k_incl = chunk_k.cumsum(dim=2)
            k_prev = torch.cat([torch.zeros_like(k_incl[:, :, :1]), k_incl[:, :, :-1]], dim=2)
            denom = scores.sum(dim=-1) + (qc @ k_prev.unsqueeze(-1)).squeeze(-1)  # [B, H, nb, C]
            o = o / (denom.unsqueeze(-1) + self.options.eps)
            z_final = k_incl[:, :, -1]
        o = o.reshape(B, H, nb * C, dh)[:, :, :T]
        return o, LinearState(kv_incl[:, :, -1], z_final)

    # --- the interface -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, T, D] -> y[B, T, D]."""
        with phase("projections"):
            qkv = self._project(x)
        with phase("core"):
            o, _ = self._chunked(*qkv)
        with phase("output projection"):
            return self._output(o, x.dtype)

    def prefill(self, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, LinearState]:
        """Run the prompt x[B, T, D]; return y[B, T, D] and the state after it (`capacity` is irrelevant:
        the state has a fixed size)."""
        o, state = self._chunked(*self._project(x))
        state = LinearState(state.S.detach().clone(), None if state.z is None else state.z.detach().clone())
        return self._output(o, x.dtype), state

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: LinearState) -> tuple[torch.Tensor, LinearState]:
        """Consume one token x_t[B, 1, D]; return y_t[B, 1, D] and a new state (the input is never written)."""
        with phase("projections"):
            q, k, v = (t[:, :, 0] for t in self._project(x_t))  # [B, H, dh]
        with phase("state update"):
            S = state.S + k.unsqueeze(-1) * v.unsqueeze(-2)
            z = state.z + k if self.options.normalize else None
        with phase("read"):
            o = (q.unsqueeze(-2) @ S).squeeze(-2)  # [B, H, dv]
            if self.options.normalize:
                o = o / ((q * z).sum(dim=-1, keepdim=True) + self.options.eps)
        with phase("output projection"):
            return self._output(o.unsqueeze(2), x_t.dtype), LinearState(S, z)

    @torch.no_grad()
    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Associative-memory probe (see SequenceLayer.probe_memory): S = sum_i phi(k_i) v_i^T and
        z = sum_i phi(k_i) over the written pairs, read as phi(q)^T S (/ (phi(q)^T z + eps) if normalize).
        keys[B, H, N, dk], values[B, H, N, dv], queries[B, H, M, dk] -> reads[B, H, M, dv] in the
        accumulation dtype."""
        ad = self.accum_dtype
        k, q, v = self._phi(keys.to(ad)), self._phi(queries.to(ad)), values.to(ad)
        o = q @ (k.transpose(-1, -2) @ v)  # S [B, H, dk, dv] is the whole state
        if self.options.normalize:
            o = o / (q @ k.sum(dim=2).unsqueeze(-1) + self.options.eps)
        return o

    def state_bytes(self, batch: int, seq: int) -> int:
        """batch * H * dk * (dv + 1 if normalize else dv) * accumulation bytes; independent of `seq`."""
        per_head = self.head_dim * (self.head_dim + (1 if self.options.normalize else 0))
        return batch * self.heads * per_head * torch.empty((), dtype=self.accum_dtype).element_size()

    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        B, T, D, H, dh = batch, seq, self.d_model, self.heads, self.head_dim
        C = self.options.chunk_size
        el, weights = self.element_size, self.weight_bytes()
        ea = torch.empty((), dtype=self.accum_dtype).element_size()
        proj_per_token = 8 * D * H * dh
        if mode in ("fwd", "bwd"):
            Tp = -(-T // C) * C
            mix = B * H * Tp * (4 * C * dh + 4 * dh * dh)
            if self.options.normalize:
                mix += B * H * Tp * (C + 3 * dh)
            flops = B * T * proj_per_token + mix
            nbytes = weights + 2 * B * T * D * el + 8 * B * T * H * dh * el + 2 * B * H * (Tp // C) * dh * dh * ea
            scale = 1 if mode == "fwd" else 3
            return Cost(float(scale * flops), float(scale * nbytes))
        if mode == "decode":
            flops = B * proj_per_token + 4 * B * H * dh * dh
            if self.options.normalize:
                flops += B * H * 4 * dh  # 3*dk + dv with dk = dv = dh
            nbytes = weights + 2 * self.state_bytes(B, seq) + 2 * B * D * el
            return Cost(float(flops), float(nbytes))
        raise ValueError(f"unknown mode {mode!r}; allowed: fwd, bwd, decode")

    def implementation(self) -> str:
        return "torch-chunked"
