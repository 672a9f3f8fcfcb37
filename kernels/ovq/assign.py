"""The write of one chunk inside the OVQ forward kernels (per-head and split): spawn order, slot of each token,
and the atomic adds into the dictionary sums.

Inputs come through small per-program scratch vectors [L] in global memory (the caller stores them and
passes a block barrier): best[j] = max_i k_j.D_k[i] over the n slots active at the chunk start (-inf when
n = 0) and its slot best_idx[j]. Kept in memory rather than registers because the assignment walks the chunk
in row blocks of BM and needs every key's value at once, and because an [L, L] tile does not fit at L = 256
(see tiles.py). The same scratch holds the spawn ranks and `spread_topm`'s keys, so that a value used both as
a row vector and as a column block is one stored number (a recomputation could round differently and break
a sort's consistency).

rank[j]: token j's pick order among the spawns (slot n + rank[j] if rank[j] < m), L if it does not spawn.
- spread: farthest-first, the key least similar to the dictionary and to the earlier picks.
- random: the host's seeded ranks (forward.random_ranks).
- spread_topm: one shot; the rank of token j in increasing order of its key (best[j], or k_j.k_0 with an
  empty dictionary, token 0 first), ties to the lower position: rank_j = #{i : key_i < key_j or
  (key_i == key_j and i < j)}, counted over column blocks of 16 tokens (no sort).
Assignment: a spawning token owns its new slot; any other token joins best_idx (assign: chunk_start; slot 0
when n = 0, which best_idx already is), or with `with_spawned` the nearest spawned slot when that beats best
(argmax over all n + m slots, ties to the lowest slot).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import dot

INITS = ("spread", "random", "spread_topm")


@triton.jit
def _sims_to(k_c, j, L: tl.constexpr, DK: tl.constexpr):
    """k_i . k_j (float32 [L]) for the chunk's keys k_c [L, DK] (pointer) and one of them, j; in column
    slices of at most 32 so that no [L, DK] tile is live."""
    BD: tl.constexpr = 32 if DK > 32 else DK
    rows = tl.arange(0, L)
    acc = tl.zeros([L], tl.float32)
    for d0 in tl.static_range(0, DK, BD):
        d = d0 + tl.arange(0, BD)
        kb = tl.load(k_c + rows[:, None] * DK + d[None, :]).to(tl.float32)
        kj = tl.load(k_c + j * DK + d).to(tl.float32)
        acc += tl.sum(kb * kj[None, :], axis=1)
    return acc


@triton.jit
def _spawn_ranks(k_c, s_best, s_key, rank_c, n, m_sp, L: tl.constexpr, DK: tl.constexpr, INIT: tl.constexpr):
    """rank [L] int32 of the chunk's tokens (see the module docstring). s_best: best [L] (scratch, stored
    before a barrier); s_key: scratch [L] for spread_topm's keys; rank_c: the host's ranks for `random`."""
    rows = tl.arange(0, L)
    if INIT == "random":
        rank = tl.load(rank_c + rows)
    elif INIT == "spread":
        rank = tl.full([L], L, tl.int32)
        far = tl.load(s_best + rows, cache_modifier=".cg")
        steps = tl.where(m_sp == L, 0, m_sp)
        for j in range(0, steps):
            pick = tl.argmin(tl.where(rank < L, float("inf"), far), axis=0)
            rank = tl.where(rows == pick, j, rank)
            far = tl.maximum(far, _sims_to(k_c, pick, L, DK))
        rank = tl.where(m_sp == L, rows, rank)  # the whole chunk spawns: slots in position order
    else:
        if n > 0:
            key = tl.load(s_best + rows, cache_modifier=".cg")
        else:  # empty dictionary: token 0 first, then by similarity to it
            key = tl.where(rows == 0, float("-inf"), _sims_to(k_c, 0, L, DK))
        tl.store(s_key + rows, key)
        tl.debug_barrier()
        rank = tl.zeros([L], tl.int32)
        for cb in range(0, L // 16):  # [L, 16] comparisons: 16 per thread at L = 256 and 8 warps
            cols = cb * 16 + tl.arange(0, 16)
            key_c = tl.load(s_key + cols, cache_modifier=".cg")
            lower = key_c[None, :] < key[:, None]
            tie_before = (key_c[None, :] == key[:, None]) & (cols[None, :] < rows[:, None])
            rank += tl.sum((lower | tie_before).to(tl.int32), axis=1)
    return rank


@triton.jit
def write_chunk(k_c, v_c, sk_base, sv_base, c_base, z_c, s_best, s_idx, s_key, s_rank, rank_c, n, m_sp, p,
                 P: tl.constexpr, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
                 INIT: tl.constexpr, CHUNK_START: tl.constexpr, IEEE: tl.constexpr):
    """Write one full chunk: keys k_c [L, DK], values v_c [L, DV] (pointers to its first token) into the sums
    S_k, S_v and counts of the slots owned by program p of P (slot % P == p; P = 1: all), and (p = 0) each
    token's slot into z_c [L]. s_best, s_idx: best and best_idx [L] of the chunk's keys, stored by the caller
    before a block barrier; s_key, s_rank: scratch [L]. Relaxed atomics: only this program reads its sums,
    after a block barrier (PTX bar.sync performs every earlier memory access for all the block's threads);
    the default acq_rel puts a GPU-wide fence and an L1 invalidation around every element."""
    rows = tl.arange(0, L)
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    rank = _spawn_ranks(k_c, s_best, s_key, rank_c, n, m_sp, L, DK, INIT)
    tl.store(s_rank + rows, rank)
    tl.debug_barrier()
    for r in range(0, L // BM):
        rb = r * BM + tl.arange(0, BM)
        rank_r = tl.load(s_rank + rb, cache_modifier=".cg")
        z = tl.load(s_idx + rb, cache_modifier=".cg")
        if not CHUNK_START:
            k = tl.load(k_c + rb[:, None] * DK + dk[None, :])
            # Nearest spawned slot over column blocks of spawned tokens (slot n + rank; ties to the lowest).
            new_best = tl.full([BM], float("-inf"), tl.float32)
            new_rank = tl.full([BM], L, tl.int32)
            for cb in range(0, L // BM):
                cols = cb * BM + tl.arange(0, BM)
                rank_c2 = tl.load(s_rank + cols, cache_modifier=".cg")
                spawned_c = rank_c2 < m_sp
                kc = tl.load(k_c + cols[:, None] * DK + dk[None, :])
                sims = tl.where(spawned_c[None, :], dot(k, tl.trans(kc), IEEE), float("-inf"))
                blk_best = tl.max(sims, axis=1)
                tie = spawned_c[None, :] & (sims == blk_best[:, None])
                blk_rank = tl.min(tl.where(tie, rank_c2[None, :], L), axis=1)
                new_rank = tl.where(blk_best > new_best, blk_rank,
                                    tl.where(blk_best == new_best, tl.minimum(new_rank, blk_rank), new_rank))
                new_best = tl.maximum(new_best, blk_best)
            best_r = tl.load(s_best + rb, cache_modifier=".cg")
            z = tl.where(new_best > best_r, n + new_rank, z)
        z = tl.where(rank_r < m_sp, n + rank_r, z)
        if p == 0:
            tl.store(z_c + rb, z)
        own = (z % P) == p
        k = tl.load(k_c + rb[:, None] * DK + dk[None, :])
        v = tl.load(v_c + rb[:, None] * DV + dv[None, :])
        tl.atomic_add(sk_base + z[:, None] * DK + dk[None, :], k.to(tl.float32), mask=own[:, None], sem="relaxed")
        tl.atomic_add(sv_base + z[:, None] * DV + dv[None, :], v.to(tl.float32), mask=own[:, None], sem="relaxed")
        tl.atomic_add(c_base + z, tl.full([BM], 1.0, tl.float32), mask=own, sem="relaxed")


def init_mode(init: str) -> str:
    """The kernels' INIT constexpr for the config's `init` (checked)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    return init

