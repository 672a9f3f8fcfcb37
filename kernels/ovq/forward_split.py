"""Triton chunked forward of the OVQ-attention core with the slots of each (batch, head) split over P programs.

The v1 forward (`forward.py`) runs one program per (batch, head): 16 programs on a 132-SM GPU at B=1, H=16.
Here P programs share a (batch, head), program p owning the slots p, p + P, p + 2P, ... (interleaved, so the
work stays balanced while the dictionary grows). Per chunk:

- phase A (every program), per row block of BM rows (tiles.py): one pass over its own active slots gives a
  partial read (online-softmax max m, sum l and weighted values acc, flash-attention style; program 0 also
  adds the causal local block) and a partial assignment (max similarity and argmax of each key over its
  slots). Partials go to a small global scratch, double-buffered by chunk parity.
- barrier between the P programs of the (batch, head): each stores the chunk it finished in a flag and waits
  until all P flags reach it. One barrier per chunk is enough: a program writes a parity buffer again only two
  chunks later, after every program has passed the next barrier, i.e. finished reading it.
- phase B (every program): merges the P read partials for its L/P rows with a log-sum-exp merge (o, lse), and
  the P assignment partials for all L keys; every program then picks the same spawns and slots z (the shared
  `assign._write_chunk`), and adds the keys and values assigned to its own slots into the float32 sums. No other program
  touches those slots, so the next chunk's phase A needs no further synchronisation.

The persistent kernel runs all chunks in one launch; all B * H * P programs must be resident at once (the host
keeps B * H * P <= SM count), or the barrier would wait for a program that never starts. The stepped path
launches phase A and phase B once per chunk instead (no barrier; 2 launches per chunk): it is what runs P > 1
under TRITON_INTERPRET=1, which executes programs one after another, and it shares every line of math with
the persistent kernel. Outputs and requirements are those of `ovq_forward_triton`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .assign import write_chunk
from .config import OVQConfig
from .launch_inputs import schedule_tensors, spawn_ranks_input, write_options, write_scratch
from .split import barrier, merge_rows, split_launch
from .tiles import dict_mode, exact_dots, read_dict, read_local, row_block, row_tiles, slot_block


@triton.jit
def _phase_a(c, bh, p, beta, Q, K, V, SK, SV, CNT, NACT, PM, PL, PACC, PBEST, PIDX, T, N,
             P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
             BM: tl.constexpr, NORMALIZE: tl.constexpr, COUNT_BIAS: tl.constexpr, IEEE: tl.constexpr,
             DICT: tl.constexpr):
    """Partial read and assignment of chunk c over program p's slots, in row blocks of BM; stores m, l [L],
    acc [L, DV], best [L] and its slot index [L] into parity buffer c % 2."""
    dv = tl.arange(0, DV)
    k_base = K + bh * T * DK
    n = tl.load(NACT + c)
    owned = (n - p + P - 1) // P  # slots p, p + P, ... below n
    base = ((bh * 2 + c % 2) * P + p) * L
    for r in range(0, L // BM):
        rows, pos, valid, q, k = row_tiles(c, r, Q + bh * T * DK, k_base, T, L, BM, DK)
        m_i, l_i, acc, best, best_idx = read_dict(q, k, beta, SK + bh * N * DK, SV + bh * N * DV, CNT + bh * N,
                                                   n, p, owned, P, BM, DK, DV, BN, NORMALIZE, COUNT_BIAS, IEEE,
                                                   DICT)
        if p == 0:  # the causal local block, once per (batch, head)
            m_i, l_i, acc = read_local(q, rows, beta, m_i, l_i, acc, k_base, V + bh * T * DV, c, r, T,
                                        L, BM, DK, DV, IEEE)
        tl.store(PM + base + rows, m_i)
        tl.store(PL + base + rows, l_i)
        tl.store(PACC + (base + rows)[:, None] * DV + dv[None, :], acc)
        tl.store(PBEST + base + rows, best)
        tl.store(PIDX + base + rows, best_idx)


@triton.jit
def _phase_b(c, bh, p, BH, K, V, SK, SV, CNT, NACT, MSPAWN, RANK, PM, PL, PACC, PBEST, PIDX,
             SBEST, SIDX, SKEY, SRANK, OUT, LSE, Z, T, H, N, n_write, so_b, so_h, so_t,
             P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
             RM: tl.constexpr, INIT: tl.constexpr, CHUNK_START: tl.constexpr, IEEE: tl.constexpr):
    """Merge chunk c's P partials: o and lse for program p's L/P rows (RM at a time); then the chunk's write
    (spawns, slots z, sums) restricted to program p's slots. Partials are read past L1 (.cg): other SMs
    wrote them. SBEST, SIDX, SKEY, SRANK: this program's scratch [L] (assign.py)."""
    RB: tl.constexpr = L // P
    dv = tl.arange(0, DV)
    part = (bh * 2 + c % 2) * P
    h = bh % H
    for r0 in range(0, RB, RM):
        rb = p * RB + r0 + tl.arange(0, RM)
        m = tl.full([RM], float("-inf"), tl.float32)
        lsum = tl.zeros([RM], tl.float32)
        acc = tl.zeros([RM, DV], tl.float32)
        for j in tl.static_range(P):  # program 0 first: its partial holds the local block, so m is finite
            row_at = (part + j) * L + rb
            mj = tl.load(PM + row_at, cache_modifier=".cg")
            m_new = tl.maximum(m, mj)
            a = tl.exp(m - m_new)
            b = tl.exp(mj - m_new)
            lsum = lsum * a + tl.load(PL + row_at, cache_modifier=".cg") * b
            pacc = tl.load(PACC + row_at[:, None] * DV + dv[None, :], cache_modifier=".cg")
            acc = acc * a[:, None] + pacc * b[:, None]
            m = m_new
        pos_r = c * L + rb
        valid_r = pos_r < T
        o_ptr = OUT + (bh // H) * so_b + h * so_h + pos_r[:, None] * so_t + dv[None, :]
        tl.store(o_ptr, (acc / lsum[:, None]).to(OUT.dtype.element_ty), mask=valid_r[:, None])
        tl.store(LSE + bh * T + pos_r, m + tl.log(lsum), mask=valid_r)
    if c < n_write:
        rows = tl.arange(0, L)
        best = tl.full([L], float("-inf"), tl.float32)
        best_idx = tl.zeros([L], tl.int32)
        for j in tl.static_range(P):
            key_at = (part + j) * L + rows
            bj = tl.load(PBEST + key_at, cache_modifier=".cg")
            ij = tl.load(PIDX + key_at, cache_modifier=".cg")
            better = (bj > best) | ((bj == best) & (ij < best_idx))
            best_idx = tl.where(better, ij, best_idx)
            best = tl.where(better, bj, best)
        tl.store(SBEST + rows, best)
        tl.store(SIDX + rows, best_idx)
        tl.debug_barrier()
        # Every program computes the same spawns and slots; each adds only the tokens of its own slots.
        write_chunk(K + bh * T * DK + c * L * DK, V + bh * T * DV + c * L * DV, SK + bh * N * DK,
                     SV + bh * N * DV, CNT + bh * N, Z + bh * (n_write * L) + c * L, SBEST, SIDX, SKEY, SRANK,
                     RANK + (c * BH + bh) * L, tl.load(NACT + c), tl.load(MSPAWN + c), p, P, L, DK, DV, BM,
                     INIT, CHUNK_START, IEEE)


@triton.jit
def ovq_fwd_split_kernel(Q, K, V, BETA, SK, SV, CNT, NACT, MSPAWN, RANK, PM, PL, PACC, PBEST, PIDX,
                         SBEST, SIDX, SKEY, SRANK, FLAGS, OUT, LSE, Z, T, H, N, n_write, n_chunks, so_b, so_h, so_t,
                         P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                         BN: tl.constexpr, BM: tl.constexpr, RM: tl.constexpr, INIT: tl.constexpr,
                         CHUNK_START: tl.constexpr, COUNT_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                         IEEE: tl.constexpr, DICT: tl.constexpr):
    """Persistent: grid (B * H * P,), every chunk in one launch. SBEST.. SRANK: scratch [B * H * P, L]."""
    pid = tl.program_id(0)
    bh = pid // P
    p = pid % P
    BH = tl.num_programs(0) // P
    beta = tl.load(BETA + bh % H).to(tl.float32)
    scratch = pid * L
    for c in range(0, n_chunks):
        _phase_a(c, bh, p, beta, Q, K, V, SK, SV, CNT, NACT, PM, PL, PACC, PBEST, PIDX, T, N,
                 P, L, DK, DV, BN, BM, NORMALIZE, COUNT_BIAS, IEEE, DICT)
        barrier(FLAGS + bh * P, p, c + 1, P)
        _phase_b(c, bh, p, BH, K, V, SK, SV, CNT, NACT, MSPAWN, RANK, PM, PL, PACC, PBEST, PIDX,
                 SBEST + scratch, SIDX + scratch, SKEY + scratch, SRANK + scratch, OUT, LSE, Z,
                 T, H, N, n_write, so_b, so_h, so_t, P, L, DK, DV, BM, RM, INIT, CHUNK_START, IEEE)
        tl.debug_barrier()  # this program's sums are complete before its next phase A reads them


@triton.jit
def ovq_split_read_kernel(c, Q, K, V, BETA, SK, SV, CNT, NACT, PM, PL, PACC, PBEST, PIDX, T, H, N,
                          P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                          BN: tl.constexpr, BM: tl.constexpr, COUNT_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                          IEEE: tl.constexpr, DICT: tl.constexpr):
    """Stepped phase A of chunk c: grid (B * H * P,)."""
    pid = tl.program_id(0)
    bh = pid // P
    beta = tl.load(BETA + bh % H).to(tl.float32)
    _phase_a(c, bh, pid % P, beta, Q, K, V, SK, SV, CNT, NACT, PM, PL, PACC, PBEST, PIDX, T, N,
             P, L, DK, DV, BN, BM, NORMALIZE, COUNT_BIAS, IEEE, DICT)


@triton.jit
def ovq_split_write_kernel(c, K, V, SK, SV, CNT, NACT, MSPAWN, RANK, PM, PL, PACC, PBEST, PIDX,
                           SBEST, SIDX, SKEY, SRANK, OUT, LSE, Z, T, H, N, n_write, so_b, so_h, so_t,
                           P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                           BM: tl.constexpr, RM: tl.constexpr, INIT: tl.constexpr, CHUNK_START: tl.constexpr,
                           IEEE: tl.constexpr):
    """Stepped phase B of chunk c: grid (B * H * P,)."""
    pid = tl.program_id(0)
    s = pid * L
    _phase_b(c, pid // P, pid % P, tl.num_programs(0) // P, K, V, SK, SV, CNT, NACT, MSPAWN, RANK, PM, PL,
             PACC, PBEST, PIDX, SBEST + s, SIDX + s, SKEY + s, SRANK + s, OUT, LSE, Z, T, H, N, n_write,
             so_b, so_h, so_t, P, L, DK, DV, BM, RM, INIT, CHUNK_START, IEEE)


def ovq_forward_split_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                             cfg: OVQConfig, programs: int | None = None, stepped: bool | None = None,
                             block_slots: int = 64, num_warps: int = 8, dict_precision: str = "tf32",
                             block_rows: int = 64):
    """`ovq_forward_triton`'s contract (same inputs, outputs and results) with the slots split over
    `programs` programs per (batch, head) (a power of two <= chunk_size; default `split_programs`).
    stepped: two launches per chunk instead of one persistent launch (default: only when P > 1 under
    TRITON_INTERPRET=1, where the persistent kernel's barrier cannot work). block_rows as in
    `ovq_forward_triton`."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    L, N = cfg.chunk_size, cfg.dict_size
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dev = q.device
    dmode = dict_mode(q.dtype, dict_precision)  # checks dict_precision before any work
    opts = write_options(cfg)
    bm = row_block(L, block_rows)
    bn = slot_block(block_slots, N)
    P, stepped = split_launch(B * H, N, bn, L, dev, programs, stepped, "split kernel")
    n_chunks = -(-T // L)
    n_write = T // L
    nact, msp = schedule_tensors(cfg, n_chunks, n_write, dev)
    ranks = spawn_ranks_input(cfg, B, H, n_write, dev)
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
    scratch = write_scratch(B * H * P, L, dev)
    ieee = exact_dots(q.dtype)
    beta32 = beta.to(torch.float32).contiguous()
    grid = (B * H * P,)
    so = (o.stride(0), o.stride(1), o.stride(2))
    shape = dict(P=P, L=L, DK=DK, DV=DV, BM=bm)
    write_consts = dict(RM=merge_rows(L, P), INIT=opts["INIT"], CHUNK_START=opts["CHUNK_START"])
    read_consts = dict(BN=bn, COUNT_BIAS=opts["COUNT_BIAS"], NORMALIZE=opts["NORMALIZE"], DICT=dmode)
    if stepped:
        for c in range(n_chunks):
            ovq_split_read_kernel[grid](
                c, q, k, v, beta32, sk, sv, cnt, nact, pm, pl, pacc, pbest, pidx, T, H, N,
                **shape, **read_consts, IEEE=ieee, num_warps=num_warps, num_stages=1)
            ovq_split_write_kernel[grid](
                c, k, v, sk, sv, cnt, nact, msp, ranks, pm, pl, pacc, pbest, pidx, *scratch, o, lse, z,
                T, H, N, n_write, *so, **shape, **write_consts, IEEE=ieee, num_warps=8)
    else:
        flags = torch.zeros(B * H, P, dtype=torch.int32, device=dev)
        ovq_fwd_split_kernel[grid](
            q, k, v, beta32, sk, sv, cnt, nact, msp, ranks, pm, pl, pacc, pbest, pidx, *scratch, flags, o, lse, z,
            T, H, N, n_write, n_chunks, *so, **shape, **write_consts, **read_consts, IEEE=ieee,
            num_warps=num_warps, num_stages=1)
    return o, lse, z[:, :, : n_write * L], sk, sv, cnt
