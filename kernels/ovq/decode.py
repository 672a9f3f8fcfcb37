"""Triton decode step of the OVQ-attention core: one token per sequence against its dictionary and buffer.

Memory-bound: the step must read the active dictionary (n slots of D_k and D_v, float32) once. The slots of
each (batch, head) are split across programs so that small batches still fill the GPU; each program writes
a partial softmax (max, sum, weighted values) and `combine` merges them with a log-sum-exp rescale. The last
split reads the buffer (tokens since the last flush, up to L - 1 = 255 rows) and the token itself, in blocks
of BB rows with an online softmax (a whole [L, dk] float32 buffer tile would spill at L = 256). Slot logits
are beta q.D_k + log c, without log c under `count_bias: false`. The dictionary's write (the
flush every L tokens) is not in this kernel: the layer runs it with the reference's `write`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def ovq_decode_kernel(Q, K, V, BETA, MK, MV, CNT, BK, BV, PM, PL, PACC,
                      H, N, n_active, buf_len, span, n_splits, BUF_ROWS,
                      DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr,
                      NORMALIZE: tl.constexpr, COUNT_BIAS: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    h = bh % H
    beta = tl.load(BETA + h).to(tl.float32)
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    q = tl.load(Q + bh * DK + dk).to(tl.float32)
    zero = tl.sum(tl.zeros([BN], tl.float32), axis=0)  # a float32 scalar tensor (uniform loop-carried types)
    m_i = zero + float("-inf")
    l_i = zero
    acc = tl.zeros([DV], tl.float32)
    if sp < n_splits:
        lo = sp * span
        hi = tl.minimum(lo + span, n_active)
        for s0 in range(lo, hi, BN):
            slots = s0 + tl.arange(0, BN)
            smask = slots < hi
            mk = tl.load(MK + (bh * N + slots)[:, None] * DK + dk[None, :], mask=smask[:, None], other=0.0)
            cnt = tl.load(CNT + bh * N + slots, mask=smask, other=1.0)
            dots = tl.sum(mk * q[None, :], axis=1)
            if NORMALIZE:
                dots = dots / tl.sqrt(tl.maximum(tl.sum(mk * mk, axis=1), 1e-30))
            s = beta * dots
            if COUNT_BIAS:
                s += tl.log(cnt)
            s = tl.where(smask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            scale = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            mv = tl.load(MV + (bh * N + slots)[:, None] * DV + dv[None, :], mask=smask[:, None], other=0.0)
            l_i = l_i * scale + tl.sum(p, axis=0)
            acc = acc * scale + tl.sum(p[:, None] * mv, axis=0)
            m_i = m_new
    else:
        # The local keys: buffer rows 0 .. buf_len-1, then the token itself at row buf_len (row 0 is always
        # visible, so m is finite after the first block).
        k_t = tl.load(K + bh * DK + dk).to(tl.float32)
        v_t = tl.load(V + bh * DV + dv).to(tl.float32)
        for b0 in range(0, buf_len + 1, BB):
            rows = b0 + tl.arange(0, BB)
            in_buf = rows < buf_len
            bk = tl.load(BK + (bh * BUF_ROWS + rows)[:, None] * DK + dk[None, :], mask=in_buf[:, None], other=0.0)
            bv = tl.load(BV + (bh * BUF_ROWS + rows)[:, None] * DV + dv[None, :], mask=in_buf[:, None], other=0.0)
            is_self = rows == buf_len
            bk = tl.where(is_self[:, None], k_t[None, :], bk.to(tl.float32))
            bv = tl.where(is_self[:, None], v_t[None, :], bv.to(tl.float32))
            s = tl.where(rows <= buf_len, beta * tl.sum(bk * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            scale = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * scale + tl.sum(p, axis=0)
            acc = acc * scale + tl.sum(p[:, None] * bv, axis=0)
            m_i = m_new
    part = bh * (n_splits + 1) + sp
    tl.store(PM + part, m_i)
    tl.store(PL + part, l_i)
    tl.store(PACC + part * DV + dv, acc)


def _splits(bh: int, n_active: int, block: int, device: torch.device) -> int:
    """Programs per (batch, head) over the slots: enough to give every SM a few, never an empty tile."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    tiles = max(1, -(-n_active // block))
    return max(1, min(tiles, -(-4 * sms // bh)))


def ovq_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, counts: torch.Tensor, n_active: int, buf_k: torch.Tensor,
                      buf_v: torch.Tensor, buf_len: int, normalize: bool, block_slots: int = 64,
                      count_bias: bool = True) -> torch.Tensor:
    """Read for one token: q, k [B, H, dk], v [B, H, dv]; dictionary means keys [B, H, N, dk], values
    [B, H, N, dv], counts [B, H, N] with `n_active` slots in use; buffer buf_k [B, H, L-1, dk], buf_v with
    `buf_len` rows. count_bias: add log c to the slot logits (the config's `count_bias`). Returns o [B, H, dv]
    float32."""
    B, H, DK = q.shape
    DV = v.shape[-1]
    N = keys.shape[2]
    bh = B * H
    n_splits = _splits(bh, n_active, block_slots, q.device) if n_active > 0 else 0
    span = -(-n_active // n_splits) if n_splits else 0
    span = -(-span // block_slots) * block_slots if n_splits else 0
    n_splits = -(-n_active // span) if span else 0
    parts = n_splits + 1
    pm = torch.empty(bh, parts, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    pacc = torch.empty(bh, parts, DV, dtype=torch.float32, device=q.device)
    buf_rows = buf_k.shape[2]
    # One block size per buffer size (not per buf_len: no recompiles while decoding), at most 32 rows: two
    # float32 [32, 128] tiles fit without spilling at 4 warps (64 rows spilled 152 B per thread).
    bb = min(32, max(16, triton.next_power_of_2(buf_rows + 1)))
    ovq_decode_kernel[(bh, parts)](
        q.contiguous(), k.contiguous(), v.contiguous(), beta.to(torch.float32).contiguous(), keys, values,
        counts, buf_k, buf_v, pm, pl, pacc, H, N, n_active, buf_len, span, n_splits, buf_rows,
        DK=DK, DV=DV, BN=block_slots, BB=bb, NORMALIZE=normalize, COUNT_BIAS=count_bias, num_warps=4)
    return combine(pm, pl, pacc).view(B, H, DV)


def combine(pm: torch.Tensor, pl: torch.Tensor, pacc: torch.Tensor) -> torch.Tensor:
    """Merge partial softmaxes: max pm [R, S], sum pl [R, S], weighted values pacc [R, S, dv] -> [R, dv]."""
    top = pm.amax(dim=1, keepdim=True)
    w = torch.exp(pm - top)  # an empty split (max -inf, sum 0) gets weight 0
    return (w.unsqueeze(-1) * pacc).sum(dim=1) / (w * pl).sum(dim=1, keepdim=True)
