"""Triton backward of the OVQ-attention core with the slots of each (batch, head) split over P programs.

The math is `backward.py`'s (read it first); here P programs share a (batch, head), program p owning slots
p, p + P, ... (as in forward_split.py), and walk the chunks backwards. Per chunk:

- phase A (every program), in row blocks of BM (tiles.py): for the chunk's tokens written into its slots,
  gather G = dL/dS of the state after the chunk (their dk, dv through the state; every written token has
  exactly one owner) into a shared [L, d] scratch, and un-write them; then the read's backward over its own
  slots (probabilities recomputed from the forward's log-sum-exp, so no cross-program softmax), adding into G
  of its slots and into a partial dq [L, dk]. Program 0 also does the causal local block (its dq part joins its partial; dk, dv parts go to scratch).
- barrier (forward_split's `barrier`; double-buffered scratch, one barrier per chunk).
- phase B (every program): for its L/P rows (RM at a time), dq = sum of the P partials, dk and dv = gathered G part + local
  part; one store each, cast to the input dtype.

dbeta: one float32 partial per program, summed on the host. Persistent kernel and stepped path as in
forward_split.py (the stepped one runs P > 1 under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .config import OVQConfig
from .launch_inputs import schedule_tensors
from .split import barrier, merge_rows, split_launch
from .tiles import grad_dict, grad_local_kv, grad_local_q, head_bases


@triton.jit
def _bwd_phase_a(c, bh, p, beta, Q, K, V, DO, LSE, DELTA, Z, SK, SV, CNT, GK, GV, NACT,
                 PDQ, SGK, SGV, SLK, SLV, T, N, n_write,
                 P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
                 BM: tl.constexpr, NORMALIZE: tl.constexpr, COUNT_BIAS: tl.constexpr,
                 THROUGH_STATE: tl.constexpr, IEEE: tl.constexpr, DICT: tl.constexpr):
    """Chunk c's per-slot work on program p's slots, in row blocks of BM; returns its dbeta contribution
    (float32 scalar)."""
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    q_base, k_base, v_base, do_base, sk_base, sv_base, c_base, gk_base, gv_base = head_bases(
        bh, T, N, Q, K, V, DO, SK, SV, CNT, GK, GV, DK, DV)
    par = c % 2
    dbeta = tl.sum(tl.zeros([BM], tl.float32), axis=0)
    for kb in range(0, L // BM):
        rows = kb * BM + tl.arange(0, BM)
        pos = c * L + rows
        valid = pos < T
        scratch = (bh * 2 + par) * L + rows  # row index into the [B * H, 2, L, d] scratches
        if c < n_write:
            k = tl.load(k_base + pos[:, None] * DK + dk[None, :])
            v = tl.load(v_base + pos[:, None] * DV + dv[None, :])
            z = tl.load(Z + bh * (n_write * L) + pos)
            own = (z % P) == p
            if THROUGH_STATE:
                g_k = tl.load(gk_base + z[:, None] * DK + dk[None, :], mask=own[:, None], cache_modifier=".cg")
                g_v = tl.load(gv_base + z[:, None] * DV + dv[None, :], mask=own[:, None], cache_modifier=".cg")
                tl.store(SGK + scratch[:, None] * DK + dk[None, :], g_k, mask=own[:, None])
                tl.store(SGV + scratch[:, None] * DV + dv[None, :], g_v, mask=own[:, None])
            # Relaxed: only this program reads its sums, after a block barrier (see assign.py).
            tl.atomic_add(sk_base + z[:, None] * DK + dk[None, :], -k.to(tl.float32), mask=own[:, None],
                          sem="relaxed")
            tl.atomic_add(sv_base + z[:, None] * DV + dv[None, :], -v.to(tl.float32), mask=own[:, None],
                          sem="relaxed")
            tl.atomic_add(c_base + z, tl.full([BM], -1.0, tl.float32), mask=own, sem="relaxed")
        if p == 0:  # the causal local block's dk, dv, once per (batch, head)
            k = tl.load(k_base + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
            d_k, d_v, db = grad_local_kv(kb, c, k, v, beta, q_base, do_base, LSE + bh * T, DELTA + bh * T, T,
                                          L, BM, DK, DV, IEEE)
            dbeta += db
            tl.store(SLK + scratch[:, None] * DK + dk[None, :], d_k)
            tl.store(SLV + scratch[:, None] * DV + dv[None, :], d_v)
    tl.debug_barrier()
    n = tl.load(NACT + c)
    owned = (n - p + P - 1) // P
    for r in range(0, L // BM):
        rows = r * BM + tl.arange(0, BM)
        pos = c * L + rows
        valid = pos < T
        q = tl.load(q_base + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
        do = tl.load(do_base + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
        lse = tl.load(LSE + bh * T + pos, mask=valid, other=float("inf"))
        delta = tl.load(DELTA + bh * T + pos, mask=valid, other=0.0)
        dq = tl.zeros([BM, DK], tl.float32)
        dq, db = grad_dict(q, do, lse, delta, valid, beta, dq, sk_base, sv_base, c_base, gk_base, gv_base,
                            n, p, owned, P, DK, DV, BN, NORMALIZE, COUNT_BIAS, THROUGH_STATE, IEEE, DICT)
        dbeta += db
        if p == 0:
            dq = grad_local_q(r, c, q, do, lse, delta, valid, beta, dq, k_base, v_base, T, L, BM, DK, DV, IEEE)
        tl.store(PDQ + (((bh * 2 + par) * P + p) * L + rows)[:, None] * DK + dk[None, :], dq)
    return dbeta


@triton.jit
def _bwd_phase_b(c, bh, p, PDQ, SGK, SGV, SLK, SLV, DQ, DKO, DVO, T, n_write,
                 P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, RM: tl.constexpr,
                 THROUGH_STATE: tl.constexpr):
    """dq, dk, dv of chunk c for program p's L/P rows (RM at a time), from the partials and scratches (read
    past L1)."""
    RB: tl.constexpr = L // P
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    par = c % 2
    for r0 in range(0, RB, RM):
        rb = p * RB + r0 + tl.arange(0, RM)
        dq = tl.zeros([RM, DK], tl.float32)
        for j in tl.static_range(P):
            dq += tl.load(PDQ + (((bh * 2 + par) * P + j) * L + rb)[:, None] * DK + dk[None, :],
                          cache_modifier=".cg")
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
                         BN: tl.constexpr, BM: tl.constexpr, RM: tl.constexpr, NORMALIZE: tl.constexpr,
                         COUNT_BIAS: tl.constexpr, THROUGH_STATE: tl.constexpr, IEEE: tl.constexpr,
                         DICT: tl.constexpr):
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
                              P, L, DK, DV, BN, BM, NORMALIZE, COUNT_BIAS, THROUGH_STATE, IEEE, DICT)
        barrier(FLAGS + bh * P, p, i + 1, P)
        _bwd_phase_b(c, bh, p, PDQ, SGK, SGV, SLK, SLV, DQ, DKO, DVO, T, n_write, P, L, DK, DV, RM, THROUGH_STATE)
        tl.debug_barrier()
    tl.store(DBETA + pid, dbeta)


@triton.jit
def ovq_bwd_split_slots_kernel(c, Q, K, V, DO, LSE, DELTA, Z, BETA, SK, SV, CNT, GK, GV, NACT,
                               PDQ, SGK, SGV, SLK, SLV, DBETA, T, H, N, n_write,
                               P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                               BN: tl.constexpr, BM: tl.constexpr, NORMALIZE: tl.constexpr,
                               COUNT_BIAS: tl.constexpr, THROUGH_STATE: tl.constexpr, IEEE: tl.constexpr,
                               DICT: tl.constexpr):
    """Stepped phase A of chunk c: grid (B * H * P,); adds its dbeta into DBETA[program]."""
    pid = tl.program_id(0)
    bh = pid // P
    beta = tl.load(BETA + bh % H).to(tl.float32)
    dbeta = _bwd_phase_a(c, bh, pid % P, beta, Q, K, V, DO, LSE, DELTA, Z, SK, SV, CNT, GK, GV, NACT,
                         PDQ, SGK, SGV, SLK, SLV, T, N, n_write,
                         P, L, DK, DV, BN, BM, NORMALIZE, COUNT_BIAS, THROUGH_STATE, IEEE, DICT)
    tl.store(DBETA + pid, tl.load(DBETA + pid) + dbeta)


@triton.jit
def ovq_bwd_split_rows_kernel(c, PDQ, SGK, SGV, SLK, SLV, DQ, DKO, DVO, T, n_write,
                              P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                              RM: tl.constexpr, THROUGH_STATE: tl.constexpr):
    """Stepped phase B of chunk c: grid (B * H * P,)."""
    pid = tl.program_id(0)
    _bwd_phase_b(c, pid // P, pid % P, PDQ, SGK, SGV, SLK, SLV, DQ, DKO, DVO, T, n_write, P, L, DK, DV, RM,
                 THROUGH_STATE)


def ovq_backward_split_triton(q, k, v, o, do, lse, z, beta, sk, sv, cnt, cfg: OVQConfig,
                              programs: int | None = None, stepped: bool | None = None,
                              block_slots: int | None = None, num_warps: int = 8, dict_precision: str = "tf32",
                              block_rows: int = 64):
    """`ovq_backward_triton`'s contract (same inputs and gradients) with the slots split over `programs`
    programs per (batch, head); programs, stepped and block_rows as in `ovq_forward_split_triton`."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    L, N = cfg.chunk_size, cfg.dict_size
    n_chunks, n_write = -(-T // L), T // L
    dev = q.device
    dmode = tiles.dict_mode(q.dtype, dict_precision)  # checks dict_precision before any work
    bn = tiles.slot_block_backward(block_slots, N, DK, DV)
    bm = tiles.row_block(L, block_rows)
    P, stepped = split_launch(B * H, N, bn, L, dev, programs, stepped, "split backward")
    nact, _ = schedule_tensors(cfg, n_chunks, n_write, dev)
    delta = tiles.rowwise_dot_f32(do, o)
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
    slot_args = dict(BN=bn, BM=bm, NORMALIZE=cfg.normalize_centroids, COUNT_BIAS=cfg.count_bias,
                     IEEE=tiles.exact_dots(q.dtype), DICT=dmode)
    rm = merge_rows(L, P)
    grid = (B * H * P,)
    if stepped:
        for c in reversed(range(n_chunks)):
            ovq_bwd_split_slots_kernel[grid](c, *ins, *scratch, dbeta, T, H, N, n_write, **common, **slot_args,
                                             num_warps=num_warps, num_stages=1)
            ovq_bwd_split_rows_kernel[grid](c, *scratch, dq, dk_, dv_, T, n_write, **common, RM=rm, num_warps=4)
    else:
        flags = torch.zeros(B * H, P, dtype=torch.int32, device=dev)
        ovq_bwd_split_kernel[grid](*ins, *scratch, flags, dq, dk_, dv_, dbeta, T, H, N, n_write, n_chunks,
                                   **common, **slot_args, RM=rm, num_warps=num_warps, num_stages=1)
    return dq, dk_, dv_, dbeta.view(B, H, P).sum((0, 2))
