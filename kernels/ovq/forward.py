"""Triton chunked forward of the OVQ-attention core: reads, spawning and running-mean merges for a sequence.

One program per (batch, head) walks the chunks in order (the dictionary is a recurrence over chunks). Per
chunk it makes one pass over the active slots in tiles of BN, which serves both the read (flash-style online
softmax over beta q.D_k + log c, then the causal L x L local block) and the assignment (running max and
argmax of k.D_k over the old slots, which is also the `spread` init's distance to the dictionary). Then it
picks the spawned tokens (farthest-first in registers, or the host's seeded random ranks), and adds every
token's key and value into its slot with atomics.

Inside the kernel the dictionary is kept as sums S_k, S_v and counts c (a running mean is S / c; for
`lr: adaptive` a merge is then a plain add, order-free). D_k = S_k / |S_k| (normalize_centroids) or S_k / c,
D_v = S_v / c. The host converts to the reference's means afterwards. Only `lr: adaptive` runs here; the layer
uses the PyTorch reference for `lr: constant`.

Outputs: o [B, H, T, dv], lse [B, H, T] (log-sum-exp of the read, for a backward), z [B, H, Tw] (slot of each
written token), and the final sums. Requirements: L, dk, dv powers of two >= 16; q, k, v contiguous.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .config import OVQConfig, spawn_count


def exact_dots(dtype: torch.dtype) -> bool:
    """IEEE float32 products for float32 inputs (tf32 would miss float32 tolerances), and always under
    TRITON_INTERPRET=1, whose dot mishandles bf16 operands (checked with triton 3.9)."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


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


@triton.jit
def _dict_dot(a, b, IEEE: tl.constexpr, DICT: tl.constexpr):
    """a @ b where one operand holds float32 dictionary values (D_v, D_k as a gradient's factor) whose
    rounding the softmax does not amplify; DICT as in `dict_mode`. Under the interpreter (IEEE) the bf16 modes
    are emulated exactly: bf16-rounded operands, float32 products, as the tensor cores compute them."""
    if DICT == "ieee" or (IEEE and DICT == "tf32"):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if DICT == "tf32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    return _dot(a.to(tl.bfloat16), b.to(tl.bfloat16), IEEE)


@triton.jit
def _key_dot(a, b, IEEE: tl.constexpr, DICT: tl.constexpr):
    """a [M, K] @ b [K, N] for logits and similarities against the key dictionary b (float32), whose error
    beta multiplies: under "bf16x2", b = hi + lo in bf16 and a @ hi + a @ lo (exact for a in bf16, as q and k
    are); otherwise as `_dict_dot`."""
    if DICT == "bf16x2":
        a16 = a.to(tl.bfloat16)
        hi = b.to(tl.bfloat16)
        lo = (b - hi.to(tl.float32)).to(tl.bfloat16)
        if IEEE:
            return _dot(a16, hi, IEEE) + _dot(a16, lo, IEEE)
        return tl.dot(a16, lo, acc=tl.dot(a16, hi))
    return _dict_dot(a, b, IEEE, DICT)


@triton.jit
def _slot_tile(sk_base, c_base, slots, smask, dk, DK: tl.constexpr, NORMALIZE: tl.constexpr):
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
def _assign(k, best, best_idx, n, m_sp, rank_ptr, L: tl.constexpr, SPREAD: tl.constexpr, IEEE: tl.constexpr):
    """Slot z [L] (int32) of each key of a chunk: the m_sp spawned keys get slots n, n+1, ... in pick order,
    every other key its nearest slot among the old ones (best, best_idx: max similarity and argmax over the n
    slots active at the chunk start) and the spawned ones. k [L, dk] unit keys; rank_ptr: the host's seeded
    spawn ranks [L] of this chunk and head for `init: random`."""
    rows = tl.arange(0, L)
    kk = _dot(k, tl.trans(k), IEEE)  # [L, L] key-key similarities
    if SPREAD:
        # Farthest-first: pick the key least similar to the dictionary and to earlier picks.
        rank = tl.full([L], L, tl.int32)
        far = best
        steps = tl.where(m_sp == L, 0, m_sp)
        for j in range(0, steps):
            score = tl.where(rank < L, float("inf"), far)
            pick = tl.argmin(score, axis=0)
            rank = tl.where(rows == pick, j, rank)
            col = tl.max(tl.where(rows[None, :] == pick, kk, float("-inf")), axis=1)
            far = tl.maximum(far, col)
        rank = tl.where(m_sp == L, rows, rank)
    else:
        rank = tl.load(rank_ptr + rows)
    spawned = rank < m_sp
    # Nearest spawned slot for the other tokens (slot n + rank; ties go to the lowest slot).
    sims_new = tl.where(spawned[None, :], kk, float("-inf"))
    new_best = tl.max(sims_new, axis=1)
    tie_rank = tl.where(spawned[None, :] & (sims_new == new_best[:, None]), rank[None, :], L)
    new_rank = tl.min(tie_rank, axis=1)
    return tl.where(spawned, n + rank, tl.where(new_best > best, n + new_rank, best_idx))


