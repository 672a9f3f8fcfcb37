"""The one interface every profiled layer implements.

A layer maps hidden states x[B, T, D] to y[B, T, D] and knows its own cost: how many bytes its decode
state holds and how many FLOPs and bytes each measured mode moves. A layer never times or prints.

Decode contract (what the sweep's decode timing relies on):
- `prefill(x, capacity)` runs the prompt and returns (y, state); `capacity` is the context length the state
  must be able to reach without reallocating (default: the prompt length).
- `step(x_t, state)` consumes one token x_t[B, 1, D] and returns (y_t[B, 1, D], new_state). It may write
  into the state's preallocated storage beyond the current length, but never changes what the input state
  already holds, so calling `step` twice with the same state gives the same result (timed decode replays it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ovqprof.rows import MODES  # noqa: F401 (defined once, without torch, for the CLI; re-exported here)


@dataclass(frozen=True)
class Cost:
    """Work of one timed call: `flops` floating-point operations and `bytes` of memory traffic.

    `bytes` is the minimal traffic of the algorithm as implemented (weights, inputs, outputs, state and the
    intermediates a fused implementation must still write), not a cache simulation.
    """

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


class LayerOptions(BaseModel):
    """Type-specific options of a layer; unknown keys are errors. Subclass per layer type."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerConfigError(ValueError):
    """An option that is valid on its own but impossible with these dimensions (e.g. kv_heads not dividing
    heads). `field` names the option so the spec loader can point at its line."""

    def __init__(self, field: str, problem: str, value: object, allowed: str):
        self.field = field
        self.problem = problem
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}: {problem} (got {value!r}); allowed: {allowed}")


def tensor_bytes(obj: Any) -> int:
    """Bytes held by every tensor inside `obj` (tensors, dataclasses, tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


class SequenceLayer(nn.Module):
    """Base class of profiled layers.

    Subclasses set `kind` (the layer family shown in result rows), `Options` (a LayerOptions subclass with
    defaults and descriptions, listed by `ovqprof layers`) and implement forward, prefill, step,
    state_bytes and cost. Constructor: (d_model, heads, head_dim, options).
    """

    kind: ClassVar[str] = "other"
    Options: ClassVar[type[LayerOptions]] = LayerOptions
    supports_decode: ClassVar[bool] = True
    # Whether `step` can be captured in a CUDA graph (static shapes, no host sync).
    supports_cuda_graph: ClassVar[bool] = True

    def __init__(self, d_model: int, heads: int, head_dim: int, options: LayerOptions | None = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("heads", heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise LayerConfigError(name, "must be a positive integer", value, "an integer >= 1")
        self.d_model = d_model
        self.heads = heads
        self.head_dim = head_dim
        self.options = options if options is not None else self.Options()

    # --- the interface -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x[B, T, D] -> y[B, T, D]
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def state_bytes(self, batch: int, seq: int) -> int:
        """Bytes of the decode state after `seq` tokens for `batch` sequences, at the layer's dtype."""
        raise NotImplementedError

    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        """Work of one call in `mode`: fwd (forward over seq tokens), bwd (forward + backward), decode (one
        step at context `seq`)."""
        raise NotImplementedError

    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Associative-memory probe of the layer's core (the capacity analysis, `ovqprof capacity`).

        Writes the pairs (keys[:, :, i], values[:, :, i]) in order i = 0..N-1 through the core's own state
        update with identity projections (no q/k/v/o weights, no convolutions or gates that depend on
        learned weights beyond what the mechanism needs at its defaults), then reads every query against the
        state after the last write, without writing the queries themselves.
        keys[B, H, N, dk], values[B, H, N, dv], queries[B, H, M, dk] -> reads[B, H, M, dv], all in the
        layer's accumulation dtype. Any gap (filler tokens) is part of keys/values, put there by the caller.
        Raises NotImplementedError (with a one-line reason) for layers whose core has no separable write
        and read path; the capacity command reports those as `skipped`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no associative-memory probe")

    def implementation(self) -> str:
        """Which implementation runs on the layer's current device, e.g. `torch-sdpa` or `triton`."""
        return "torch"

    # --- helpers shared by subclasses ----------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())
