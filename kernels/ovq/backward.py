"""Triton backward of the OVQ-attention core (the autograd Function pairing it with a forward is function.py).

The dictionary sums are linear in the keys and values written into them, S_{c+1} = S_c + sum over the
chunk's tokens of onehot(z_t) (k_t, v_t), with the assignments z fixed by the forward. So with
G_c = dL/dS_c, a token t written in chunk c gets dk_t += G_{c+1}[z_t] (and dv_t likewise), and
G_c = G_{c+1} + (gradient of chunk c's read with respect to S_c). One program per (batch, head) walks the
chunks backwards: gather G for the chunk's tokens, un-write the chunk (S_c = S_{c+1} minus its tokens, exact
for the counts, float32 rounding for the sums), then the read's backward over the active slots (flash-style,
probabilities recomputed from the forward's log-sum-exp) and the causal local block, adding the slot
gradients into G. `grad_through_state: false` drops G (the reference detaches the state per chunk).

Read gradient with respect to the sums: D_k = S_k / |S_k| gives dS_k = (dD - D (D . dD)) / |S_k|
(or dD / c without normalisation); D_v = S_v / c gives dS_v = dD_v / c. Counts carry no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import OVQConfig
from .forward import _dict_dot, _dot, _key_dot, _slot_tile, dict_mode, exact_dots, schedule_tensors


@triton.jit
def ovq_bwd_kernel(Q, K, V, DO, LSE, DELTA, Z, BETA, SK, SV, CNT, GK, GV, DQ, DKO, DVO, DBETA, NACT,
                   T, H, N, n_write, n_chunks,
                   L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
                   NORMALIZE: tl.constexpr, THROUGH_STATE: tl.constexpr, IEEE: tl.constexpr,
                   DICT: tl.constexpr):
    bh = tl.program_id(0)
    h = bh % H
    beta = tl.load(BETA + h).to(tl.float32)
    rows = tl.arange(0, L)
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    slot_ids = tl.arange(0, BN)
    sk_base = SK + bh * N * DK
    sv_base = SV + bh * N * DV
    c_base = CNT + bh * N
    gk_base = GK + bh * N * DK
    gv_base = GV + bh * N * DV
    dbeta = tl.sum(tl.zeros([L], tl.float32), axis=0)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        pos = c * L + rows
        valid = pos < T
        q = tl.load(Q + bh * T * DK + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(K + bh * T * DK + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + bh * T * DV + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
        do = tl.load(DO + bh * T * DV + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
        lse = tl.load(LSE + bh * T + pos, mask=valid, other=float("inf"))
        delta = tl.load(DELTA + bh * T + pos, mask=valid, other=0.0)
        dk_acc = tl.zeros([L, DK], tl.float32)
        dv_acc = tl.zeros([L, DV], tl.float32)
        if c < n_write:
            z = tl.load(Z + bh * (n_write * L) + pos)
            if THROUGH_STATE:
                dk_acc += tl.load(gk_base + z[:, None] * DK + dk[None, :], cache_modifier=".cg")
                dv_acc += tl.load(gv_base + z[:, None] * DV + dv[None, :], cache_modifier=".cg")
            # Relaxed, as in the forward: this program alone reads the sums, after the block barrier below.
            tl.atomic_add(sk_base + z[:, None] * DK + dk[None, :], -k.to(tl.float32), sem="relaxed")
            tl.atomic_add(sv_base + z[:, None] * DV + dv[None, :], -v.to(tl.float32), sem="relaxed")
            tl.atomic_add(c_base + z, tl.full([L], -1.0, tl.float32), sem="relaxed")
        tl.debug_barrier()
        n = tl.load(NACT + c)
        dq = tl.zeros([L, DK], tl.float32)
        for s0 in range(0, n, BN):
            slots = s0 + slot_ids
            smask = slots < n
            sk, cnt, norm = _slot_tile(sk_base, c_base, slots, smask, dk, DK, NORMALIZE)
            sv = tl.load(sv_base + slots[:, None] * DV + dv[None, :], mask=smask[:, None], other=0.0,
                         cache_modifier=".cg")
            d_k = sk / norm[:, None]  # D_k [BN, DK] float32
            d_v = sv / cnt[:, None]   # D_v [BN, DV]
            dots = _key_dot(q, tl.trans(d_k), IEEE, DICT)
            s = beta * dots + tl.log(cnt)[None, :]
            p = tl.where(smask[None, :] & valid[:, None], tl.exp(s - lse[:, None]), 0.0)
            dp = _dict_dot(do, tl.trans(d_v), IEEE, DICT)
            ds = p * (dp - delta[:, None])
            dq += beta * _dict_dot(ds, d_k, IEEE, DICT)
            dbeta += tl.sum(tl.sum(ds * dots, axis=1), axis=0)
            if THROUGH_STATE:
                d_dk = beta * _dict_dot(tl.trans(ds), q, IEEE, DICT)  # dL/dD_k [BN, DK]
                d_dv = _dict_dot(tl.trans(p), do, IEEE, DICT)         # dL/dD_v [BN, DV]
                if NORMALIZE:
                    d_sk = (d_dk - d_k * tl.sum(d_k * d_dk, axis=1)[:, None]) / norm[:, None]
                else:
                    d_sk = d_dk / cnt[:, None]
                d_sv = d_dv / cnt[:, None]
                gk_ptr = gk_base + slots[:, None] * DK + dk[None, :]
                gv_ptr = gv_base + slots[:, None] * DV + dv[None, :]
                gk = tl.load(gk_ptr, mask=smask[:, None], other=0.0, cache_modifier=".cg")
                gv = tl.load(gv_ptr, mask=smask[:, None], other=0.0, cache_modifier=".cg")
                tl.store(gk_ptr, gk + d_sk, mask=smask[:, None])
                tl.store(gv_ptr, gv + d_sv, mask=smask[:, None])
        # The causal local block.
        qk = _dot(q, tl.trans(k), IEEE)
        visible = (rows[None, :] <= rows[:, None]) & valid[None, :] & valid[:, None]
        p = tl.where(visible, tl.exp(beta * qk - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += beta * _dot(ds.to(k.dtype), k, IEEE)
        dbeta += tl.sum(tl.sum(ds * qk, axis=1), axis=0)
        dk_acc += beta * _dot(tl.trans(ds).to(q.dtype), q, IEEE)
        dv_acc += _dot(tl.trans(p).to(do.dtype), do, IEEE)
        out_k = pos[:, None] * DK + dk[None, :]
        out_v = pos[:, None] * DV + dv[None, :]
        tl.store(DQ + bh * T * DK + out_k, dq.to(DQ.dtype.element_ty), mask=valid[:, None])
        tl.store(DKO + bh * T * DK + out_k, dk_acc.to(DKO.dtype.element_ty), mask=valid[:, None])
        tl.store(DVO + bh * T * DV + out_v, dv_acc.to(DVO.dtype.element_ty), mask=valid[:, None])
        tl.debug_barrier()
    tl.store(DBETA + bh, dbeta)


def _rowwise_dot_f32(a: torch.Tensor, b: torch.Tensor, elements_per_block: int = 1 << 24) -> torch.Tensor:
    """sum(a * b, -1) in float32 for a, b [B, H, T, d] of any strides -> [B, H, T], in blocks along T so the
    float32 copies stay small (whole-tensor copies would be 2 x 512 MiB at B=1, H=16, T=64k, d=128)."""
    B, H, T, d = a.shape
    out = torch.empty(B, H, T, dtype=torch.float32, device=a.device)
    step = max(1, elements_per_block // max(1, B * H * d))
    for t in range(0, T, step):
        out[:, :, t:t + step] = (a[:, :, t:t + step].float() * b[:, :, t:t + step].float()).sum(-1)
    return out


def ovq_backward_triton(q, k, v, o, do, lse, z, beta, sk, sv, cnt, cfg: OVQConfig, block_slots: int | None = None,
                        num_warps: int = 8, dict_precision: str = "tf32"):
    """Gradients (dq, dk, dv [B, H, T, d] in the dtype of q, k, v; dbeta [H] float32) of the core's output o
    given do.
    sk, sv, cnt are the forward's final dictionary sums; they are copied, not changed."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    L, N = cfg.chunk_size, cfg.dict_size
    n_chunks, n_write = -(-T // L), T // L
    dev = q.device
    dmode = dict_mode(q.dtype, dict_precision)  # checks dict_precision before any work
    nact, _ = schedule_tensors(cfg, n_chunks, n_write, dev)
    delta = _rowwise_dot_f32(do, o)
    # Stored in the input dtype (the kernel accumulates in float32 and casts on store): float32 gradients
    # plus their casts would hold 1.5x the bytes of q, k, v at the backward's peak.
    dq = torch.empty(B, H, T, DK, dtype=q.dtype, device=dev)
    dk_ = torch.empty_like(dq)
    dv_ = torch.empty(B, H, T, DV, dtype=v.dtype, device=dev)
    dbeta = torch.empty(B * H, dtype=torch.float32, device=dev)
    through = cfg.grad_through_state
    gk = torch.zeros(B, H, N, DK, dtype=torch.float32, device=dev) if through else sk.new_zeros(1)
    gv = torch.zeros(B, H, N, DV, dtype=torch.float32, device=dev) if through else sk.new_zeros(1)
    z = z if z.numel() else torch.zeros(1, dtype=torch.int32, device=dev)
    if block_slots is None:  # five float32 [BN, d] tiles per slot block: keep them inside shared memory
        block_slots = 32 if max(DK, DV) > 64 else 64
    bn = max(16, min(block_slots, triton.next_power_of_2(N)))
    ovq_bwd_kernel[(B * H,)](
        q.contiguous(), k.contiguous(), v.contiguous(), do.to(q.dtype).contiguous(), lse, delta, z,
        beta.to(torch.float32).contiguous(), sk.clone(), sv.clone(), cnt.clone(), gk, gv, dq, dk_, dv_, dbeta,
        nact, T, H, N, n_write, n_chunks,
        L=L, DK=DK, DV=DV, BN=bn, NORMALIZE=cfg.normalize_centroids, THROUGH_STATE=through,
        IEEE=exact_dots(q.dtype), DICT=dmode, num_warps=num_warps, num_stages=1)
    return dq, dk_, dv_, dbeta.view(B, H).sum(0)
