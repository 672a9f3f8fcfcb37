"""The collectives the strategies use, counting the bytes each rank sends.

Counts follow the bandwidth-optimal (ring) algorithm of each collective, from the tensors' sizes, so they
do not depend on which algorithm a backend picks for a message size (gloo and NCCL switch between ring,
tree and halving-doubling): with R ranks and a tensor of N bytes,
- all_reduce: 2 (R-1)/R N per rank (reduce-scatter then all-gather, each (R-1)/R N);
- all_gather of N bytes per rank: (R-1) N per rank (each block travels R-1 hops);
- a point-to-point send of N bytes: N.
With R = 1 nothing is sent and no collective is called.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


class CountingComm:
    """torch.distributed calls of one rank, with `bytes_sent` accumulated since the last `reset()`.

    `before_comm` (tests only) runs before every communication call: a fault injected there is a rank that
    raises, dies or hangs mid-step.
    """

    def __init__(self, rank: int, world_size: int, before_comm: Callable[[], None] | None = None):
        self.rank, self.world_size = rank, world_size
        self.bytes_sent = 0.0
        self.calls = 0
        self.before_comm = before_comm

    def reset(self) -> None:
        self.bytes_sent, self.calls = 0.0, 0

    def _enter(self) -> None:
        self.calls += 1
        if self.before_comm is not None:
            self.before_comm()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place: the elementwise sum (or max) of `t` over all ranks."""
        if self.world_size == 1:
            return t
        self._enter()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        self.bytes_sent += 2 * (self.world_size - 1) / self.world_size * t.nbytes
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (all the same shape), in rank order."""
        if self.world_size == 1:
            return [t]
        self._enter()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        self.bytes_sent += (self.world_size - 1) * t.nbytes
        return out

    def start_shift(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        """Start sending `send` to the next rank and receiving `recv` from the previous one (a ring step);
        returns the requests to `wait()` on."""
        self._enter()
        nxt, prev = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        ops = [dist.P2POp(dist.isend, send.contiguous(), nxt), dist.P2POp(dist.irecv, recv, prev)]
        self.bytes_sent += send.nbytes
        return dist.batch_isend_irecv(ops)
