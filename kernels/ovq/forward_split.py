"""Triton chunked forward of the OVQ-attention core with the slots of each (batch, head) split over P programs.

The v1 forward (`forward.py`) runs one program per (batch, head): 16 programs on a 132-SM GPU at B=1, H=16.
Here P programs share a (batch, head), program p owning the slots p, p + P, p + 2P, ... (interleaved, so the
work stays balanced while the dictionary grows). Per chunk:

- phase A (every program): one pass over its own active slots gives a partial read (online-softmax max m,
  sum l and weighted values acc, flash-attention style; program 0 also adds the causal L x L block) and a
  partial assignment (max similarity and argmax of each key over its slots). Partials go to a small global
  scratch, double-buffered by chunk parity.
- barrier between the P programs of the (batch, head): each stores the chunk it finished in a flag and waits
  until all P flags reach it. One barrier per chunk is enough: a program writes a parity buffer again only two
  chunks later, after every program has passed the next barrier, i.e. finished reading it.
- phase B (every program): merges the P read partials for its L/P rows with a log-sum-exp merge (o, lse), and
  the P assignment partials for all L keys; every program then picks the same spawns and slots z (the shared
  `_assign`), and adds the keys and values assigned to its own slots into the float32 sums. No other program
  touches those slots, so the next chunk's phase A needs no further synchronisation.

The persistent kernel runs all chunks in one launch; all B * H * P programs must be resident at once (the host
keeps B * H * P <= SM count), or the barrier would wait for a program that never starts. The stepped path
launches phase A and phase B once per chunk instead (no barrier; 2 launches per chunk): it is what runs P > 1
under TRITON_INTERPRET=1, which executes programs one after another, and it shares every line of math with
the persistent kernel. Outputs and requirements are those of `ovq_forward_triton`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .config import OVQConfig
from .forward import (
    _assign,
    _dict_dot,
    _dot,
    _key_dot,
    _slot_tile,
    dict_mode,
    exact_dots,
    random_ranks,
    schedule_tensors,
)


@triton.jit
def _phase_a(c, bh, p, beta, Q, K, V, SK, SV, CNT, NACT, PM, PL, PACC, PBEST, PIDX, T, N,
             P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
             NORMALIZE: tl.constexpr, IEEE: tl.constexpr, DICT: tl.constexpr):
    """Partial read and assignment of chunk c over program p's slots; stores m, l [L], acc [L, DV], best [L]
    and its slot index [L] into parity buffer c % 2."""
    rows = tl.arange(0, L)
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    slot_ids = tl.arange(0, BN)
    pos = c * L + rows
    valid = pos < T
    q = tl.load(Q + bh * T * DK + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
    k = tl.load(K + bh * T * DK + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
    sk_base = SK + bh * N * DK
    sv_base = SV + bh * N * DV
    c_base = CNT + bh * N
    n = tl.load(NACT + c)
    m_i = tl.full([L], float("-inf"), tl.float32)
    l_i = tl.zeros([L], tl.float32)
    acc = tl.zeros([L, DV], tl.float32)
    best = tl.full([L], float("-inf"), tl.float32)
    best_idx = tl.zeros([L], tl.int32)
    owned = (n - p + P - 1) // P  # slots p, p + P, ... below n
    for t0 in range(0, owned, BN):
        slots = (t0 + slot_ids) * P + p
        smask = slots < n
        sk, cnt, scale = _slot_tile(sk_base, c_base, slots, smask, dk, DK, NORMALIZE)
        inv = 1.0 / scale
        skt = tl.trans(sk)
        s = _key_dot(q, skt, IEEE, DICT) * (beta * inv)[None, :] + tl.log(cnt)[None, :]
        s = tl.where(smask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        sv = tl.load(sv_base + slots[:, None] * DV + dv[None, :], mask=smask[:, None], other=0.0,
                     cache_modifier=".cg")
        acc = acc * alpha[:, None] + _dict_dot(pr / cnt[None, :], sv, IEEE, DICT)  # D_v = S_v / c
        m_i = m_new
        sim = _key_dot(k, skt, IEEE, DICT) * inv[None, :]
        sim = tl.where(smask[None, :], sim, float("-inf"))
        tile_best = tl.max(sim, axis=1)
        tile_idx = (tl.argmax(sim, axis=1).to(tl.int32) + t0) * P + p
        better = tile_best > best  # strict: the lowest slot wins ties, like torch.argmax
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    if p == 0:  # the causal local block, once per (batch, head)
        v = tl.load(V + bh * T * DV + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * beta
        s = tl.where((rows[None, :] <= rows[:, None]) & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + _dot(pr.to(v.dtype), v, IEEE)
        m_i = m_new
    base = ((bh * 2 + c % 2) * P + p) * L
    tl.store(PM + base + rows, m_i)
    tl.store(PL + base + rows, l_i)
    tl.store(PACC + (base + rows)[:, None] * DV + dv[None, :], acc)
    tl.store(PBEST + base + rows, best)
    tl.store(PIDX + base + rows, best_idx)


@triton.jit
def _phase_b(c, bh, p, BH, K, V, SK, SV, CNT, NACT, MSPAWN, RANK, PM, PL, PACC, PBEST, PIDX, OUT, LSE, Z,
             T, H, N, n_write, so_b, so_h, so_t,
             P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
             SPREAD: tl.constexpr, IEEE: tl.constexpr):
    """Merge chunk c's P partials: o and lse for program p's L/P rows; then the chunk's write (spawns, slots z,
    sums) restricted to program p's slots. Partials are read past L1 (.cg): other SMs wrote them."""
    RB: tl.constexpr = L // P
    dv = tl.arange(0, DV)
    part = (bh * 2 + c % 2) * P
    rb = p * RB + tl.arange(0, RB)
    m = tl.full([RB], float("-inf"), tl.float32)
    lsum = tl.zeros([RB], tl.float32)
    acc = tl.zeros([RB, DV], tl.float32)
    for j in tl.static_range(P):  # program 0 first: its partial holds the local block, so m is finite at once
        row_at = (part + j) * L + rb
        mj = tl.load(PM + row_at, cache_modifier=".cg")
        m_new = tl.maximum(m, mj)
        a = tl.exp(m - m_new)
        b = tl.exp(mj - m_new)
        lsum = lsum * a + tl.load(PL + row_at, cache_modifier=".cg") * b
        acc = acc * a[:, None] + tl.load(PACC + row_at[:, None] * DV + dv[None, :], cache_modifier=".cg") * b[:, None]
        m = m_new
    h = bh % H
    pos_r = c * L + rb
    valid_r = pos_r < T
    o_ptr = OUT + (bh // H) * so_b + h * so_h + pos_r[:, None] * so_t + dv[None, :]
    tl.store(o_ptr, (acc / lsum[:, None]).to(OUT.dtype.element_ty), mask=valid_r[:, None])
    tl.store(LSE + bh * T + pos_r, m + tl.log(lsum), mask=valid_r)
    if c < n_write:
        rows = tl.arange(0, L)
        dk = tl.arange(0, DK)
        best = tl.full([L], float("-inf"), tl.float32)
        best_idx = tl.zeros([L], tl.int32)
        for j in tl.static_range(P):
            key_at = (part + j) * L + rows
            bj = tl.load(PBEST + key_at, cache_modifier=".cg")
            ij = tl.load(PIDX + key_at, cache_modifier=".cg")
            better = (bj > best) | ((bj == best) & (ij < best_idx))
            best_idx = tl.where(better, ij, best_idx)
            best = tl.where(better, bj, best)
        pos = c * L + rows
        k = tl.load(K + bh * T * DK + pos[:, None] * DK + dk[None, :])
        v = tl.load(V + bh * T * DV + pos[:, None] * DV + dv[None, :])
        n = tl.load(NACT + c)
        z = _assign(k, best, best_idx, n, tl.load(MSPAWN + c), RANK + (c * BH + bh) * L, L, SPREAD, IEEE)
        if p == 0:
            tl.store(Z + bh * (n_write * L) + pos, z)
        own = (z % P) == p
        # Relaxed: only this program reads its sums, after a block barrier (see forward.py).
        tl.atomic_add(SK + bh * N * DK + z[:, None] * DK + dk[None, :], k.to(tl.float32), mask=own[:, None],
                      sem="relaxed")
        tl.atomic_add(SV + bh * N * DV + z[:, None] * DV + dv[None, :], v.to(tl.float32), mask=own[:, None],
                      sem="relaxed")
        tl.atomic_add(CNT + bh * N + z, tl.full([L], 1.0, tl.float32), mask=own, sem="relaxed")


@triton.jit
def _barrier(flags, p, epoch, P: tl.constexpr):
    """Wait until the P programs sharing `flags` [P] have all reached `epoch` (a chunk count). The stores
    before it are released and the loads after it acquire theirs (the pattern of a cooperative grid sync:
    block barrier, one release store of a flag, acquire polling, block barrier). Flags only grow, so a flag
    store is idempotent and the poll is a plain minimum."""
    tl.debug_barrier()
    if P > 1:
        tl.atomic_xchg(flags + p, epoch, sem="release")
        ids = tl.arange(0, P)
        seen = tl.min(tl.atomic_add(flags + ids, 0, sem="acquire"), axis=0)
        while seen < epoch:
            seen = tl.min(tl.atomic_add(flags + ids, 0, sem="acquire"), axis=0)
    tl.debug_barrier()


@triton.jit
def ovq_fwd_split_kernel(Q, K, V, BETA, SK, SV, CNT, NACT, MSPAWN, RANK, PM, PL, PACC, PBEST, PIDX, FLAGS,
                         OUT, LSE, Z, T, H, N, n_write, n_chunks, so_b, so_h, so_t,
                         P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                         BN: tl.constexpr, SPREAD: tl.constexpr, NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
                         DICT: tl.constexpr):
    """Persistent: grid (B * H * P,), every chunk in one launch."""
    pid = tl.program_id(0)
    bh = pid // P
    p = pid % P
    BH = tl.num_programs(0) // P
    beta = tl.load(BETA + bh % H).to(tl.float32)
    for c in range(0, n_chunks):
        _phase_a(c, bh, p, beta, Q, K, V, SK, SV, CNT, NACT, PM, PL, PACC, PBEST, PIDX, T, N,
                 P, L, DK, DV, BN, NORMALIZE, IEEE, DICT)
        _barrier(FLAGS + bh * P, p, c + 1, P)
        _phase_b(c, bh, p, BH, K, V, SK, SV, CNT, NACT, MSPAWN, RANK, PM, PL, PACC, PBEST, PIDX, OUT, LSE, Z,
                 T, H, N, n_write, so_b, so_h, so_t, P, L, DK, DV, SPREAD, IEEE)
        tl.debug_barrier()  # this program's sums are complete before its next phase A reads them


@triton.jit
def ovq_split_read_kernel(c, Q, K, V, BETA, SK, SV, CNT, NACT, PM, PL, PACC, PBEST, PIDX, T, H, N,
                          P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                          BN: tl.constexpr, NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
                          DICT: tl.constexpr):
    """Stepped phase A of chunk c: grid (B * H * P,)."""
    pid = tl.program_id(0)
    bh = pid // P
    beta = tl.load(BETA + bh % H).to(tl.float32)
    _phase_a(c, bh, pid % P, beta, Q, K, V, SK, SV, CNT, NACT, PM, PL, PACC, PBEST, PIDX, T, N,
             P, L, DK, DV, BN, NORMALIZE, IEEE, DICT)


@triton.jit
def ovq_split_write_kernel(c, K, V, SK, SV, CNT, NACT, MSPAWN, RANK, PM, PL, PACC, PBEST, PIDX, OUT, LSE, Z,
                           T, H, N, n_write, so_b, so_h, so_t,
                           P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                           SPREAD: tl.constexpr, IEEE: tl.constexpr):
    """Stepped phase B of chunk c: grid (B * H * P,)."""
    pid = tl.program_id(0)
    _phase_b(c, pid // P, pid % P, tl.num_programs(0) // P, K, V, SK, SV, CNT, NACT, MSPAWN, RANK, PM, PL,
             PACC, PBEST, PIDX, OUT, LSE, Z, T, H, N, n_write, so_b, so_h, so_t, P, L, DK, DV, SPREAD, IEEE)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def split_programs(bh: int, n_slots: int, block: int, chunk: int, sms: int) -> int:
    """P, programs per (batch, head): the largest power of two with all bh * P programs resident at once (at
    most one per SM, of `sms`), P <= chunk (each merges chunk / P output rows) and every program owning at
    least one full tile of `block` slots."""
    p = 1
    while 2 * p * bh <= sms and 2 * p <= chunk and 2 * p * block <= max(n_slots, block):
        p *= 2
    return p


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs one program at a time)."""
    if device.type != "cuda" or _interpreted():
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def ovq_forward_split_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                             cfg: OVQConfig, programs: int | None = None, stepped: bool | None = None,
                             block_slots: int = 64, num_warps: int = 8, dict_precision: str = "tf32"):
    """`ovq_forward_triton`'s contract (same inputs, outputs and results) with the slots split over
    `programs` programs per (batch, head) (a power of two <= chunk_size; default `split_programs`).
    stepped: two launches per chunk instead of one persistent launch (default: only when P > 1 under
    TRITON_INTERPRET=1, where the persistent kernel's barrier cannot work)."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    L, N = cfg.chunk_size, cfg.dict_size
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dev = q.device
    dmode = dict_mode(q.dtype, dict_precision)  # checks dict_precision before any work
    bn = max(16, min(block_slots, triton.next_power_of_2(N)))
    sms = _sm_count(dev)
    P = programs if programs is not None else split_programs(B * H, N, bn, L, sms)
    if P < 1 or P & (P - 1) or P > L:
        raise ValueError(f"programs must be a power of two between 1 and chunk_size={L}, got {P}")
    if stepped is None:
        stepped = P > 1 and _interpreted()
    if not stepped and P > 1:
        if _interpreted():
            raise ValueError("the persistent split kernel needs P = 1 under TRITON_INTERPRET=1 (programs run "
                             "one after another there); use stepped=True")
        if B * H * P > sms:
            raise ValueError(f"B * H * programs = {B * H * P} programs exceed the {sms} SMs: they could not all "
                             "be resident for the persistent kernel's barrier; use fewer programs or stepped=True")
    n_chunks = -(-T // L)
    n_write = T // L
    nact, msp = schedule_tensors(cfg, n_chunks, n_write, dev)
    spread = cfg.init == "spread"
    ranks = random_ranks(cfg, B, H, n_write, dev) if not spread else torch.empty(1, dtype=torch.int32, device=dev)
    sk = torch.zeros(B, H, N, DK, dtype=torch.float32, device=dev)
    sv = torch.zeros(B, H, N, DV, dtype=torch.float32, device=dev)
    cnt = torch.zeros(B, H, N, dtype=torch.float32, device=dev)
    o = torch.empty(B, T, H, DV, dtype=q.dtype, device=dev).transpose(1, 2)  # as in ovq_forward_triton
    lse = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    z = torch.empty(B, H, max(n_write * L, 1), dtype=torch.int32, device=dev)
    # Partials [B * H, 2 parities, P, L] (+ DV for acc): about 1 MiB per (batch, head) at P = 8, DV = 128.
    part = (B * H, 2, P, L)
    pm, pl, pbest = (torch.empty(part, dtype=torch.float32, device=dev) for _ in range(3))
    pacc = torch.empty(*part, DV, dtype=torch.float32, device=dev)
    pidx = torch.empty(part, dtype=torch.int32, device=dev)
    ieee = exact_dots(q.dtype)
    beta32 = beta.to(torch.float32).contiguous()
    grid = (B * H * P,)
    so = (o.stride(0), o.stride(1), o.stride(2))
    if stepped:
        for c in range(n_chunks):
            ovq_split_read_kernel[grid](
                c, q, k, v, beta32, sk, sv, cnt, nact, pm, pl, pacc, pbest, pidx, T, H, N,
                P=P, L=L, DK=DK, DV=DV, BN=bn, NORMALIZE=cfg.normalize_centroids, IEEE=ieee,
                DICT=dmode, num_warps=num_warps, num_stages=1)
            ovq_split_write_kernel[grid](
                c, k, v, sk, sv, cnt, nact, msp, ranks, pm, pl, pacc, pbest, pidx, o, lse, z,
                T, H, N, n_write, *so, P=P, L=L, DK=DK, DV=DV, SPREAD=spread, IEEE=ieee, num_warps=4)
    else:
        flags = torch.zeros(B * H, P, dtype=torch.int32, device=dev)
        ovq_fwd_split_kernel[grid](
            q, k, v, beta32, sk, sv, cnt, nact, msp, ranks, pm, pl, pacc, pbest, pidx, flags, o, lse, z,
            T, H, N, n_write, n_chunks, *so, P=P, L=L, DK=DK, DV=DV, BN=bn, SPREAD=spread,
            NORMALIZE=cfg.normalize_centroids, IEEE=ieee, DICT=dmode, num_warps=num_warps,
            num_stages=1)
    return o, lse, z[:, :, : n_write * L], sk, sv, cnt
