"""Triton backward of the OVQ-attention core with the slots of each (batch, head) split over P programs.

The math is `backward.py`'s (read it first); here P programs share a (batch, head), program p owning slots
p, p + P, ... (as in forward_split.py), and walk the chunks backwards. Per chunk:

- phase A (every program): for the chunk's tokens written into its slots, gather G = dL/dS of the state after
  the chunk (their dk, dv through the state; every written token has exactly one owner) into a shared [L, d]
  scratch, and un-write them; then the read's backward over its own slots (probabilities recomputed from the
  forward's log-sum-exp, so no cross-program softmax), adding into G of its slots and into a partial dq [L, dk].
  Program 0 also does the causal L x L block (its dq part joins its partial; dk, dv parts go to scratch).
- barrier (forward_split's `_barrier`; double-buffered scratch, one barrier per chunk).
- phase B (every program): for its L/P rows, dq = sum of the P partials, dk and dv = gathered G part + local
  part; one store each, cast to the input dtype.

dbeta: one float32 partial per program, summed on the host. Persistent kernel and stepped path as in
forward_split.py (the stepped one runs P > 1 under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backward import _rowwise_dot_f32
from .config import OVQConfig
from .forward import _dict_dot, _dot, _key_dot, _slot_tile, dict_mode, exact_dots, schedule_tensors
from .forward_split import _barrier, _interpreted, _sm_count, split_programs


@triton.jit
def _bwd_phase_a(c, bh, p, beta, Q, K, V, DO, LSE, DELTA, Z, SK, SV, CNT, GK, GV, NACT,
                 PDQ, SGK, SGV, SLK, SLV, T, N, n_write,
                 P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
                 NORMALIZE: tl.constexpr, THROUGH_STATE: tl.constexpr, IEEE: tl.constexpr,
                 DICT: tl.constexpr):
    """Chunk c's per-slot work on program p's slots; returns its dbeta contribution (float32 scalar)."""
    rows = tl.arange(0, L)
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    slot_ids = tl.arange(0, BN)
    sk_base = SK + bh * N * DK
    sv_base = SV + bh * N * DV
    c_base = CNT + bh * N
    gk_base = GK + bh * N * DK
    gv_base = GV + bh * N * DV
    par = c % 2
    pos = c * L + rows
    valid = pos < T
    q = tl.load(Q + bh * T * DK + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
    do = tl.load(DO + bh * T * DV + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + pos, mask=valid, other=float("inf"))
    delta = tl.load(DELTA + bh * T + pos, mask=valid, other=0.0)
    scratch = (bh * 2 + par) * L + rows  # row index into the [B * H, 2, L, d] scratches
    if c < n_write:
        k = tl.load(K + bh * T * DK + pos[:, None] * DK + dk[None, :])
        v = tl.load(V + bh * T * DV + pos[:, None] * DV + dv[None, :])
        z = tl.load(Z + bh * (n_write * L) + pos)
        own = (z % P) == p
        if THROUGH_STATE:
            g_k = tl.load(gk_base + z[:, None] * DK + dk[None, :], mask=own[:, None], cache_modifier=".cg")
            g_v = tl.load(gv_base + z[:, None] * DV + dv[None, :], mask=own[:, None], cache_modifier=".cg")
            tl.store(SGK + scratch[:, None] * DK + dk[None, :], g_k, mask=own[:, None])
            tl.store(SGV + scratch[:, None] * DV + dv[None, :], g_v, mask=own[:, None])
        # Relaxed: only this program reads its sums, after a block barrier (see forward.py).
        tl.atomic_add(sk_base + z[:, None] * DK + dk[None, :], -k.to(tl.float32), mask=own[:, None],
                      sem="relaxed")
        tl.atomic_add(sv_base + z[:, None] * DV + dv[None, :], -v.to(tl.float32), mask=own[:, None],
                      sem="relaxed")
        tl.atomic_add(c_base + z, tl.full([L], -1.0, tl.float32), mask=own, sem="relaxed")
    tl.debug_barrier()
    n = tl.load(NACT + c)
    dq = tl.zeros([L, DK], tl.float32)
    dbeta = tl.sum(tl.zeros([L], tl.float32), axis=0)
    owned = (n - p + P - 1) // P
    for t0 in range(0, owned, BN):
        slots = (t0 + slot_ids) * P + p
        smask = slots < n
        sk, cnt, norm = _slot_tile(sk_base, c_base, slots, smask, dk, DK, NORMALIZE)
        sv = tl.load(sv_base + slots[:, None] * DV + dv[None, :], mask=smask[:, None], other=0.0,
                     cache_modifier=".cg")
        d_k = sk / norm[:, None]  # D_k [BN, DK] float32
        d_v = sv / cnt[:, None]   # D_v [BN, DV]
        dots = _key_dot(q, tl.trans(d_k), IEEE, DICT)
        s = beta * dots + tl.log(cnt)[None, :]
        pr = tl.where(smask[None, :] & valid[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = _dict_dot(do, tl.trans(d_v), IEEE, DICT)
        ds = pr * (dp - delta[:, None])
        dq += beta * _dict_dot(ds, d_k, IEEE, DICT)
        dbeta += tl.sum(tl.sum(ds * dots, axis=1), axis=0)
        if THROUGH_STATE:
            d_dk = beta * _dict_dot(tl.trans(ds), q, IEEE, DICT)  # dL/dD_k [BN, DK]
            d_dv = _dict_dot(tl.trans(pr), do, IEEE, DICT)        # dL/dD_v [BN, DV]
            if NORMALIZE:
                d_sk = (d_dk - d_k * tl.sum(d_k * d_dk, axis=1)[:, None]) / norm[:, None]
            else:
                d_sk = d_dk / cnt[:, None]
            gk_ptr = gk_base + slots[:, None] * DK + dk[None, :]
            gv_ptr = gv_base + slots[:, None] * DV + dv[None, :]
            gk = tl.load(gk_ptr, mask=smask[:, None], other=0.0, cache_modifier=".cg")
            gv = tl.load(gv_ptr, mask=smask[:, None], other=0.0, cache_modifier=".cg")
            tl.store(gk_ptr, gk + d_sk, mask=smask[:, None])
            tl.store(gv_ptr, gv + d_dv / cnt[:, None], mask=smask[:, None])
    if p == 0:  # the causal local block, once per (batch, head)
        k = tl.load(K + bh * T * DK + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + bh * T * DV + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
        qk = _dot(q, tl.trans(k), IEEE)
        visible = (rows[None, :] <= rows[:, None]) & valid[None, :] & valid[:, None]
        pr = tl.where(visible, tl.exp(beta * qk - lse[:, None]), 0.0)
        ds = pr * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dq += beta * _dot(ds.to(k.dtype), k, IEEE)
        dbeta += tl.sum(tl.sum(ds * qk, axis=1), axis=0)
        tl.store(SLK + scratch[:, None] * DK + dk[None, :], beta * _dot(tl.trans(ds).to(q.dtype), q, IEEE))
        tl.store(SLV + scratch[:, None] * DV + dv[None, :], _dot(tl.trans(pr).to(do.dtype), do, IEEE))
    tl.store(PDQ + (((bh * 2 + par) * P + p) * L + rows)[:, None] * DK + dk[None, :], dq)
    return dbeta


@triton.jit
def _bwd_phase_b(c, bh, p, PDQ, SGK, SGV, SLK, SLV, DQ, DKO, DVO, T, n_write,
                 P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                 THROUGH_STATE: tl.constexpr):
    """dq, dk, dv of chunk c for program p's L/P rows, from the partials and scratches (read past L1)."""
    RB: tl.constexpr = L // P
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    par = c % 2
    rb = p * RB + tl.arange(0, RB)
    dq = tl.zeros([RB, DK], tl.float32)
    for j in tl.static_range(P):
        dq += tl.load(PDQ + (((bh * 2 + par) * P + j) * L + rb)[:, None] * DK + dk[None, :], cache_modifier=".cg")
    scratch = (bh * 2 + par) * L + rb
    d_k = tl.load(SLK + scratch[:, None] * DK + dk[None, :], cache_modifier=".cg")
    d_v = tl.load(SLV + scratch[:, None] * DV + dv[None, :], cache_modifier=".cg")
    if THROUGH_STATE:
        if c < n_write:
            d_k += tl.load(SGK + scratch[:, None] * DK + dk[None, :], cache_modifier=".cg")
            d_v += tl.load(SGV + scratch[:, None] * DV + dv[None, :], cache_modifier=".cg")
    pos = c * L + rb
    valid = pos < T
    out_k = bh * T * DK + pos[:, None] * DK + dk[None, :]
    out_v = bh * T * DV + pos[:, None] * DV + dv[None, :]
    tl.store(DQ + out_k, dq.to(DQ.dtype.element_ty), mask=valid[:, None])
    tl.store(DKO + out_k, d_k.to(DKO.dtype.element_ty), mask=valid[:, None])
    tl.store(DVO + out_v, d_v.to(DVO.dtype.element_ty), mask=valid[:, None])


