"""PyTorch core of the decay and delta-rule linear recurrences: a chunked form (forward, training) and a
recurrent form (decode, reference), shared by GLA, Mamba2/SSD, RetNet, DeltaNet and Gated DeltaNet.

Layout [B, H, T, D] throughout; the state S[B, H, dk, dv] maps keys to values (o_t = scale * S_t^T q_t).
Gates are in log space, like fla's: g[B, H, T] (one decay per head and token) or g[B, H, T, dk] (one per key
channel), decay = exp(g) in (0, 1].

Decay family:  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
Delta rule:    S_t = a_t S_{t-1} + beta_t k_t (v_t - (a_t S_{t-1})^T k_t)^T,  a_t = exp(g_t) (scalar per head)
               i.e. S_t = (I - beta_t k_t k_t^T) a_t S_{t-1} + beta_t k_t v_t^T in this [dk, dv] layout.

Numerics: within a chunk only decay ratios exp(b_i - b_j) with j <= i (b the in-chunk cumulative log decay)
are ever formed, masked before the exp, so every exponent is <= 0 and no gate value can overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad_chunks(t: torch.Tensor, C: int, nb: int) -> torch.Tensor:
    """[B, H, T, ...] -> [B, H, nb, C, ...] zero-padded along T (padded keys/values add nothing and padded
    log gates are 0, i.e. no decay, so the final state is that of the last real token)."""
    B, H, T = t.shape[:3]
    rest = t.shape[3:]
    pad = nb * C - T
    if pad:
        t = F.pad(t, (0, 0) * len(rest) + (0, pad))
    return t.reshape(B, H, nb, C, *rest)


def _new_state(q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    if initial_state is not None:
        return initial_state
    B, H, _, dk = q.shape
    return q.new_zeros(B, H, dk, v.shape[-1])


# --- decay family -------------------------------------------------------------------------------------------
def decay_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                    initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token. q, k [B, H, T, dk], v [B, H, T, dv], g [B, H, T] or [B, H, T, dk]
    -> o [B, H, T, dv], final state [B, H, dk, dv]. The input state is never written."""
    S = _new_state(q, v, initial_state)
    per_channel = g.dim() == 4
    outs = []
    for t in range(q.shape[2]):
        decay = g[:, :, t].exp().unsqueeze(-1) if per_channel else g[:, :, t].exp()[..., None, None]
        S = decay * S + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        outs.append(scale * (q[:, :, t].unsqueeze(-2) @ S).squeeze(-2))
    return torch.stack(outs, dim=2), S


def decay_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                  chunk_size: int, initial_state: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form of `decay_recurrent` (same arguments and results).

    Per chunk with in-chunk cumulative log decay b (inclusive) and state S at the chunk start:
        o_i = scale * (sum_{j<=i} (q_i * exp(b_i - b_j)) . k_j v_j + (q_i * exp(b_i))^T S)
        S  <- exp(b_C) * S + sum_j (k_j * exp(b_C - b_j)) v_j^T
    Intra-chunk terms of every chunk at once; only the state pass loops over chunks.
    Memory: scores [B, H, T, C] (per-channel gates: [B, H, T, C, dk]) and one state per chunk.
    """
    B, H, T, dk = q.shape
    C = chunk_size
    nb = -(-T // C)
    per_channel = g.dim() == 4
    qc, kc, vc, gc = (_pad_chunks(t, C, nb) for t in (q, k, v, g))
    b = gc.cumsum(dim=3)  # [B, H, nb, C(, dk)]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if per_channel:
        diff = b.unsqueeze(4) - b.unsqueeze(3)  # [B, H, nb, C_i, C_j, dk]: b_i - b_j
        ratio = diff.masked_fill(~causal[..., None], -torch.inf).exp()
        scores = ((kc.unsqueeze(3) * ratio) @ qc.unsqueeze(-1)).squeeze(-1)  # sum_d q_id k_jd ratio_ijd
        q_dec = qc * b.exp()
        k_dec = kc * (b[:, :, :, -1:] - b).exp()
        chunk_decay = b[:, :, :, -1].exp().unsqueeze(-1)  # [B, H, nb, dk, 1]
    else:
        diff = b.unsqueeze(4) - b.unsqueeze(3)  # [B, H, nb, C, C]
        scores = (qc @ kc.transpose(-1, -2)) * diff.masked_fill(~causal, -torch.inf).exp()
        q_dec = qc * b.exp().unsqueeze(-1)
        k_dec = kc * (b[:, :, :, -1:] - b).exp().unsqueeze(-1)
        chunk_decay = b[:, :, :, -1].exp()[..., None, None]  # [B, H, nb, 1, 1]
    chunk_kv = k_dec.transpose(-1, -2) @ vc  # [B, H, nb, dk, dv]
    S = _new_state(q, v, initial_state)
    starts = []
    for n in range(nb):
        starts.append(S)
        S = chunk_decay[:, :, n] * S + chunk_kv[:, :, n]
    S_start = torch.stack(starts, dim=2)  # [B, H, nb, dk, dv]
    o = scale * (scores @ vc + q_dec @ S_start)
    return o.reshape(B, H, nb * C, -1)[:, :, :T], S


# --- delta rule ---------------------------------------------------------------------------------------------
def delta_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                    g: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token. q, k [B, H, T, dk] (L2-normalised by the caller), v [B, H, T, dv], beta [B, H, T],
    g [B, H, T] log decay or None (DeltaNet: no decay) -> o [B, H, T, dv], final state [B, H, dk, dv]."""
    S = _new_state(q, v, initial_state)
    outs = []
    for t in range(q.shape[2]):
        if g is not None:
            S = g[:, :, t].exp()[..., None, None] * S
        k_t = k[:, :, t]
        v_old = (k_t.unsqueeze(-2) @ S).squeeze(-2)  # [B, H, dv]: what S recalls for k_t
        S = S + beta[:, :, t, None, None] * k_t.unsqueeze(-1) * (v[:, :, t] - v_old).unsqueeze(-2)
        outs.append(scale * (q[:, :, t].unsqueeze(-2) @ S).squeeze(-2))
    return torch.stack(outs, dim=2), S


def delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                  g: torch.Tensor | None, scale: float, chunk_size: int,
                  initial_state: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY) form of `delta_recurrent` (same arguments and results).

    In a chunk with state S at its start and G_i = exp(b_i) the in-chunk cumulative decay, the state is
    S_i = G_i S + sum_{j<=i} (G_i/G_j) k_j u_j^T with the corrected values u solving the unit lower
    triangular system (I + A) U = diag(beta) (V - diag(G) K S), A_ij = beta_i (G_i/G_j) k_i.k_j for j < i.
    So U = Wv - Wk S with Wv = (I+A)^-1 diag(beta) V and Wk = (I+A)^-1 diag(beta G) K, computed for every
    chunk at once; the loop over chunks only does U = Wv - Wk S, the outputs
    o_i = scale * (G_i q_i^T S + sum_{j<=i} (G_i/G_j) (q_i.k_j) u_j)
    and the state S <- G_C S + sum_j (G_C/G_j) k_j u_j^T.
    """
    B, H, T, dk = q.shape
    C = chunk_size
    nb = -(-T // C)
    qc, kc, vc, bc = (_pad_chunks(t, C, nb) for t in (q, k, v, beta))
    if g is None:
        b = torch.zeros_like(bc)
    else:
        b = _pad_chunks(g, C, nb).cumsum(dim=3)  # [B, H, nb, C]
    eye = torch.eye(C, dtype=torch.bool, device=q.device)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    ratio = (b.unsqueeze(4) - b.unsqueeze(3)).masked_fill(~causal, -torch.inf).exp()  # [.., C_i, C_j]
    kk = kc @ kc.transpose(-1, -2)
    A = (bc.unsqueeze(-1) * kk * ratio).masked_fill(causal.logical_not() | eye, 0.0) + eye.to(q.dtype)
    rhs = torch.cat([bc.unsqueeze(-1) * vc, (bc * b.exp()).unsqueeze(-1) * kc], dim=-1)
    W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    Wv, Wk = W[..., :v.shape[-1]], W[..., v.shape[-1]:]
    P = (qc @ kc.transpose(-1, -2)) * ratio  # [B, H, nb, C, C], zero above the diagonal
    q_dec = qc * b.exp().unsqueeze(-1)
    k_dec = kc * (b[:, :, :, -1:] - b).exp().unsqueeze(-1)
    chunk_decay = b[:, :, :, -1].exp()[..., None, None]
    S = _new_state(q, v, initial_state)
    outs = []
    for n in range(nb):
        U = Wv[:, :, n] - Wk[:, :, n] @ S
        outs.append(q_dec[:, :, n] @ S + P[:, :, n] @ U)
        S = chunk_decay[:, :, n] * S + k_dec[:, :, n].transpose(-1, -2) @ U
    o = scale * torch.stack(outs, dim=2)
    return o.reshape(B, H, nb * C, -1)[:, :, :T], S


# --- shared pieces of the layers ----------------------------------------------------------------------------
def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                tail: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Short causal depthwise convolution. x [B, T, Ch], weight [Ch, K], tail [B, K-1, Ch] (the previous
    K-1 inputs, zeros at the start) -> y [B, T, Ch] and the new tail (the last K-1 inputs, input dtype)."""
    B, T, Ch = x.shape
    K = weight.shape[1]
    if tail is None:
        tail = x.new_zeros(B, K - 1, Ch)
    full = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, K-1+T, Ch]
    # K shifted multiply-adds: for a few taps this beats F.conv1d's depthwise path on CPU by far
    y = sum(full[:, i:i + T] * weight[:, i] for i in range(K))
    if bias is not None:
        y = y + bias
    return y, full[:, full.shape[1] - (K - 1):].clone()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (per head), weight [last dim]."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight
