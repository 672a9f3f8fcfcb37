"""OVQ-attention hyper-parameters and the dictionary growth schedule (shared by the reference and kernels).

The number of active slots depends only on how many tokens have been written, never on the data, so it is
one Python integer for every batch element and head: kernels and the reference can slice the dictionary to
its active part instead of masking. The algorithm is described in the README's "How OVQ-attention works here";
the write-rule options (`assign`, `init: spread_topm`, `count_bias`, `value_update`) select between this
project's variant (the defaults) and the public implementation's (recursal/KVM-paper, `model/ovq_mixer.py`).

Each option is declared once, here: its type, default, one-line description and numeric bounds. The layer's
options model (`ovqprof.layers.ovq.OVQOptions`, what specs and `ovqprof layers` see) is generated from
`option_specs()`, so the two cannot drift.
"""

from __future__ import annotations

import math
import operator
import typing
from dataclasses import dataclass, field, fields
from typing import Literal

Growth = Literal["saturating", "dp", "linear", "full"]
Init = Literal["spread", "random", "spread_topm"]
LearningRate = Literal["adaptive", "constant"]
Assign = Literal["with_spawned", "chunk_start"]
ValueUpdate = Literal["mean", "delta"]


def _option(default: object, description: str, **bounds: float) -> typing.Any:
    """A dataclass field carrying its `ovqprof layers` description and its numeric bounds, in pydantic's
    names (ge: >=, gt: >, le: <=), which OVQConfig checks and the options model enforces."""
    return field(default=default, metadata={"description": description, "bounds": bounds})


@dataclass(frozen=True)
class OVQConfig:
    """Everything except beta (a per-head tensor, possibly learned) that fixes the algorithm.

    Defaults, bounds and one-line descriptions are the fields' own; what a line cannot say:
    growth: target active count g(t) after t written tokens (capped at N):
        saturating N t / (N + t); dp alpha ln(1 + t / alpha); linear rate t; full t.
    init: how spawned slots pick their keys from the chunk (spread: k-means++ style farthest-first; random:
        uniform, seeded per chunk; spread_topm: one shot, the m keys least similar to the chunk-start
        dictionary, or with an empty dictionary the first key and the m - 1 keys least similar to it, slots in
        increasing order of that similarity, ties to the lower position).
    assign: which slots a non-spawning token may join: with_spawned (every active slot, those just spawned
        included) or chunk_start (only those active at the chunk start; all join slot 0 if there were none).
    count_bias: add log c[i] to the read's dictionary logits (else beta q.D_k alone; counts only set the step).
    value_update: mean (values are running means, like keys) or delta (slot i's value moves by the sum of the
        residuals r_j = v_j - R(k_j) of its tokens over c'_i, R a read of the chunk-start dictionary alone).
    normalize_centroids: score with D_k = Mk / |Mk| (else Mk).
    grad_through_state: False detaches the dictionary at every chunk boundary.
    """

    dict_size: int = _option(1024, "N: key/value centroid slots per head", ge=1)
    chunk_size: int = _option(64, "L: tokens per chunk; the dictionary is written every L tokens", ge=1)
    growth: Growth = _option(
        "saturating", "active-slot schedule g(t): saturating N t/(N+t), dp alpha ln(1+t/alpha), linear rate t, "
                      "full t (capped at N)")
    alpha: float = _option(128.0, "concentration of the dp schedule", gt=0)
    # At most 1: a chunk cannot spawn more slots than it has tokens.
    rate: float = _option(0.125, "slots per token of the linear schedule", gt=0, le=1)
    init: Init = _option(
        "spread", "new slots' keys: spread (farthest-first from the chunk), random (seeded) or spread_topm (one "
                  "shot: the m keys least similar to the chunk-start dictionary)")
    seed: int = _option(0, "seed of init: random")
    assign: Assign = _option(
        "with_spawned", "slots a non-spawning token may join: with_spawned (all active, just spawned included) or "
                        "chunk_start (those active at the chunk start; slot 0 if none)")
    count_bias: bool = _option(True, "add log count to the read's dictionary logits (else counts only set the "
                                     "learning rate)")
    value_update: ValueUpdate = _option(
        "mean", "value centroids: mean (running mean) or delta (move by the residual v - R(k) of a dictionary-only "
                "read; PyTorch reference on every device)")
    lr: LearningRate = _option(
        "adaptive", "centroid update: adaptive (running mean, step 1/count) or constant (step eta)")
    eta: float = _option(0.1, "step of lr: constant", gt=0, le=1)
    normalize_centroids: bool = _option(True, "score with normalised key centroids Mk/|Mk|")
    grad_through_state: bool = _option(True, "backpropagate through the dictionary across chunks")

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _out_of_bounds(getattr(self, f.name), f.metadata["bounds"])
            if problem:
                raise ValueError(f"{f.name} must be {problem}, got {getattr(self, f.name)!r}")
        if self.value_update == "delta" and self.lr != "adaptive":
            # The delta rule's step is 1/c' (the public implementation's); a constant step is not defined for it.
            raise ValueError("value_update: delta needs lr: adaptive (its step is 1/count)")


