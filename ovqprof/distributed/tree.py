"""Strategy `tree`: each rank reduces its own shard to a partial, and three numbers per head cross the
network instead of the cache (Tree Attention, Algorithm 3).

One all-reduce(max) of m gives the global max; each rank rescales its l and num to it; one all-reduce(sum)
of [num | l] packed together (a single message, not two) gives the exact numerator and denominator on
every rank. Sent per rank: 2 (R-1)/R (B H + B H (dh + 1)) elements, independent of T.
"""

from __future__ import annotations

import torch

from ovqprof.distributed.comm import CountingComm
from ovqprof.distributed.partial import local_partial


def tree_decode(q: torch.Tensor, kv_shard: torch.Tensor, comm: CountingComm, **_: object) -> torch.Tensor:
    """q[B, H, dh] (the same on every rank), this rank's kv_shard[2, B, G, n, dh] -> o[B, H, dh]."""
    part = local_partial(q, kv_shard)
    m = comm.all_reduce(part.m.clone(), op="max")
    scale = torch.exp(part.m - m)  # 0 for an empty shard (m_local = -inf)
    packed = torch.cat([part.num * scale.unsqueeze(-1), (part.l * scale).unsqueeze(-1)], dim=-1)
    comm.all_reduce(packed)
    return packed[..., :-1] / packed[..., -1:]
