"""Tile helpers shared by the OVQ forward and backward kernels (per-head and split): products, one tile of the
dictionary, and the read and its gradient for one block of a chunk's rows.

Every kernel processes a chunk of L tokens in row blocks of BM (min(L, 64)) rows, so no [L, d] or [L, L]
float32 tile is ever live: at L = 256, d = 128 those are 128 and 256 KiB, more than an SM's 228 KiB of shared
memory (registers spill long before). Per row block the dictionary is streamed in tiles of BN slots and the
causal local block in key blocks of BM, flash-attention style (online softmax forward; probabilities
recomputed from the log-sum-exp backward). Results equal a whole-chunk pass up to float32 rounding order.

Shapes in the docstrings: BM rows of one block, BN slots of one tile, DK / DV head dims.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def exact_dots(dtype: torch.dtype) -> bool:
    """IEEE float32 products for float32 inputs (tf32 would miss float32 tolerances), and always under
    TRITON_INTERPRET=1, whose dot mishandles bf16 operands (checked with triton 3.9)."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


DICT_PRECISIONS = ("tf32", "bf16x2", "bf16")


def dict_mode(dtype: torch.dtype, precision: str) -> str:
    """The kernels' DICT constexpr: how products with the float32 dictionary are computed for inputs of
    `dtype`. "ieee" for float32 inputs (exact, whatever was asked); for bf16/fp16 inputs `precision`:
    - "tf32": dictionary tiles as float32, products in tf32 (D rounded to 2^-11).
    - "bf16x2": key products (the logits and similarities, which beta amplifies) as two bf16 products, D_k
      split into bf16 hi + lo (D rounded to ~2^-16); value and gradient products in bf16. Operand tiles stay
      16-bit, so fewer registers than tf32 at the same tensor-core time.
    - "bf16": every dictionary product in bf16 (D rounded to 2^-9; fastest, least accurate).
    """
    if precision not in DICT_PRECISIONS:
        raise ValueError(f"dict_precision must be one of {', '.join(DICT_PRECISIONS)}, got {precision!r}")
    return "ieee" if dtype == torch.float32 else precision


def row_block(chunk_size: int, block_rows: int = 64) -> int:
    """BM, the rows (and local keys) of one block: min(L, block_rows), a power of two >= 16 dividing L."""
    bm = min(chunk_size, block_rows)
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"block_rows must be a power of two >= 16, got {block_rows}")
    return bm


def slot_block(block_slots: int, dict_size: int) -> int:
    """BN, the slots of one dictionary tile: block_slots, at most N rounded up to a power of two, >= 16."""
    return max(16, min(block_slots, triton.next_power_of_2(dict_size)))



