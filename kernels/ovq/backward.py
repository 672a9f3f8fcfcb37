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
(or dD / c without normalisation); D_v = S_v / c gives dS_v = dD_v / c. Counts carry no gradient; with
`count_bias` the recomputed probabilities include log c.

Row blocks (tiles.py, so that L = 256 fits): per chunk, first each key block of BM tokens (gather G, un-write,
and the local block's dk, dv over the query blocks that see it), then a block barrier, then each query block
(the dictionary's read backward, adding into dq and G, and the local block's dq, probabilities recomputed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .config import OVQConfig
from .launch_inputs import schedule_tensors
from .tiles import grad_dict, grad_local_kv, grad_local_q, head_bases


@triton.jit
def ovq_bwd_kernel(Q, K, V, DO, LSE, DELTA, Z, BETA, SK, SV, CNT, GK, GV, DQ, DKO, DVO, DBETA, NACT,
                   T, H, N, n_write, n_chunks,
                   L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                   NORMALIZE: tl.constexpr, COUNT_BIAS: tl.constexpr, THROUGH_STATE: tl.constexpr,
                   IEEE: tl.constexpr, DICT: tl.constexpr):
    bh = tl.program_id(0)
    h = bh % H
    beta = tl.load(BETA + h).to(tl.float32)
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    q_base, k_base, v_base, do_base, sk_base, sv_base, c_base, gk_base, gv_base = head_bases(
        bh, T, N, Q, K, V, DO, SK, SV, CNT, GK, GV, DK, DV)
    dbeta = tl.sum(tl.zeros([BM], tl.float32), axis=0)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        for kb in range(0, L // BM):
            pos = c * L + kb * BM + tl.arange(0, BM)
            valid = pos < T
            k = tl.load(k_base + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
            dk_acc, dv_acc, db = grad_local_kv(kb, c, k, v, beta, q_base, do_base, LSE + bh * T,
                                                DELTA + bh * T, T, L, BM, DK, DV, IEEE)
            dbeta += db
            if c < n_write:
                z = tl.load(Z + bh * (n_write * L) + pos)
                if THROUGH_STATE:  # G_{c+1} of each token's slot, before this chunk's read adds to G
                    dk_acc += tl.load(gk_base + z[:, None] * DK + dk[None, :], cache_modifier=".cg")
                    dv_acc += tl.load(gv_base + z[:, None] * DV + dv[None, :], cache_modifier=".cg")
                # Relaxed, as in the forward: this program alone reads the sums, after the block barrier below.
                tl.atomic_add(sk_base + z[:, None] * DK + dk[None, :], -k.to(tl.float32), sem="relaxed")
                tl.atomic_add(sv_base + z[:, None] * DV + dv[None, :], -v.to(tl.float32), sem="relaxed")
                tl.atomic_add(c_base + z, tl.full([BM], -1.0, tl.float32), sem="relaxed")
            out_k = bh * T * DK + pos[:, None] * DK + dk[None, :]
            tl.store(DKO + out_k, dk_acc.to(DKO.dtype.element_ty), mask=valid[:, None])
            tl.store(DVO + bh * T * DV + pos[:, None] * DV + dv[None, :], dv_acc.to(DVO.dtype.element_ty),
                     mask=valid[:, None])
        tl.debug_barrier()  # the chunk is un-written and every gather done before G and S are read below
        n = tl.load(NACT + c)
        for r in range(0, L // BM):
            pos = c * L + r * BM + tl.arange(0, BM)
            valid = pos < T
            q = tl.load(q_base + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
            do = tl.load(do_base + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
            lse = tl.load(LSE + bh * T + pos, mask=valid, other=float("inf"))
            delta = tl.load(DELTA + bh * T + pos, mask=valid, other=0.0)
            dq = tl.zeros([BM, DK], tl.float32)
            dq, db = grad_dict(q, do, lse, delta, valid, beta, dq, sk_base, sv_base, c_base, gk_base, gv_base,
                                n, 0, n, 1, DK, DV, BN, NORMALIZE, COUNT_BIAS, THROUGH_STATE, IEEE, DICT)
            dbeta += db
            dq = grad_local_q(r, c, q, do, lse, delta, valid, beta, dq, k_base, v_base, T, L, BM, DK, DV, IEEE)
            tl.store(DQ + bh * T * DK + pos[:, None] * DK + dk[None, :], dq.to(DQ.dtype.element_ty),
                     mask=valid[:, None])
        tl.debug_barrier()
    tl.store(DBETA + bh, dbeta)


def ovq_backward_triton(q, k, v, o, do, lse, z, beta, sk, sv, cnt, cfg: OVQConfig, block_slots: int | None = None,
                        num_warps: int = 8, dict_precision: str = "tf32", block_rows: int = 64):
    """Gradients (dq, dk, dv [B, H, T, d] in the dtype of q, k, v; dbeta [H] float32) of the core's output o
    given do. sk, sv, cnt are the forward's final dictionary sums; they are copied, not changed. block_rows:
    BM, as in `ovq_forward_triton`."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    L, N = cfg.chunk_size, cfg.dict_size
    n_chunks, n_write = -(-T // L), T // L
    dev = q.device
    dmode = tiles.dict_mode(q.dtype, dict_precision)  # checks dict_precision before any work
    nact, _ = schedule_tensors(cfg, n_chunks, n_write, dev)
    delta = tiles.rowwise_dot_f32(do, o)
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
    bn = tiles.slot_block_backward(block_slots, N, DK, DV)
    ovq_bwd_kernel[(B * H,)](
        q.contiguous(), k.contiguous(), v.contiguous(), do.to(q.dtype).contiguous(), lse, delta, z,
        beta.to(torch.float32).contiguous(), sk.clone(), sv.clone(), cnt.clone(), gk, gv, dq, dk_, dv_, dbeta,
        nact, T, H, N, n_write, n_chunks,
        L=L, DK=DK, DV=DV, BN=bn, BM=tiles.row_block(L, block_rows), NORMALIZE=cfg.normalize_centroids,
        COUNT_BIAS=cfg.count_bias, THROUGH_STATE=through,
        IEEE=tiles.exact_dots(q.dtype), DICT=dmode, num_warps=num_warps, num_stages=1)
    return dq, dk_, dv_, dbeta.view(B, H).sum(0)
