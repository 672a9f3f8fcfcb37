"""The correctness gate run before timing: streaming decode must reproduce the full forward.

On a short random prefix (`check_seq` tokens, batch 2) the layer's forward output is compared with prefill
of the first part followed by one `step` per remaining token, using the relative RMS tolerance of the
layer's dtype (`ovqprof.tolerances`). A layer that fails is still timed, but its rows say `check_failed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ovqprof.layers.base import SequenceLayer
from ovqprof.tolerances import rel_rms_error, tolerance_for


@dataclass(frozen=True)
class GateResult:
    """`passed` is None when the layer has no decode path (nothing to compare)."""

    passed: bool | None
    rel_error: float | None
    tolerance: float | None

    @property
    def label(self) -> str:
        if self.passed is None:
            return "n/a"
        return "pass" if self.passed else "fail"

    @property
    def message(self) -> str:
        if self.passed is None:
            return "no decode path: decode-vs-forward check not applicable"
        verdict = "<=" if self.passed else ">"
        return f"decode vs forward rel RMS error {self.rel_error:.2e} {verdict} {self.tolerance:.0e}"


@torch.no_grad()
def check_decode_matches_forward(layer: SequenceLayer, check_seq: int, batch: int = 2,
                                 seed: int = 1234) -> GateResult:
    if not layer.supports_decode:
        return GateResult(None, None, None)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, check_seq, layer.d_model, generator=gen).to(layer.device, layer.dtype)
    full = layer(x)
    # An odd split point so the prefix is not a multiple of any power-of-two chunk size.
    prefix = max(1, check_seq // 2 - 1)
    y_prefix, state = layer.prefill(x[:, :prefix], capacity=check_seq)
    outputs = [y_prefix]
    for t in range(prefix, check_seq):
        y_t, state = layer.step(x[:, t : t + 1], state)
        outputs.append(y_t)
    streamed = torch.cat(outputs, dim=1)
    err = rel_rms_error(streamed, full)
    tol = tolerance_for(layer.dtype)
    return GateResult(err <= tol, err, tol)
