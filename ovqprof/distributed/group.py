"""The parent's side of a one-machine run: R rank processes (torch.multiprocessing, spawn) joined in one
process group, each cell handed to all of them, their figures collected.

A rank that raises, dies or hangs must cost one row, not the sweep: the parent waits on every rank's pipe
and process sentinel with the cell's deadline; the first error report, the first dead rank or the deadline
ends the cell, every rank is killed (the survivors may be blocked in a collective) and the next cell starts a
fresh group. Rendezvous is a file store in a fresh temporary directory: no port to collide with other runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as tmp

from ovqprof.distributed.rank import RankJob, rank_process


class GroupFailure(Exception):
    """The cell failed: `status` error | oom | timeout, `note` says which rank and how."""

    def __init__(self, status: str, note: str):
        super().__init__(note)
        self.status, self.note = status, note


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def resolve_backend(backend: str, world_size: int) -> str:
    """auto: nccl when there is a GPU for every rank, else gloo."""
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


class RankGroup:
    """R spawned ranks in one process group on this machine; `run(job)` returns their figures in rank order."""

    def __init__(self, world_size: int, backend: str, collective_timeout_s: float):
        self.world_size = world_size
        self.backend = resolve_backend(backend, world_size)
        if self.backend == "nccl" and torch.cuda.device_count() < world_size:
            raise GroupFailure("error", f"nccl needs one GPU per rank: {world_size} ranks, "
                                        f"{torch.cuda.device_count()} GPUs visible")
        self.devices = [f"cuda:{r}" if self.backend == "nccl" else "cpu" for r in range(world_size)]
        threads = max(1, (os.cpu_count() or 1) // world_size)  # one core's share per rank, as one GPU each
        self.tmpdir = tempfile.mkdtemp(prefix="ovqprof-dist-")
        init = "file://" + os.path.join(self.tmpdir, "rendezvous")
        ctx = tmp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=rank_process, name=f"ovqprof-rank-{rank}", daemon=True,
                               args=(rank, world_size, self.backend, init, collective_timeout_s,
                                     self.devices[rank], threads, child))
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.alive = True

    def run(self, job: RankJob, timeout_s: float) -> list[dict]:
        """Every rank's figures for `job`; GroupFailure (after killing the group) when a rank fails."""
        if not self.alive:
            raise GroupFailure("error", "the rank group is no longer running")
        try:
            for conn in self.conns:
                conn.send(job)
        except (BrokenPipeError, OSError) as exc:
            self.kill()
            raise GroupFailure("error", f"a rank was gone before the cell started ({exc})") from None
        results: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self.procs)}
        while pending:
            left = deadline - time.monotonic()
            ready = wait([*pending, *sentinels], timeout=max(0.0, left))
            if not ready:
                self.kill()
                slow = ", ".join(str(r) for r in sorted(pending.values()))
                raise GroupFailure("timeout", f"rank(s) {slow} did not finish within {timeout_s:g} s and the "
                                              "group was killed")
            for obj in ready:
                if obj in pending:
                    rank = pending.pop(obj)
                    try:
                        result = obj.recv()
                    except (EOFError, OSError):
                        continue  # the rank died: its sentinel says how
                    if "error" in result:
                        self.kill()
                        raise GroupFailure(result.get("status", "error"), f"rank {rank}: {result['error']}")
                    results[rank] = result
                elif obj in sentinels and sentinels[obj] not in results:
                    rank = sentinels[obj]
                    self.procs[rank].join(1)
                    code = self.procs[rank].exitcode
                    how = f"killed by {_signal_name(code)}" if code is not None and code < 0 else f"exit code {code}"
                    self.kill()
                    raise GroupFailure("error", f"rank {rank} died mid-step ({how}); the group was killed")
        return [results[r] for r in range(self.world_size)]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(5)
        self._cleanup()

    def close(self) -> None:
        """Stop the ranks cleanly (they leave the group), killing any that do not stop in time."""
        if self.alive:
            for conn in self.conns:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
            for proc in self.procs:
                proc.join(10)
        self.kill()

    def _cleanup(self) -> None:
        self.alive = False
        for conn in self.conns:
            conn.close()
        self.conns = []
        shutil.rmtree(self.tmpdir, ignore_errors=True)
