"""Triton chunked forward of the OVQ-attention core: reads, spawning and running-mean merges for a sequence.

One program per (batch, head) walks the chunks in order (the dictionary is a recurrence over chunks). Per
chunk, for each row block of BM rows (tiles.py: no [L, d] or [L, L] tile is live, so L = 256 fits), one pass
over the active slots in tiles of BN serves both the read (flash-style online softmax over beta q.D_k, plus
log c with `count_bias`, then the causal local block in key blocks) and the assignment (running max and
argmax of k.D_k over the old slots, which is also the spread inits' distance to the dictionary). Then the
chunk's write (assign.py): spawn order (farthest-first, one-shot top-m, or the host's seeded random ranks),
each token's slot (`assign: with_spawned` or `chunk_start`), and atomic adds of its key and value.

Inside the kernel the dictionary is kept as sums S_k, S_v and counts c (a running mean is S / c; for
`lr: adaptive` a merge is then a plain add, order-free). D_k = S_k / |S_k| (normalize_centroids) or S_k / c,
D_v = S_v / c. The host converts to the reference's means afterwards. Only `lr: adaptive` and
`value_update: mean` run here; the layer uses the PyTorch reference for the others.

Outputs: o [B, H, T, dv], lse [B, H, T] (log-sum-exp of the read, for a backward), z [B, H, Tw] (slot of each
written token), and the final sums. Requirements: L, dk, dv powers of two >= 16; q, k, v contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .assign import write_chunk
from .config import OVQConfig
from .launch_inputs import schedule_tensors, spawn_ranks_input, write_options, write_scratch
from .tiles import dict_mode, exact_dots, read_dict, read_local, row_block, row_tiles, slot_block


@triton.jit
def ovq_fwd_kernel(Q, K, V, BETA, SK, SV, CNT, NACT, MSPAWN, RANK, SBEST, SIDX, SKEY, SRANK, OUT, LSE, Z,
                   T, H, N, n_write, n_chunks, so_b, so_h, so_t,
                   L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                   INIT: tl.constexpr, CHUNK_START: tl.constexpr, COUNT_BIAS: tl.constexpr,
                   NORMALIZE: tl.constexpr, IEEE: tl.constexpr, DICT: tl.constexpr):
    """Grid (B * H,). SBEST, SIDX, SKEY, SRANK: per-program scratch [B * H, L] (see assign.py)."""
    bh = tl.program_id(0)
    h = bh % H
    beta = tl.load(BETA + h).to(tl.float32)
    dv = tl.arange(0, DV)
    k_base = K + bh * T * DK
    v_base = V + bh * T * DV
    sk_base = SK + bh * N * DK
    sv_base = SV + bh * N * DV
    c_base = CNT + bh * N
    scratch = bh * L
    for c in range(0, n_chunks):
        n = tl.load(NACT + c)
        for r in range(0, L // BM):
            rows, pos, valid, q, k = row_tiles(c, r, Q + bh * T * DK, k_base, T, L, BM, DK)
            m_i, l_i, acc, best, best_idx = read_dict(q, k, beta, sk_base, sv_base, c_base, n, 0, n, 1,
                                                       BM, DK, DV, BN, NORMALIZE, COUNT_BIAS, IEEE, DICT)
            m_i, l_i, acc = read_local(q, rows, beta, m_i, l_i, acc, k_base, v_base, c, r, T, L, BM, DK, DV, IEEE)
            o_ptr = OUT + (bh // H) * so_b + h * so_h + pos[:, None] * so_t + dv[None, :]
            tl.store(o_ptr, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=valid[:, None])
            tl.store(LSE + bh * T + pos, m_i + tl.log(l_i), mask=valid)
            tl.store(SBEST + scratch + rows, best)
            tl.store(SIDX + scratch + rows, best_idx)
        if c < n_write:
            tl.debug_barrier()  # every row block's best is stored before the write reads them all
            write_chunk(k_base + c * L * DK, v_base + c * L * DV, sk_base, sv_base, c_base,
                         Z + bh * (n_write * L) + c * L, SBEST + scratch, SIDX + scratch, SKEY + scratch,
                         SRANK + scratch, RANK + (c * tl.num_programs(0) + bh) * L, n, tl.load(MSPAWN + c), 0,
                         1, L, DK, DV, BM, INIT, CHUNK_START, IEEE)
        tl.debug_barrier()  # the sums are complete before the next chunk reads them


def ovq_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, cfg: OVQConfig,
                       block_slots: int = 64, num_warps: int = 8, dict_precision: str = "tf32", num_stages: int = 1,
                       block_rows: int = 64):
    """Run the kernel over q, k [B, H, T, dk] (unit-norm), v [B, H, T, dv] from an empty dictionary.
    block_rows: BM, rows per block of a chunk (tiles.row_block; any power of two >= 16, results equal).

    Returns o [B, H, T, dv] (input dtype; a transposed view of [B, T, H, dv] memory), lse [B, H, T] float32,
    z [B, H, Tw] int32 (Tw = written tokens), and the dictionary sums S_k [B, H, N, dk], S_v [B, H, N, dv],
    counts [B, H, N] (float32).
    """
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    L, N = cfg.chunk_size, cfg.dict_size
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    n_chunks = -(-T // L)
    dmode = dict_mode(q.dtype, dict_precision)  # checks dict_precision before any work
    opts = write_options(cfg)
    bm = row_block(L, block_rows)
    n_write = T // L
    dev = q.device
    nact, msp = schedule_tensors(cfg, n_chunks, n_write, dev)
    ranks = spawn_ranks_input(cfg, B, H, n_write, dev)
    sk = torch.zeros(B, H, N, DK, dtype=torch.float32, device=dev)
    sv = torch.zeros(B, H, N, DV, dtype=torch.float32, device=dev)
    cnt = torch.zeros(B, H, N, dtype=torch.float32, device=dev)
    # o [B, H, T, dv] as a view of [B, T, H, dv] memory: the layer's output projection then reads it without
    # a transposed copy, so autograd keeps one o (the Function's) rather than two.
    o = torch.empty(B, T, H, DV, dtype=q.dtype, device=dev).transpose(1, 2)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    z = torch.empty(B, H, max(n_write * L, 1), dtype=torch.int32, device=dev)
    ovq_fwd_kernel[(B * H,)](
        q, k, v, beta.to(torch.float32).contiguous(), sk, sv, cnt, nact, msp, ranks,
        *write_scratch(B * H, L, dev), o, lse, z,
        T, H, N, n_write, n_chunks, o.stride(0), o.stride(1), o.stride(2),
        L=L, DK=DK, DV=DV, BN=slot_block(block_slots, N), BM=bm, **opts,
        IEEE=exact_dots(q.dtype), DICT=dmode, num_warps=num_warps, num_stages=num_stages)
    return o, lse, z[:, :, : n_write * L], sk, sv, cnt
