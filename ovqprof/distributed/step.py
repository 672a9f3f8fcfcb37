"""One decode step of a softmax-attention layer on one rank, its KV cache sharded over the group.

Every rank holds the same weights (seeded build) and the same token x_t, so the projections are
replicated; only the attention core is distributed. The cache holds T + 1 keys after the step (context T
plus the new token), split by `shards.shard_lengths`; the rank owning position T writes the new k, v into
its last slot, in place, so replaying a step with the same cache gives the same result (the decode contract
the timing relies on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ovqprof.distributed.allgather import allgather_decode
from ovqprof.distributed.comm import CountingComm
from ovqprof.distributed.ring import ring_decode
from ovqprof.distributed.shards import random_shard, shard_lengths, shard_starts
from ovqprof.distributed.tree import tree_decode

STRATEGIES = {"tree": tree_decode, "ring": ring_decode, "allgather": allgather_decode}


@dataclass
class ShardedCache:
    """This rank's kv[2, B, G, n_r, dh] of a cache of `keys` positions split as `lengths`, and whether it
    owns the newest position (keys - 1)."""

    kv: torch.Tensor
    keys: int
    lengths: list[int]
    owns_newest: bool


def make_cache(seed: int, rank: int, world_size: int, context: int, batch: int, kv_heads: int, head_dim: int,
               dtype: torch.dtype, device: torch.device | str) -> ShardedCache:
    """This rank's shard of a random cache at `context` tokens plus the slot of the next one."""
    keys = context + 1
    lengths = shard_lengths(keys, world_size)
    start = shard_starts(keys, world_size)[rank]
    kv = random_shard(seed, rank, batch, kv_heads, lengths[rank], head_dim, dtype, device)
    return ShardedCache(kv, keys, lengths, start <= keys - 1 < start + lengths[rank])


@torch.no_grad()
def decode_step(layer, x_t: torch.Tensor, cache: ShardedCache, strategy: str, comm: CountingComm) -> torch.Tensor:
    """x_t[B, 1, D] -> y_t[B, 1, D] for a `SoftmaxAttention` layer (its q/k/v/o projections, no window)."""
    q, k, v = layer._project(x_t)  # q[B, H, 1, dh], k, v[B, G, 1, dh]
    if cache.owns_newest:
        cache.kv[0, :, :, -1] = k[:, :, 0]
        cache.kv[1, :, :, -1] = v[:, :, 0]
    o = STRATEGIES[strategy](q[:, :, 0], cache.kv, comm, lengths=cache.lengths)  # [B, H, dh]
    return layer._output(o.unsqueeze(2).to(x_t.dtype))
