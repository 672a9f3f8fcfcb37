"""The `distributed:` section of a spec and the flags of `ovqprof distributed` (pydantic only, no torch, so
the spec loader validates it without importing torch.distributed).

    distributed:
      layer: mha                  # a softmax_attention layer of `layers` (default: the first); no window
      ovq: ovq                    # an ovq layer whose single-device step is the comparison (default: the
                                  # first ovq layer; none when the spec has none)
      world_sizes: [1, 2, 4]
      strategies: [tree, ring, allgather]
      backend: auto               # auto: nccl when every rank has a GPU, else gloo
      seq: 1k..16k                # decode contexts T
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from typing_extensions import Self

from ovqprof.ranges import SEQ_RANGE_FORMS, RangeError, parse_seq_value

STRATEGY_NAMES: tuple[str, ...] = ("tree", "ring", "allgather")
BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")
DEFAULT_SEQ = "1k..16k"


def _distinct(values: tuple, what: str) -> tuple:
    duplicate = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if duplicate is not None:
        raise ValueError(f"duplicate {what} {duplicate!r}")
    return values


class DistributedSettings(BaseModel):
    """What `ovqprof distributed` measures; field descriptions double as the "Allowed:" text of errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: str | None = Field(None, description="the name of a softmax_attention layer of the spec (no window)")
    ovq: str | None = Field(None, description="the name of an ovq layer of the spec")
    world_sizes: tuple[StrictInt, ...] = Field((1, 2), min_length=1,
                                               description="a non-empty list of distinct integers >= 1")
    strategies: tuple[Literal["tree", "ring", "allgather"], ...] = Field(
        STRATEGY_NAMES, min_length=1, description="a non-empty list of distinct names from tree, ring, allgather")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto, gloo or nccl")
    seq: tuple[StrictInt, ...] = Field(default_factory=lambda: tuple(parse_seq_value(DEFAULT_SEQ)),
                                       description=SEQ_RANGE_FORMS)
    batch: StrictInt = Field(1, ge=1, description="an integer >= 1")
    warmup_ms: float = Field(25.0, gt=0, allow_inf_nan=False, description="a number > 0")
    rep_ms: float = Field(200.0, gt=0, allow_inf_nan=False, description="a number > 0")
    min_reps: StrictInt = Field(5, ge=1, le=1000, description="an integer in 1..1000 (timed steps at least)")
    max_reps: StrictInt = Field(100, ge=1, le=10000, description="an integer in 1..10000 (timed steps at most)")
    check_seq: StrictInt = Field(61, ge=1, description="an integer >= 1 (context of the float64 gate)")
    seed: StrictInt = Field(0, description="an integer (seed of the KV cache and the token)")
    collective_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False,
                                        description="a number > 0 (seconds a collective may wait)")
    cell_timeout_s: float = Field(600.0, gt=0, allow_inf_nan=False,
                                  description="a number > 0 (seconds before a cell's ranks are killed)")

    @field_validator("seq", mode="before")
    @classmethod
    def _parse_seq(cls, value: Any) -> Any:
        if isinstance(value, tuple):
            value = list(value)
        try:
            return tuple(parse_seq_value(value))
        except RangeError as exc:
            raise ValueError(f"invalid sequence range: {exc.reason}") from None

    @field_validator("world_sizes", mode="before")
    @classmethod
    def _one_size(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("strategies", mode="before")
    @classmethod
    def _split_strategies(cls, value: Any) -> Any:
        return [s.strip() for s in value.split(",")] if isinstance(value, str) else value

    @field_validator("world_sizes")
    @classmethod
    def _positive_distinct(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if any(v < 1 for v in values):
            raise ValueError("world sizes must be >= 1")
        return _distinct(values, "world size")

    @field_validator("strategies")
    @classmethod
    def _distinct_strategies(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _distinct(values, "strategy")

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied and validated (pydantic ValidationError on bad values)."""
        return type(self).model_validate({**{k: getattr(self, k) for k in type(self).model_fields}, **changes})
