"""Strategy `ring`: the query visits every shard by rotating the KV blocks around the ring.

R - 1 times, every rank sends the block it holds to the next rank and receives one from the previous
(batch_isend_irecv) while it folds the block it holds into an online-softmax partial; after the last
receive it folds that block too. Each rank ends with the exact output. Block sizes are known from T and R
(`shards.shard_lengths`), so uneven shards travel unpadded. Sent per rank: every block but the next rank's,
2 B G dh (T - n_{r+1}) elements.
"""

from __future__ import annotations

import torch

from ovqprof.distributed.comm import CountingComm
from ovqprof.distributed.partial import empty_partial, finish, local_partial, merge


def ring_decode(q: torch.Tensor, kv_shard: torch.Tensor, comm: CountingComm, lengths: list[int],
                **_: object) -> torch.Tensor:
    """q[B, H, dh], this rank's kv_shard[2, B, G, n, dh], `lengths` the keys of every rank -> o[B, H, dh]."""
    R, r = comm.world_size, comm.rank
    acc = empty_partial(q)
    block = kv_shard
    for step in range(R - 1):
        incoming = (r - step - 1) % R  # the rank whose block arrives in this step
        shape = list(kv_shard.shape)
        shape[3] = lengths[incoming]
        recv = kv_shard.new_empty(shape)
        requests = comm.start_shift(block, recv)
        acc = merge(acc, local_partial(q, block))  # overlaps the transfer
        for request in requests:
            request.wait()
        block = recv
    return finish(merge(acc, local_partial(q, block)))
