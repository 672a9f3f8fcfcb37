"""Settings of the associative-memory probe: the `capacity.probe` section of a spec and the CLI flags.

Pydantic only (no torch), so the spec loader can validate the section without importing the probe.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from typing_extensions import Self

from ovqprof.ranges import SEQ_RANGE_FORMS, RangeError, parse_seq_value

KEY_KINDS: tuple[str, ...] = ("gaussian", "clustered")
DEFAULT_PAIRS = "16..4k"
PAIRS_FORMS = SEQ_RANGE_FORMS.replace("1k..64k", "16..16k")


class ProbeSettings(BaseModel):
    """What the probe writes and reads; field descriptions double as the "Allowed:" text of errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pairs: tuple[StrictInt, ...] = Field(default_factory=lambda: tuple(parse_seq_value(DEFAULT_PAIRS)),
                                         description=PAIRS_FORMS)
    keys: Literal["gaussian", "clustered"] = Field("gaussian", description="gaussian or clustered")
    gap: StrictInt = Field(0, ge=0, description="an integer >= 0 (filler pairs written after the stored ones)")
    seeds: tuple[StrictInt, ...] = Field((0,), min_length=1, description="a non-empty list of integers")
    dims: StrictInt | None = Field(None, ge=1, description="an integer >= 1 (dk = dv; default each layer's "
                                                          "head_dim)")
    tau: float = Field(0.9, gt=0, le=1, allow_inf_nan=False, description="a number in (0, 1]")
    dtype: Literal["float32", "float64", "float16", "bfloat16"] | None = Field(
        None, description="float32, float64, float16, bfloat16 (default each layer's dtype)")
    block_elements: StrictInt | None = Field(
        None, ge=1, description="an integer >= 1: queries x stored pairs x heads per probe call (memory); "
                                "default 2^24 on CPU, 2^28 on a GPU")

    @field_validator("pairs", mode="before")
    @classmethod
    def _parse_pairs(cls, value: Any) -> Any:
        if isinstance(value, tuple):
            value = list(value)
        try:
            return tuple(parse_seq_value(value))
        except RangeError as exc:
            raise ValueError(f"invalid pairs: {exc.reason}") from None

    @field_validator("seeds", mode="before")
    @classmethod
    def _one_seed(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied and validated (pydantic ValidationError on bad values)."""
        return type(self).model_validate({**{k: getattr(self, k) for k in type(self).model_fields}, **changes})