def rowwise_dot_f32(a: torch.Tensor, b: torch.Tensor, elements_per_block: int = 1 << 24) -> torch.Tensor:
    """sum(a * b, -1) in float32 for a, b [B, H, T, d] of any strides -> [B, H, T], in blocks along T so the
    float32 copies stay small (whole-tensor copies would be 2 x 512 MiB at B=1, H=16, T=64k, d=128)."""
    B, H, T, d = a.shape
    out = torch.empty(B, H, T, dtype=torch.float32, device=a.device)
    step = max(1, elements_per_block // max(1, B * H * d))
    for t in range(0, T, step):
        out[:, :, t:t + step] = (a[:, :, t:t + step].float() * b[:, :, t:t + step].float()).sum(-1)
    return out


def slot_block_backward(block_slots: int | None, dict_size: int, dk: int, dv: int) -> int:
    """BN of the backward: five float32 [BN, d] tiles per slot block, so 32 at d > 64 (inside shared
    memory), else 64, unless given."""
    if block_slots is None:
        block_slots = 32 if max(dk, dv) > 64 else 64
    return slot_block(block_slots, dict_size)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def dict_dot(a, b, IEEE: tl.constexpr, DICT: tl.constexpr):
    """a @ b where one operand holds float32 dictionary values (D_v, D_k as a gradient's factor) whose
    rounding the softmax does not amplify; DICT as in `dict_mode`. Under the interpreter (IEEE) the bf16 modes
    are emulated exactly: bf16-rounded operands, float32 products, as the tensor cores compute them."""
    if DICT == "ieee" or (IEEE and DICT == "tf32"):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if DICT == "tf32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    return dot(a.to(tl.bfloat16), b.to(tl.bfloat16), IEEE)


@triton.jit
def key_dot(a, b, IEEE: tl.constexpr, DICT: tl.constexpr):
    """a [M, K] @ b [K, N] for logits and similarities against the key dictionary b (float32), whose error
    beta multiplies: under "bf16x2", b = hi + lo in bf16 and a @ hi + a @ lo (exact for a in bf16, as q and k
    are); otherwise as `dict_dot`."""
    if DICT == "bf16x2":
        a16 = a.to(tl.bfloat16)
        hi = b.to(tl.bfloat16)
        lo = (b - hi.to(tl.float32)).to(tl.bfloat16)
        if IEEE:
            return dot(a16, hi, IEEE) + dot(a16, lo, IEEE)
        return tl.dot(a16, lo, acc=tl.dot(a16, hi))
    return dict_dot(a, b, IEEE, DICT)


@triton.jit
def slot_tile(sk_base, c_base, slots, smask, dk, DK: tl.constexpr, NORMALIZE: tl.constexpr):
    """One tile of the dictionary: sums S_k [BN, DK] and counts [BN] (masked slots read as 0 and 1), and the
    scale of its key centroids, D_k = S_k / scale, with scale |S_k| (normalize_centroids) or the count.
    Loads bypass L1 (.cg): the kernels update the dictionary with atomics, which L1 would not see."""
    sk = tl.load(sk_base + slots[:, None] * DK + dk[None, :], mask=smask[:, None], other=0.0,
                 cache_modifier=".cg")
    cnt = tl.load(c_base + slots, mask=smask, other=1.0, cache_modifier=".cg")
    if NORMALIZE:
        scale = tl.sqrt(tl.maximum(tl.sum(sk * sk, axis=1), 1e-30))
    else:
        scale = cnt
    return sk, cnt, scale


@triton.jit
def read_dict(q, k, beta, sk_base, sv_base, c_base, n, first, count, STRIDE: tl.constexpr,
               BM: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
               NORMALIZE: tl.constexpr, COUNT_BIAS: tl.constexpr, IEEE: tl.constexpr, DICT: tl.constexpr):
    """One pass over the slots first, first + STRIDE, ... (`count` of them, those below n) for a row block:
    the read's online softmax of q [BM, DK] (logits beta q.D_k, + log c with COUNT_BIAS) and the nearest slot
    of each key k [BM, DK] (the assignment's and the spread init's similarity to the chunk-start dictionary).
    Returns m, l [BM], acc [BM, DV] (unnormalised), best [BM] (max k.D_k, -inf without slots) and its slot."""
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    slot_ids = tl.arange(0, BN)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DV], tl.float32)
    best = tl.full([BM], float("-inf"), tl.float32)
    best_idx = tl.zeros([BM], tl.int32)
    for t0 in range(0, count, BN):
        slots = (t0 + slot_ids) * STRIDE + first
        smask = slots < n
        sk, cnt, scale = slot_tile(sk_base, c_base, slots, smask, dk, DK, NORMALIZE)
        inv = 1.0 / scale
        skt = tl.trans(sk)
        s = key_dot(q, skt, IEEE, DICT) * (beta * inv)[None, :]
        if COUNT_BIAS:
            s += tl.log(cnt)[None, :]
        s = tl.where(smask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        sv = tl.load(sv_base + slots[:, None] * DV + dv[None, :], mask=smask[:, None], other=0.0,
                     cache_modifier=".cg")
        acc = acc * alpha[:, None] + dict_dot(p / cnt[None, :], sv, IEEE, DICT)  # D_v = S_v / c
        m_i = m_new
        sim = key_dot(k, skt, IEEE, DICT) * inv[None, :]
        sim = tl.where(smask[None, :], sim, float("-inf"))
        tile_best = tl.max(sim, axis=1)
        tile_idx = (tl.argmax(sim, axis=1).to(tl.int32) + t0) * STRIDE + first
        better = tile_best > best  # strict: the lowest slot wins ties, like torch.argmax
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    return m_i, l_i, acc, best, best_idx


@triton.jit
def read_local(q, rows, beta, m_i, l_i, acc, k_base, v_base, c, r, T,
                L: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr):
    """Add the causal local block to row block r's online softmax (m_i, l_i [BM], acc [BM, DV]): q [BM, DK]
    at chunk rows `rows` [BM] of chunk c sees the chunk's keys 0 .. row, taken in key blocks 0 .. r of BM.
    k_base, v_base: this (batch, head)'s keys and values [T, d]."""
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    for kb in range(0, r + 1):
        cols = kb * BM + tl.arange(0, BM)
        pos_k = c * L + cols
        valid_k = pos_k < T
        k = tl.load(k_base + pos_k[:, None] * DK + dk[None, :], mask=valid_k[:, None], other=0.0)
        v = tl.load(v_base + pos_k[:, None] * DV + dv[None, :], mask=valid_k[:, None], other=0.0)
        s = dot(q, tl.trans(k), IEEE) * beta
        s = tl.where((cols[None, :] <= rows[:, None]) & valid_k[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def grad_dict(q, do, lse, delta, valid, beta, dq, sk_base, sv_base, c_base, gk_base, gv_base, n, first, count,
               STRIDE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
               NORMALIZE: tl.constexpr, COUNT_BIAS: tl.constexpr, THROUGH_STATE: tl.constexpr,
               IEEE: tl.constexpr, DICT: tl.constexpr):
    """The read's backward over the slots first, first + STRIDE, ... below n for one row block (q [BM, DK],
    do [BM, DV], lse, delta, valid [BM]): adds into dq [BM, DK] and, with THROUGH_STATE, into the state
    gradients G_k, G_v of the slots (read-modify-write of this program's own slots; each thread re-reads what
    it stored, so successive row blocks need no barrier). Returns dq and this block's dbeta (scalar)."""
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    slot_ids = tl.arange(0, BN)
    dbeta = tl.sum(tl.zeros([BN], tl.float32), axis=0)
    for t0 in range(0, count, BN):
        slots = (t0 + slot_ids) * STRIDE + first
        smask = slots < n
        sk, cnt, norm = slot_tile(sk_base, c_base, slots, smask, dk, DK, NORMALIZE)
        sv = tl.load(sv_base + slots[:, None] * DV + dv[None, :], mask=smask[:, None], other=0.0,
                     cache_modifier=".cg")
        d_k = sk / norm[:, None]  # D_k [BN, DK] float32
        d_v = sv / cnt[:, None]   # D_v [BN, DV]
        dots = key_dot(q, tl.trans(d_k), IEEE, DICT)
        s = beta * dots
        if COUNT_BIAS:
            s += tl.log(cnt)[None, :]
        p = tl.where(smask[None, :] & valid[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = dict_dot(do, tl.trans(d_v), IEEE, DICT)
        ds = p * (dp - delta[:, None])
        dq += beta * dict_dot(ds, d_k, IEEE, DICT)
        dbeta += tl.sum(tl.sum(ds * dots, axis=1), axis=0)
        if THROUGH_STATE:
            d_dk = beta * dict_dot(tl.trans(ds), q, IEEE, DICT)  # dL/dD_k [BN, DK]
            d_dv = dict_dot(tl.trans(p), do, IEEE, DICT)         # dL/dD_v [BN, DV]
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
    return dq, dbeta


@triton.jit
def grad_local_kv(kb, c, k, v, beta, q_base, do_base, lse_base, delta_base, T,
                   L: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr):
    """The local block's gradients of key block kb (keys k [BM, DK], values v [BM, DV] of chunk c): dk, dv
    [BM, d] float32 summed over the query blocks kb .. L/BM - 1 that see it, and their dbeta (scalar)."""
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    cols = kb * BM + tl.arange(0, BM)
    valid_k = c * L + cols < T
    dk_acc = tl.zeros([BM, DK], tl.float32)
    dv_acc = tl.zeros([BM, DV], tl.float32)
    dbeta = tl.sum(tl.zeros([BM], tl.float32), axis=0)
    for r in range(kb, L // BM):
        rows = r * BM + tl.arange(0, BM)
        pos = c * L + rows
        valid = pos < T
        q = tl.load(q_base + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
        do = tl.load(do_base + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
        lse = tl.load(lse_base + pos, mask=valid, other=float("inf"))
        delta = tl.load(delta_base + pos, mask=valid, other=0.0)
        qk = dot(q, tl.trans(k), IEEE)
        visible = (cols[None, :] <= rows[:, None]) & valid_k[None, :] & valid[:, None]
        p = tl.where(visible, tl.exp(beta * qk - lse[:, None]), 0.0)
        ds = p * (dot(do, tl.trans(v), IEEE) - delta[:, None])
        dbeta += tl.sum(tl.sum(ds * qk, axis=1), axis=0)
        dk_acc += beta * dot(tl.trans(ds).to(q.dtype), q, IEEE)
        dv_acc += dot(tl.trans(p).to(do.dtype), do, IEEE)
    return dk_acc, dv_acc, dbeta


@triton.jit
def grad_local_q(r, c, q, do, lse, delta, valid, beta, dq, k_base, v_base, T,
                  L: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr):
    """Add the local block's part of dq for query block r (q [BM, DK], do [BM, DV], lse, delta, valid [BM]):
    key blocks 0 .. r, probabilities recomputed (the dbeta part is `grad_local_kv`'s)."""
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    rows = r * BM + tl.arange(0, BM)
    for kb in range(0, r + 1):
        cols = kb * BM + tl.arange(0, BM)
        pos_k = c * L + cols
        valid_k = pos_k < T
        k = tl.load(k_base + pos_k[:, None] * DK + dk[None, :], mask=valid_k[:, None], other=0.0)
        v = tl.load(v_base + pos_k[:, None] * DV + dv[None, :], mask=valid_k[:, None], other=0.0)
        qk = dot(q, tl.trans(k), IEEE)
        visible = (cols[None, :] <= rows[:, None]) & valid_k[None, :] & valid[:, None]
        p = tl.where(visible, tl.exp(beta * qk - lse[:, None]), 0.0)
        ds = p * (dot(do, tl.trans(v), IEEE) - delta[:, None])
        dq += beta * dot(ds.to(k.dtype), k, IEEE)
    return dq


@triton.jit
def head_bases(bh, T, N, Q, K, V, DO, SK, SV, CNT, GK, GV, DK: tl.constexpr, DV: tl.constexpr):
    """The backward's pointers for (batch, head) bh: q, k [T, DK], v, do [T, DV], the sums S_k [N, DK],
    S_v [N, DV], the counts [N] and the state gradients G_k [N, DK], G_v [N, DV]."""
    return (Q + bh * T * DK, K + bh * T * DK, V + bh * T * DV, DO + bh * T * DV, SK + bh * N * DK,
            SV + bh * N * DV, CNT + bh * N, GK + bh * N * DK, GV + bh * N * DV)


@triton.jit
def row_tiles(c, r, q_base, k_base, T, L: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr):
    """Row block r of chunk c: its rows in the chunk [BM], positions [BM], which are below T, and its
    queries and keys [BM, DK] (0 past T)."""
    dk = tl.arange(0, DK)
    rows = r * BM + tl.arange(0, BM)
    pos = c * L + rows
    valid = pos < T
    q = tl.load(q_base + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
    k = tl.load(k_base + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
    return rows, pos, valid, q, k