@triton.jit
def ovq_bwd_split_kernel(Q, K, V, DO, LSE, DELTA, Z, BETA, SK, SV, CNT, GK, GV, NACT, PDQ, SGK, SGV, SLK, SLV,
                         FLAGS, DQ, DKO, DVO, DBETA, T, H, N, n_write, n_chunks,
                         P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                         BN: tl.constexpr, NORMALIZE: tl.constexpr, THROUGH_STATE: tl.constexpr,
                         IEEE: tl.constexpr, DICT: tl.constexpr):
    """Persistent: grid (B * H * P,), every chunk (last first) in one launch."""
    pid = tl.program_id(0)
    bh = pid // P
    p = pid % P
    beta = tl.load(BETA + bh % H).to(tl.float32)
    dbeta = tl.sum(tl.zeros([L], tl.float32), axis=0)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        dbeta += _bwd_phase_a(c, bh, p, beta, Q, K, V, DO, LSE, DELTA, Z, SK, SV, CNT, GK, GV, NACT,
                              PDQ, SGK, SGV, SLK, SLV, T, N, n_write,
                              P, L, DK, DV, BN, NORMALIZE, THROUGH_STATE, IEEE, DICT)
        _barrier(FLAGS + bh * P, p, i + 1, P)
        _bwd_phase_b(c, bh, p, PDQ, SGK, SGV, SLK, SLV, DQ, DKO, DVO, T, n_write, P, L, DK, DV, THROUGH_STATE)
        tl.debug_barrier()
    tl.store(DBETA + pid, dbeta)


