"""A rank's side: join the process group, then measure the cells it is handed.

`measure_on_rank` is shared by the spawned ranks of a one-machine run (`rank_process`, fed through a pipe)
and by torchrun's ranks (`launch.py`). Every rank runs the same number of steps in the same order, because
a collective returns only when every rank has entered it: warm-up and repetition counts are agreed with an
all-reduce of the first step's time, never taken from a rank's own clock budget.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ovqprof.distributed.comm import CountingComm
from ovqprof.distributed.partial import reference_attention
from ovqprof.distributed.shards import random_shard, shard_lengths
from ovqprof.distributed.step import STRATEGIES, decode_step, make_cache
from ovqprof.measure.memory import proc_status_kib
from ovqprof.measure.timing import _quantile
from ovqprof.spec import LayerSpec, torch_dtype


@dataclass(frozen=True)
class RankJob:
    """One cell for every rank: `strategy` over a cache at context `seq`. `fault` (tests only):
    (rank, "raise" | "exit" | "hang"), done by that rank at its first communication of the timed step."""

    layer: LayerSpec
    strategy: str
    seq: int
    batch: int
    seed: int = 0
    warmup_ms: float = 25.0
    rep_ms: float = 200.0
    min_reps: int = 5
    max_reps: int = 100
    check_seq: int = 61
    fault: tuple[int, str] | None = None


def join_group(rank: int, world_size: int, backend: str, init_method: str | None, timeout_s: float,
               device: str) -> None:
    """init_process_group with collective timeout `timeout_s` (a rank that dies or hangs makes the others'
    collectives fail after it, never wait forever); `init_method` None reads torchrun's env://."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    kwargs = {"init_method": init_method} if init_method else {}
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=dt.timedelta(seconds=timeout_s), **kwargs)


def _fault_hook(job: RankJob, rank: int):
    if job.fault is None or job.fault[0] != rank:
        return None
    kind = job.fault[1]

    def fire() -> None:
        if kind == "exit":
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a crashed driver would
        if kind == "hang":
            time.sleep(10**6)
        raise RuntimeError(f"fault injected on rank {rank}")

    return fire


def gate(strategy: str, layer: LayerSpec, job: RankJob, rank: int, world_size: int, device: str) -> float:
    """The strategy's relative error against single-device SDPA in float64 at context check_seq (keys
    check_seq + 1, uneven shards whenever R does not divide them); the same on every rank (all-reduced max)."""
    heads, dh = layer.heads, layer.head_dim
    kv_heads = layer.options.get("kv_heads") or heads
    keys = job.check_seq + 1
    lengths = shard_lengths(keys, world_size)
    shards = [random_shard(job.seed + 1, r, job.batch, kv_heads, n, dh, torch.float64, device)
              for r, n in enumerate(lengths)]  # small: every rank draws all, to know the answer
    gen = torch.Generator().manual_seed(job.seed + 2)
    q = torch.randn(job.batch, heads, dh, generator=gen, dtype=torch.float64).to(device)
    comm = CountingComm(rank, world_size)
    out = STRATEGIES[strategy](q, shards[rank], comm, lengths=lengths)
    ref = reference_attention(q, torch.cat(shards, dim=3))
    err = torch.tensor([float((out - ref).norm() / ref.norm())], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return float(err.item())


def _agreed_max(value: float, world_size: int, device: str) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _PeakMemory:
    """Peak memory of this rank above its level at start: RSS high-water mark on CPU (reset through
    /proc/self/clear_refs), torch's allocator on a GPU."""

    def __init__(self, device: str):
        self.device = device
        self.source = "torch" if device.startswith("cuda") else "rss"
        if self.source == "torch":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.base = proc_status_kib("VmRSS") * 1024
            except (OSError, TypeError):
                self.base = None

    def peak(self) -> int | None:
        if self.source == "torch":
            return int(torch.cuda.max_memory_allocated() - self.base)
        hwm = proc_status_kib("VmHWM")
        return None if self.base is None or hwm is None else max(0, hwm * 1024 - self.base)


def measure_on_rank(job: RankJob, layer_module, rank: int, world_size: int, device: str,
                    gates: dict[str, float]) -> dict:
    """Gate the strategy (once per group), then time decode steps at context job.seq; this rank's figures.
    `layer_module`: the built SoftmaxAttention (same weights on every rank)."""
    gate_key = f"{job.layer.model_dump_json()}|{job.strategy}|{job.check_seq}|{job.batch}"
    if gate_key not in gates:
        gates[gate_key] = gate(job.strategy, job.layer, job, rank, world_size, device)
    spec, dtype = job.layer, torch_dtype(job.layer.dtype)
    memory = _PeakMemory(device)
    cache = make_cache(job.seed, rank, world_size, job.seq, job.batch, layer_module.kv_heads, spec.head_dim,
                       dtype, device)
    gen = torch.Generator().manual_seed(job.seed + 3)
    x_t = torch.randn(job.batch, 1, spec.d_model, generator=gen).to(device=device, dtype=dtype)
    comm = CountingComm(rank, world_size, _fault_hook(job, rank))

    def step() -> float:
        if world_size > 1:
            dist.barrier()  # every rank starts the step together: the slowest rank's time is the step's
        _sync(device)
        comm.reset()
        start = time.perf_counter()
        decode_step(layer_module, x_t, cache, job.strategy, comm)
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    first = _agreed_max(step(), world_size, device)
    comm.before_comm = None  # a fault fires once, in the first step
    warm = max(0, min(50, int(job.warmup_ms / max(first, 1e-3)) - 1))
    for _ in range(warm):
        step()
    step_ms = _agreed_max(step(), world_size, device)
    reps = max(job.min_reps, min(job.max_reps, int(job.rep_ms / max(step_ms, 1e-3))))
    samples = [step() for _ in range(reps)]
    return {"rank": rank, "ms_median": statistics.median(samples), "ms_p20": _quantile(samples, 0.2),
            "ms_p80": _quantile(samples, 0.8), "reps": reps, "bytes_sent": comm.bytes_sent,
            "kv_shard_bytes": int(cache.kv.nbytes), "mem_peak_bytes": memory.peak(), "mem_source": memory.source,
            "gate_error": gates[gate_key], "device": device}


def rank_process(rank: int, world_size: int, backend: str, init_method: str, timeout_s: float, device: str,
                 threads: int, conn) -> None:
    """A spawned rank: join the group, then answer each RankJob from `conn` with its figures (or an
    {"error": ...} dict) until it receives None. Ignores SIGINT: the parent decides what Ctrl-C means."""
    from ovqprof.cell import build_cell_layer, classify_failure, failure_note

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    join_group(rank, world_size, backend, init_method, timeout_s, device)
    layers: dict[str, object] = {}
    gates: dict[str, float] = {}
    try:
        while True:
            job = conn.recv()
            if job is None:
                break
            try:
                key = job.layer.model_dump_json()
                if key not in layers:
                    layers[key] = build_cell_layer(job.layer, torch.device(device))
                conn.send(measure_on_rank(job, layers[key], rank, world_size, device, gates))
            except Exception as exc:  # noqa: BLE001 - the parent turns it into the cell's row
                conn.send({"rank": rank, "error": failure_note(exc), "status": classify_failure(exc)})
    finally:
        dist.destroy_process_group()