_BOUND_TESTS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le}
_BOUND_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<="}


def _out_of_bounds(value: float, bounds: dict[str, float]) -> str | None:
    """None if `value` meets every bound, else the allowed range as text: `>= 1`, `> 0` or `in (0, 1]`."""
    if all(_BOUND_TESTS[kind](value, limit) for kind, limit in bounds.items()):
        return None
    low = next((kind for kind in ("ge", "gt") if kind in bounds), None)
    if low and "le" in bounds:
        return f"in {'[' if low == 'ge' else '('}{bounds[low]:g}, {bounds['le']:g}]"
    return " and ".join(f"{_BOUND_SYMBOLS[kind]} {limit:g}" for kind, limit in bounds.items())


@dataclass(frozen=True)
class OptionSpec:
    """One OVQConfig field as an options model exposes it: name, annotation (a type or Literal), default,
    one-line description and numeric bounds in pydantic's names (ge, gt, le)."""

    name: str
    annotation: object
    default: object
    description: str
    bounds: dict[str, float]


def option_specs() -> tuple[OptionSpec, ...]:
    """Every OVQConfig option, in declaration order (what `ovqprof.layers.ovq.OVQOptions` is built from)."""
    hints = typing.get_type_hints(OVQConfig)
    return tuple(OptionSpec(f.name, hints[f.name], f.default, f.metadata["description"], dict(f.metadata["bounds"]))
                 for f in fields(OVQConfig))


def growth_target(cfg: OVQConfig, tokens: int) -> float:
    """g(t): the schedule's (real-valued) target number of active slots after `tokens` written tokens."""
    t = float(tokens)
    if cfg.growth == "saturating":
        return cfg.dict_size * t / (cfg.dict_size + t)
    if cfg.growth == "dp":
        return cfg.alpha * math.log1p(t / cfg.alpha)
    if cfg.growth == "linear":
        return cfg.rate * t
    if cfg.growth == "full":
        return t
    raise ValueError(f"unknown growth {cfg.growth!r}; allowed: saturating, dp, linear, full")


def active_after(cfg: OVQConfig, tokens: int) -> int:
    """Active slots once `tokens` tokens (a multiple of chunk_size, or any count: partial chunks are not
    written) have been written: min(N, floor(g)), at least 1 after the first chunk, and never more than the
    tokens written (each slot is spawned from one token)."""
    written = (tokens // cfg.chunk_size) * cfg.chunk_size
    if written == 0:
        return 0
    # The small epsilon keeps floor() from losing a slot to rounding (e.g. rate * t = 7.999999).
    target = math.floor(growth_target(cfg, written) + 1e-9)
    return max(1, min(cfg.dict_size, target, written))


def spawn_count(cfg: OVQConfig, chunk_index: int) -> tuple[int, int]:
    """(n, m) for chunk `chunk_index`: n slots active when it starts, m new slots it spawns. m <= chunk_size
    because every schedule grows by at most one slot per token (g' <= 1)."""
    n = active_after(cfg, chunk_index * cfg.chunk_size)
    n_next = active_after(cfg, (chunk_index + 1) * cfg.chunk_size)
    return n, min(n_next - n, cfg.chunk_size)


def triton_unsupported(cfg: OVQConfig, dk: int, dv: int) -> str | None:
    """None if the Triton kernels handle this configuration, else why not (the layer then runs the reference)."""
    def pow2(x: int) -> bool:
        return x >= 16 and (x & (x - 1)) == 0

    if cfg.lr != "adaptive":
        return "lr: constant runs on the PyTorch reference"
    if cfg.value_update != "mean":
        return "value_update: delta runs on the PyTorch reference"
    if not (pow2(cfg.chunk_size) and pow2(dk) and pow2(dv)):
        return "chunk_size and head_dim must be powers of two >= 16"
    # Every init, assign and count_bias runs in the kernels. They walk a chunk in row blocks of 64, so their
    # tiles do not grow with L; L caps only the per-chunk vectors and scratch (checked compiled up to 256).
    if cfg.chunk_size > 256 or max(dk, dv) > 256:
        return "chunk_size <= 256 and head_dim <= 256"
    return None