@triton.jit
def ovq_bwd_split_slots_kernel(c, Q, K, V, DO, LSE, DELTA, Z, BETA, SK, SV, CNT, GK, GV, NACT,
                               PDQ, SGK, SGV, SLK, SLV, DBETA, T, H, N, n_write,
                               P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                               BN: tl.constexpr, NORMALIZE: tl.constexpr, THROUGH_STATE: tl.constexpr,
                               IEEE: tl.constexpr, DICT: tl.constexpr):
    """Stepped phase A of chunk c: grid (B * H * P,); adds its dbeta into DBETA[program]."""
    pid = tl.program_id(0)
    bh = pid // P
    beta = tl.load(BETA + bh % H).to(tl.float32)
    dbeta = _bwd_phase_a(c, bh, pid % P, beta, Q, K, V, DO, LSE, DELTA, Z, SK, SV, CNT, GK, GV, NACT,
                         PDQ, SGK, SGV, SLK, SLV, T, N, n_write,
                         P, L, DK, DV, BN, NORMALIZE, THROUGH_STATE, IEEE, DICT)
    tl.store(DBETA + pid, tl.load(DBETA + pid) + dbeta)


@triton.jit
def ovq_bwd_split_rows_kernel(c, PDQ, SGK, SGV, SLK, SLV, DQ, DKO, DVO, T, n_write,
                              P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                              THROUGH_STATE: tl.constexpr):
    """Stepped phase B of chunk c: grid (B * H * P,)."""
    pid = tl.program_id(0)
    _bwd_phase_b(c, pid // P, pid % P, PDQ, SGK, SGV, SLK, SLV, DQ, DKO, DVO, T, n_write, P, L, DK, DV,
                 THROUGH_STATE)


