"""Measured device peaks that the `% of roofline` column divides by: matmul FLOP/s and copy bytes/s.

Measured once per run and dtype, on the run's device: a large square matmul and a device-to-device copy.
On GPU bf16 matmul is the headline compute peak; each dtype is measured on its own so an fp32 row is
compared with fp32 throughput.
"""

from __future__ import annotations

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

    def as_dict(self) -> dict:
        return asdict(self)


def measure_peaks(device: torch.device, dtype: torch.dtype) -> Peaks:
    gpu = device.type == "cuda"
    n = 8192 if gpu else 1024
    copy_elems = (1 << 30 if gpu else 1 << 26) // 4  # 1 GiB on GPU, 64 MiB on CPU, in float32 elements
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.randn(copy_elems, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    if gpu:
        mm = time_gpu(lambda: torch.matmul(a, b), warmup_ms=25, rep_ms=200)
        cp = time_gpu(lambda: dst.copy_(src), warmup_ms=25, rep_ms=200)
    else:
        mm = time_cpu(lambda: torch.matmul(a, b), warmup_ms=20, rep_ms=200, min_reps=3)
        cp = time_cpu(lambda: dst.copy_(src), warmup_ms=20, rep_ms=200, min_reps=3)
    copy_bytes = 2 * src.numel() * src.element_size()  # read + write
    return Peaks(
        dtype=str(dtype).removeprefix("torch."),
        matmul_flops_per_s=2 * n**3 / (mm.median_ms * 1e-3),
        copy_bytes_per_s=copy_bytes / (cp.median_ms * 1e-3),
        matmul_size=n,
        copy_bytes=copy_bytes,
    )
