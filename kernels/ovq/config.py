"""OVQ-attention hyper-parameters and the dictionary growth schedule (shared by the reference and kernels).

The number of active slots depends only on how many tokens have been written, never on the data, so it is
one Python integer for every batch element and head: kernels and the reference can slice the dictionary to
its active part instead of masking. The algorithm is described in the README's "How OVQ-attention works here";
the write-rule options (`assign`, `init: spread_topm`, `count_bias`, `value_update`) select between this
project's variant (the defaults) and the public implementation's (recursal/KVM-paper, `model/ovq_mixer.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Growth = Literal["saturating", "dp", "linear", "full"]
Init = Literal["spread", "random", "spread_topm"]
LearningRate = Literal["adaptive", "constant"]
Assign = Literal["with_spawned", "chunk_start"]
ValueUpdate = Literal["mean", "delta"]


@dataclass(frozen=True)
class OVQConfig:
    """Everything except beta (a per-head tensor, possibly learned) that fixes the algorithm.

    dict_size: N, slots per head.          chunk_size: L, tokens written per flush.
    growth: target active count g(t) after t written tokens (capped at N):
        saturating N t / (N + t); dp alpha ln(1 + t / alpha); linear rate t; full t.
    init: how spawned slots pick their keys from the chunk (spread: k-means++ style farthest-first; random:
        uniform, seeded per chunk; spread_topm: one shot, the m keys least similar to the chunk-start
        dictionary, or with an empty dictionary the first key and the m - 1 keys least similar to it, slots in
        increasing order of that similarity, ties to the lower position).          seed: the random init's seed.
    assign: which slots a non-spawning token may join: with_spawned (every active slot, those just spawned
        included) or chunk_start (only those active at the chunk start; all join slot 0 if there were none).
    count_bias: add log c[i] to the read's dictionary logits (else beta q.D_k alone; counts only set the step).
    value_update: mean (values are running means, like keys) or delta (slot i's value moves by the sum of the
        residuals r_j = v_j - R(k_j) of its tokens over c'_i, R a read of the chunk-start dictionary alone).
    lr: adaptive (running mean, step 1/count) or constant (step eta towards the chunk mean).
    normalize_centroids: score with D_k = Mk / |Mk| (else Mk).
    grad_through_state: False detaches the dictionary at every chunk boundary.
    """

    dict_size: int = 1024
    chunk_size: int = 64
    growth: Growth = "saturating"
    alpha: float = 128.0
    rate: float = 0.125
    init: Init = "spread"
    seed: int = 0
    assign: Assign = "with_spawned"
    count_bias: bool = True
    value_update: ValueUpdate = "mean"
    lr: LearningRate = "adaptive"
    eta: float = 0.1
    normalize_centroids: bool = True
    grad_through_state: bool = True

    def __post_init__(self) -> None:
        if self.dict_size < 1 or self.chunk_size < 1:
            raise ValueError(f"dict_size and chunk_size must be >= 1, got {self.dict_size}, {self.chunk_size}")
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate must be in (0, 1] (a chunk cannot spawn more slots than tokens), got {self.rate}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 < self.eta <= 1:
            raise ValueError(f"eta must be in (0, 1], got {self.eta}")
        if self.value_update == "delta" and self.lr != "adaptive":
            # The delta rule's step is 1/c' (the public implementation's); a constant step is not defined for it.
            raise ValueError("value_update: delta needs lr: adaptive (its step is 1/count)")


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
