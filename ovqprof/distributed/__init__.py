"""Decode across ranks: softmax attention whose KV cache is sharded along the sequence over R ranks of a
torch.distributed process group, three exact ways to attend over it, and the command that measures them.

settings.py   DistributedSettings, the `distributed:` section of a spec (pydantic only, no torch)
shards.py     how T keys split over R ranks, and each rank's random KV shard from a seed
partial.py    the local log-sum-exp partial of a query over a KV block, and the associative merge of partials
comm.py       CountingComm: the collectives and point-to-point sends, counting the bytes each rank sends
tree.py       strategy `tree`: all-reduce of the max, then of the rescaled numerator and denominator
ring.py       strategy `ring`: KV blocks rotate around the ring (batch_isend_irecv), online softmax
allgather.py  strategy `allgather`: gather the whole cache, then one local SDPA
cost.py       bytes sent per rank and KV-shard bytes by formula (what the counted figures are checked against)
step.py       one decode step of a softmax layer on a rank: projections, the strategy, output projection
rank.py       a rank's process: join the group, gate each strategy in float64, time steps, report
group.py      the parent's side: spawn R ranks (torch.multiprocessing), hand out cells, kill on failure/timeout
rows.py       the result columns of a distributed row and their short table
command.py    `ovqprof distributed`: plan cells, OVQ's single-device step, resume, rows to a writer
launch.py     the entry point for torchrun (multi-node): every rank measures, rank 0 writes the rows
bench.py      the README benchmark: `python -m ovqprof.distributed.bench`
"""