@triton.jit
def ovq_fwd_kernel(Q, K, V, BETA, SK, SV, CNT, NACT, MSPAWN, RANK, OUT, LSE, Z,
                   T, H, N, n_write, n_chunks, so_b, so_h, so_t,
                   L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
                   SPREAD: tl.constexpr, NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
                   DICT: tl.constexpr):
    bh = tl.program_id(0)
    h = bh % H
    beta = tl.load(BETA + h).to(tl.float32)
    rows = tl.arange(0, L)
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    slot_ids = tl.arange(0, BN)
    q_base = Q + bh * T * DK
    k_base = K + bh * T * DK
    v_base = V + bh * T * DV
    sk_base = SK + bh * N * DK
    sv_base = SV + bh * N * DV
    c_base = CNT + bh * N
    for c in range(0, n_chunks):
        pos = c * L + rows
        valid = pos < T
        q = tl.load(q_base + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(k_base + pos[:, None] * DK + dk[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + pos[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0)
        n = tl.load(NACT + c)
        m_i = tl.full([L], float("-inf"), tl.float32)
        l_i = tl.zeros([L], tl.float32)
        acc = tl.zeros([L, DV], tl.float32)
        best = tl.full([L], float("-inf"), tl.float32)
        best_idx = tl.zeros([L], tl.int32)
        # One pass over the active slots: read (online softmax) and nearest old slot for every key.
        for s0 in range(0, n, BN):
            slots = s0 + slot_ids
            smask = slots < n
            sk, cnt, scale = _slot_tile(sk_base, c_base, slots, smask, dk, DK, NORMALIZE)
            inv = 1.0 / scale
            skt = tl.trans(sk)
            s = _key_dot(q, skt, IEEE, DICT) * (beta * inv)[None, :] + tl.log(cnt)[None, :]
            s = tl.where(smask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            scale = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * scale + tl.sum(p, axis=1)
            sv = tl.load(sv_base + slots[:, None] * DV + dv[None, :], mask=smask[:, None], other=0.0,
                         cache_modifier=".cg")
            pv = p / cnt[None, :]  # D_v = S_v / c
            acc = acc * scale[:, None] + _dict_dot(pv, sv, IEEE, DICT)
            m_i = m_new
            sim = _key_dot(k, skt, IEEE, DICT) * inv[None, :]
            sim = tl.where(smask[None, :], sim, float("-inf"))
            tile_best = tl.max(sim, axis=1)
            tile_idx = tl.argmax(sim, axis=1).to(tl.int32) + s0
            better = tile_best > best  # strict: the lowest slot wins ties, like torch.argmax
            best_idx = tl.where(better, tile_idx, best_idx)
            best = tl.where(better, tile_best, best)
        # The causal local block.
        s = _dot(q, tl.trans(k), IEEE) * beta
        visible = (rows[None, :] <= rows[:, None]) & valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        scale = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * scale + tl.sum(p, axis=1)
        acc = acc * scale[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
        o = acc / l_i[:, None]
        o_ptr = OUT + (bh // H) * so_b + h * so_h + pos[:, None] * so_t + dv[None, :]
        tl.store(o_ptr, o.to(OUT.dtype.element_ty), mask=valid[:, None])
        tl.store(LSE + bh * T + pos, m_i + tl.log(l_i), mask=valid)
        if c < n_write:
            z = _assign(k, best, best_idx, n, tl.load(MSPAWN + c), RANK + (c * tl.num_programs(0) + bh) * L,
                        L, SPREAD, IEEE)
            tl.store(Z + bh * (n_write * L) + pos, z)
            # Relaxed atomics: only this program reads the sums, after the block barrier below, which performs
            # every earlier memory access for all its threads (PTX bar.sync). The default (acq_rel) puts a
            # GPU-wide fence and an L1 invalidation around every element: 65 of each per thread per chunk.
            tl.atomic_add(sk_base + z[:, None] * DK + dk[None, :], k.to(tl.float32), sem="relaxed")
            tl.atomic_add(sv_base + z[:, None] * DV + dv[None, :], v.to(tl.float32), sem="relaxed")
            tl.atomic_add(c_base + z, tl.full([L], 1.0, tl.float32), sem="relaxed")
        tl.debug_barrier()


def schedule_tensors(cfg: OVQConfig, n_chunks: int, n_write: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Active slots at each chunk start [n_chunks] and slots each written chunk spawns [max(n_write, 1)]."""
    starts, spawns = [], []
    for c in range(n_chunks):
        n, m = spawn_count(cfg, c)
        starts.append(n)
        spawns.append(m)
    nact = torch.tensor(starts or [0], dtype=torch.int32, device=device)
    msp = torch.tensor(spawns[:n_write] or [0], dtype=torch.int32, device=device)
    return nact, msp


def random_ranks(cfg: OVQConfig, B: int, H: int, n_write: int, device: torch.device) -> torch.Tensor:
    """For `init: random`: rank [n_write, B, H, L] of each token in its chunk's spawn order (the j-th pick has
    rank j, tokens not picked rank L), drawn exactly as the reference draws them."""
    L = cfg.chunk_size
    ranks = torch.full((max(n_write, 1), B, H, L), L, dtype=torch.int32)
    for c in range(n_write):
        m = spawn_count(cfg, c)[1]
        if m == L:
            ranks[c] = torch.arange(L, dtype=torch.int32)
        elif m > 0:
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + c)
            picks = torch.rand(B, H, L, generator=gen).topk(m, dim=-1, largest=False).indices
            ranks[c].scatter_(-1, picks, torch.arange(m, dtype=torch.int32).expand(B, H, m).contiguous())
    return ranks.to(device)


def ovq_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, cfg: OVQConfig,
                       block_slots: int = 64, num_warps: int = 8, dict_precision: str = "tf32", num_stages: int = 1):
    """Run the kernel over q, k [B, H, T, dk] (unit-norm), v [B, H, T, dv] from an empty dictionary.

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
    n_write = T // L
    dev = q.device
    nact, msp = schedule_tensors(cfg, n_chunks, n_write, dev)
    spread = cfg.init == "spread"
    ranks = random_ranks(cfg, B, H, n_write, dev) if not spread else torch.empty(1, dtype=torch.int32, device=dev)
    sk = torch.zeros(B, H, N, DK, dtype=torch.float32, device=dev)
    sv = torch.zeros(B, H, N, DV, dtype=torch.float32, device=dev)
    cnt = torch.zeros(B, H, N, dtype=torch.float32, device=dev)
    # o [B, H, T, dv] as a view of [B, T, H, dv] memory: the layer's output projection then reads it without
    # a transposed copy, so autograd keeps one o (the Function's) rather than two.
    o = torch.empty(B, T, H, DV, dtype=q.dtype, device=dev).transpose(1, 2)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    z = torch.empty(B, H, max(n_write * L, 1), dtype=torch.int32, device=dev)
    bn = max(16, min(block_slots, triton.next_power_of_2(N)))
    ovq_fwd_kernel[(B * H,)](
        q, k, v, beta.to(torch.float32).contiguous(), sk, sv, cnt, nact, msp, ranks, o, lse, z,
        T, H, N, n_write, n_chunks, o.stride(0), o.stride(1), o.stride(2),
        L=L, DK=DK, DV=DV, BN=bn, SPREAD=spread, NORMALIZE=cfg.normalize_centroids,
        IEEE=exact_dots(q.dtype), DICT=dmode, num_warps=num_warps,
        num_stages=num_stages)
    return o, lse, z[:, :, : n_write * L], sk, sv, cnt
