"""Measured device peaks that the `% of roofline` column divides by: matmul FLOP/s and copy bytes/s.

Measured once per run and dtype, on the run's device: a large square matmul and a device-to-device copy.
On GPU bf16 matmul is the headline compute peak; each dtype is measured on its own so an fp32 row is
compared with fp32 throughput. Each peak is the median of ROUNDS timed rounds (each a median of several
calls), and its spread, (max - min) / median over the rounds, goes into the header: a shared CPU's peak
moves between runs, and a row measured above the peak by more than that spread is clipped (see cell.py).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from ovqprof.measure.timing import time_cpu, time_gpu


@dataclass(frozen=True)
class Peaks:
    """`matmul_flops_per_s` (FLOP/s) and `copy_bytes_per_s` (bytes read + written per second)."""

    dtype: str
    matmul_flops_per_s: float
    copy_bytes_per_s: float
    matmul_size: int
    copy_bytes: int
    matmul_spread: float = 0.0  # (max - min) / median of the rounds' throughputs
    copy_spread: float = 0.0
    rounds: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


ROUNDS = 3


def _median_and_spread(values: list[float]) -> tuple[float, float]:
    median = statistics.median(values)
    return median, (max(values) - min(values)) / median


def measure_peaks(device: torch.device, dtype: torch.dtype, rounds: int = ROUNDS) -> Peaks:
    gpu = device.type == "cuda"
    n = 8192 if gpu else 1536  # 1536 on CPU: the 1024 matmul ran below what flash attention reaches
    copy_elems = (1 << 30 if gpu else 1 << 26) // 4  # 1 GiB on GPU, 64 MiB on CPU, in float32 elements
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.randn(copy_elems, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * src.element_size()  # read + write
    flops, rates = [], []
    for _ in range(rounds):
        if gpu:
            mm = time_gpu(lambda: torch.matmul(a, b), warmup_ms=10, rep_ms=60)
            cp = time_gpu(lambda: dst.copy_(src), warmup_ms=10, rep_ms=60)
        else:
            mm = time_cpu(lambda: torch.matmul(a, b), warmup_ms=1, rep_ms=1, min_reps=3)
            cp = time_cpu(lambda: dst.copy_(src), warmup_ms=1, rep_ms=1, min_reps=5)
        flops.append(2 * n**3 / (mm.median_ms * 1e-3))
        rates.append(copy_bytes / (cp.median_ms * 1e-3))
    matmul, matmul_spread = _median_and_spread(flops)
    copy, copy_spread = _median_and_spread(rates)
    return Peaks(dtype=str(dtype).removeprefix("torch."), matmul_flops_per_s=matmul, copy_bytes_per_s=copy,
                 matmul_size=n, copy_bytes=copy_bytes, matmul_spread=matmul_spread, copy_spread=copy_spread,
                 rounds=rounds)
