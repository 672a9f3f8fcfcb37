"""A gloo rank for tests: join a group, run every strategy on given shards, report outputs and byte counts.

Lives in its own module so spawned ranks can import it (a spawned child unpickles the target by name).
"""

from __future__ import annotations

import datetime as dt

import torch
import torch.distributed as dist


def strategy_rank(rank: int, world_size: int, init: str, cases: list[dict], out) -> None:
    """For each case {strategy, keys, batch, heads, kv_heads, head_dim, seed}: this rank's output and the
    bytes it counted, put on `out` as (rank, index, o, bytes_sent, calls)."""
    from ovqprof.distributed.comm import CountingComm
    from ovqprof.distributed.shards import random_shard, shard_lengths
    from ovqprof.distributed.step import STRATEGIES

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size,
                            timeout=dt.timedelta(seconds=60))
    try:
        for i, c in enumerate(cases):
            lengths = shard_lengths(c["keys"], world_size)
            shard = random_shard(c["seed"], rank, c["batch"], c["kv_heads"], lengths[rank], c["head_dim"],
                                 torch.float64)
            q = torch.randn(c["batch"], c["heads"], c["head_dim"], dtype=torch.float64,
                            generator=torch.Generator().manual_seed(c["seed"] + 7))
            comm = CountingComm(rank, world_size)
            o = STRATEGIES[c["strategy"]](q, shard, comm, lengths=lengths)
            out.put((rank, i, o.numpy(), comm.bytes_sent, comm.calls))  # by value: the rank may exit first
    finally:
        dist.destroy_process_group()
