"""How a KV cache of T keys is split over R ranks, and each rank's shard drawn from a seed.

Rank r holds keys [start_r, start_r + n_r): contiguous blocks in rank order, the first T % R ranks one key
longer (T need not divide by R; with T < R the last ranks hold none). A shard is one packed tensor
kv[2, B, G, n_r, dh] (K then V), so a strategy moves K and V in one message.
"""

from __future__ import annotations

import torch


def shard_lengths(total: int, world_size: int) -> list[int]:
    """Keys per rank: `total` split into `world_size` contiguous blocks differing by at most one."""
    if world_size < 1 or total < 0:
        raise ValueError(f"need world_size >= 1 and total >= 0, got {world_size}, {total}")
    base, extra = divmod(total, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_starts(total: int, world_size: int) -> list[int]:
    """The first key position of each rank's block."""
    starts, pos = [], 0
    for n in shard_lengths(total, world_size):
        starts.append(pos)
        pos += n
    return starts


def random_shard(seed: int, rank: int, batch: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """kv[2, B, G, length, dh] ~ N(0, 1) drawn from (seed, rank): every rank draws its own block without the
    others', and a test can draw all blocks to rebuild the whole cache (never zeros: they would hide unwritten outputs and wrong indexing)."""
    gen = torch.Generator(device="cpu").manual_seed(seed * 100_003 + rank)
    kv = torch.randn(2, batch, kv_heads, length, head_dim, generator=gen, dtype=torch.float64 if dtype ==
                     torch.float64 else torch.float32)
    return kv.to(device=device, dtype=dtype)
