"""Tiny user layers for import-path tests (`custom_layers:TinyMixer`); tests put this folder on sys.path."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ovqprof.layers.base import Cost, LayerConfigError, LayerOptions, SequenceLayer


class TinyMixer(SequenceLayer):
    """A per-head linear mixer with a causal running mean: enough of a SequenceLayer to load and build."""

    kind = "test"

    class Options(LayerOptions):
        groups: int = Field(1, ge=1, description="head groups; must divide heads")
        scale: float = Field(1.0, gt=0, description="output scale")

    def __init__(self, d_model: int, heads: int, head_dim: int, options: LayerOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        if heads % self.options.groups:
            raise LayerConfigError("groups", f"must divide heads ({heads})", self.options.groups,
                                   f"a divisor of {heads}")
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
        return self.options.scale * y.cumsum(dim=1) / steps

    def prefill(self, x: torch.Tensor, capacity: int | None = None):
        y = self.proj(x)
        return self.forward(x), (y.sum(dim=1, keepdim=True), x.shape[1])

    def step(self, x_t: torch.Tensor, state):
        total, count = state
        total = total + self.proj(x_t)
        return self.options.scale * total / (count + 1), (total, count + 1)

    def state_bytes(self, batch: int, seq: int) -> int:
        return batch * self.d_model * self.element_size

    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        tokens = 1 if mode == "decode" else seq
        flops = 2.0 * batch * tokens * self.d_model**2 * (3 if mode == "bwd" else 1)
        return Cost(flops, float(self.weight_bytes() + 2 * batch * tokens * self.d_model * self.element_size))


class PlainMixer(nn.Module):
    """A plain nn.Module taking d_model and one keyword option: loaded through the ModuleAdapter."""

    def __init__(self, d_model: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class BrokenLayer(nn.Module):
    """A module whose constructor always fails, as user code sometimes does."""

    def __init__(self, d_model: int):
        super().__init__()
        raise RuntimeError("broken on purpose")


class NotAModule:
    """Not an nn.Module: import paths to it are rejected."""
