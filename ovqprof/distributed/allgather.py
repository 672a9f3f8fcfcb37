"""Strategy `allgather`: gather every rank's shard, then one local attention over the whole cache.

all_gather needs equal sizes, so shards are padded to the longest (ceil(T/R) keys) and trimmed after the
gather. Sent per rank: (R-1) 2 B G dh ceil(T/R) elements; every rank holds the whole cache afterwards (the
gathered blocks and their concatenation, about twice the cache at the peak).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovqprof.distributed.comm import CountingComm
from ovqprof.distributed.partial import reference_attention


def allgather_decode(q: torch.Tensor, kv_shard: torch.Tensor, comm: CountingComm, lengths: list[int],
                     **_: object) -> torch.Tensor:
    """q[B, H, dh], this rank's kv_shard[2, B, G, n, dh], `lengths` the keys of every rank -> o[B, H, dh]."""
    longest = max(lengths)
    padded = F.pad(kv_shard, (0, 0, 0, longest - kv_shard.shape[3]))
    blocks = comm.all_gather(padded)
    kv = torch.cat([b[:, :, :, :n] for b, n in zip(blocks, lengths, strict=True)], dim=3)
    return reference_attention(q, kv)