def ovq_backward_split_triton(q, k, v, o, do, lse, z, beta, sk, sv, cnt, cfg: OVQConfig,
                              programs: int | None = None, stepped: bool | None = None,
                              block_slots: int | None = None, num_warps: int = 8, dict_precision: str = "tf32"):
    """`ovq_backward_triton`'s contract (same inputs and gradients) with the slots split over `programs`
    programs per (batch, head); programs and stepped as in `ovq_forward_split_triton`."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    L, N = cfg.chunk_size, cfg.dict_size
    n_chunks, n_write = -(-T // L), T // L
    dev = q.device
    dmode = dict_mode(q.dtype, dict_precision)  # checks dict_precision before any work
    if block_slots is None:  # five float32 [BN, d] tiles per slot block: keep them inside shared memory
        block_slots = 32 if max(DK, DV) > 64 else 64
    bn = max(16, min(block_slots, triton.next_power_of_2(N)))
    sms = _sm_count(dev)
    P = programs if programs is not None else split_programs(B * H, N, bn, L, sms)
    if P < 1 or P & (P - 1) or P > L:
        raise ValueError(f"programs must be a power of two between 1 and chunk_size={L}, got {P}")
    if stepped is None:
        stepped = P > 1 and _interpreted()
    if not stepped and P > 1 and (_interpreted() or B * H * P > sms):
        raise ValueError(f"the persistent split backward needs all B * H * programs = {B * H * P} programs "
                         f"resident at once ({sms} available; 1 under TRITON_INTERPRET=1); use stepped=True")
    nact, _ = schedule_tensors(cfg, n_chunks, n_write, dev)
    delta = _rowwise_dot_f32(do, o)
    dq = torch.empty(B, H, T, DK, dtype=q.dtype, device=dev)  # input dtype, as in ovq_backward_triton
    dk_ = torch.empty_like(dq)
    dv_ = torch.empty(B, H, T, DV, dtype=v.dtype, device=dev)
    dbeta = torch.zeros(B * H * P, dtype=torch.float32, device=dev)
    through = cfg.grad_through_state
    gk = torch.zeros(B, H, N, DK, dtype=torch.float32, device=dev) if through else sk.new_zeros(1)
    gv = torch.zeros(B, H, N, DV, dtype=torch.float32, device=dev) if through else sk.new_zeros(1)
    z = z if z.numel() else torch.zeros(1, dtype=torch.int32, device=dev)
    pdq = torch.empty(B * H, 2, P, L, DK, dtype=torch.float32, device=dev)
    sgk, slk = (torch.empty(B * H, 2, L, DK, dtype=torch.float32, device=dev) for _ in range(2))
    sgv, slv = (torch.empty(B * H, 2, L, DV, dtype=torch.float32, device=dev) for _ in range(2))
    ins = (q.contiguous(), k.contiguous(), v.contiguous(), do.to(q.dtype).contiguous(), lse, delta, z,
           beta.to(torch.float32).contiguous(), sk.clone(), sv.clone(), cnt.clone(), gk, gv, nact)
    scratch = (pdq, sgk, sgv, slk, slv)
    common = dict(P=P, L=L, DK=DK, DV=DV, THROUGH_STATE=through)
    slot_args = dict(BN=bn, NORMALIZE=cfg.normalize_centroids, IEEE=exact_dots(q.dtype), DICT=dmode)
    grid = (B * H * P,)
    if stepped:
        for c in reversed(range(n_chunks)):
            ovq_bwd_split_slots_kernel[grid](c, *ins, *scratch, dbeta, T, H, N, n_write, **common, **slot_args,
                                             num_warps=num_warps, num_stages=1)
            ovq_bwd_split_rows_kernel[grid](c, *scratch, dq, dk_, dv_, T, n_write, **common, num_warps=4)
    else:
        flags = torch.zeros(B * H, P, dtype=torch.int32, device=dev)
        ovq_bwd_split_kernel[grid](*ins, *scratch, flags, dq, dk_, dv_, dbeta, T, H, N, n_write, n_chunks,
                                   **common, **slot_args, num_warps=num_warps, num_stages=1)
    return dq, dk_, dv_, dbeta.view(B, H, P).sum((0, 2))
