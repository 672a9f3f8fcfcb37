"""The one place that owns numerical tolerances: relative RMS error with thresholds by dtype.

Used by the sweep's correctness gate and by the tests. A non-finite value anywhere is an infinite error,
so NaN or inf can never pass.
"""

from __future__ import annotations

import math

import torch

# Relative RMS error allowed between two computations of the same result (e.g. decode vs forward).
REL_RMS_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / ||expected||_2 in float64; inf on shape mismatch or non-finite values."""
    if actual.shape != expected.shape:
        return math.inf
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return math.inf
    denom = e.norm().item()
    diff = (a - e).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def tolerance_for(dtype: torch.dtype) -> float:
    return REL_RMS_TOLERANCE[dtype]


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                     factor: float = 1.0) -> None:
    """Raise AssertionError when the relative RMS error exceeds `factor` times the dtype's tolerance."""
    dtype = dtype or expected.dtype
    err = rel_rms_error(actual, expected)
    limit = tolerance_for(dtype) * factor
    if not err <= limit:
        raise AssertionError(f"relative RMS error {err:.3e} exceeds {limit:.1e} for {dtype}")
