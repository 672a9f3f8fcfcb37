"""Timers: triton's do_bench (and its CUDA-graph variant) on GPU, repeated wall time on CPU.

All times are milliseconds. Every timer warms up before timing (a first call pays for compilation, Triton
autotuning and allocator growth, so it is never timed) and reports the median with the 20th and 80th
percentiles: do_bench's convention, robust to the occasional slow call of a shared machine while still
showing the spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

QUANTILES = [0.5, 0.2, 0.8]


@dataclass(frozen=True)
class Timing:
    """Median, p20 and p80 of one call in milliseconds; `timer` says how it was measured."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str


def time_gpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float,
             grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    """triton.testing.do_bench: L2 flushed before each call, CUDA events; warmup/rep are ms budgets."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=int(max(1, warmup_ms)), rep=int(max(1, rep_ms)),
                             grad_to_none=list(grad_to_none) if grad_to_none else None, quantiles=QUANTILES)
    return Timing(float(med), float(p20), float(p80), "do_bench")


def time_gpu_graph(fn: Callable[[], object], rep_ms: float) -> Timing:
    """triton.testing.do_bench_cudagraph: replays `fn` captured in a CUDA graph, so launch overhead of a
    launch-bound decode step is not what gets measured. `fn` must be capturable."""
    from triton.testing import do_bench_cudagraph

    med, p20, p80 = do_bench_cudagraph(fn, rep=int(max(1, rep_ms)), quantiles=QUANTILES)
    return Timing(float(med), float(p20), float(p80), "do_bench_cudagraph")


def time_cpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float, min_reps: int = 5,
             max_reps: int = 10_000, grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    """Wall time of the synchronous call: at least one warm-up call (more until `warmup_ms` is spent),
    then repeats until `rep_ms` is spent, at least `min_reps` and at most `max_reps` of them. Tensors in
    `grad_to_none` get `.grad = None` before each call, outside the timed region (as do_bench does)."""

    def clear_grads() -> None:
        for t in grad_to_none or ():
            t.grad = None

    deadline = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < deadline:
        clear_grads()
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < min_reps or (time.perf_counter() < deadline and len(samples) < max_reps):
        clear_grads()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), "wall")


def _quantile(samples: list[float], q: float) -> float:
    """Linear-interpolated quantile (the same rule as torch.quantile / numpy's default)."""
    data = sorted(samples)
    pos = q * (len(data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)
