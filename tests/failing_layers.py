"""Test-only layers that fail on purpose, loaded by import path `failing_layers:ToyLayer`.

ToyLayer is a causal running mean of a linear projection (decode is exact), which can be told to fail at
sequence lengths >= `fail_at_seq` in a chosen way, so tests can provoke each failure row deliberately.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ovqprof.layers.base import Cost, LayerOptions, SequenceLayer


class ToyOptions(LayerOptions):
    fail: Literal["none", "oom", "error", "segfault", "hang", "wrong_decode"] = "none"
    fail_at_seq: int = Field(0, ge=0)


@dataclass
class ToyState:
    total: torch.Tensor  # [B, D] running sum of projected inputs
    count: int


class ToyLayer(SequenceLayer):
    """Causal running mean of a linear projection; fails on purpose when told to."""

    kind = "toy"
    Options = ToyOptions

    def __init__(self, d_model, heads, head_dim, options=None):
        super().__init__(d_model, heads, head_dim, options)
        self.proj = torch.nn.Linear(d_model, d_model, bias=False)

    def _maybe_fail(self, seq: int) -> None:
        how = self.options.fail
        if how == "none" or seq < self.options.fail_at_seq:
            return
        if how == "oom":
            raise torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 64.00 GiB")
        if how == "error":
            raise ValueError(f"deliberate failure at seq {seq}")
        if how == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if how == "hang":
            time.sleep(3600)

    def forward(self, x):
        self._maybe_fail(x.shape[1])
        h = self.proj(x)
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
        return h.cumsum(dim=1) / counts

    def prefill(self, x, capacity=None):
        y = self.forward(x)
        return y, ToyState(self.proj(x).sum(dim=1), x.shape[1])

    def step(self, x_t, state):
        total = state.total + self.proj(x_t[:, 0])
        y = total / (state.count + 1)
        if self.options.fail == "wrong_decode":
            y = y * 1.5
        return y[:, None], ToyState(total, state.count + 1)

    def state_bytes(self, batch, seq):
        return batch * self.d_model * self.element_size

    def cost(self, mode, batch, seq):
        tokens = batch * (1 if mode == "decode" else seq)
        fwd = Cost(2.0 * tokens * self.d_model**2, float(self.weight_bytes() + 2 * tokens * self.d_model * 4))
        return Cost(3 * fwd.flops, 3 * fwd.bytes) if mode == "bwd" else fwd


class PlainModule(torch.nn.Module):
    """A user module with only forward: fwd/bwd run, decode is skipped."""

    def __init__(self, d_model: int, scale: float = 1.0):
        super().__init__()
        self.lin = torch.nn.Linear(d_model, d_model)
        self.scale = scale

    def forward(self, x):
        return self.lin(x) * self.scale
