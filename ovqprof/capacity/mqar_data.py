"""Multi-query associative recall (MQAR) data, generated as Zoology (HazyResearch) does, from a seed.

One example of length T with N key-value pairs (vocabulary V):
- positions 0..2N-1 hold k1 v1 k2 v2 ... kN vN: N distinct keys from [1, V/2), N distinct values from [V/2, V);
- the query region 2N..T-1 has `space` = (T - 2N) // 2 even slots; key i is placed at position 2N + 2 g_i,
  the gaps g_1..g_N drawn without replacement from 0..space-1 with p(g) proportional to (g+1)^(a-1)
  (a = power_a; a -> 0 favours short gaps, a = 1 is uniform);
- the target at a query key's position is the value paired with that key (the model predicts the next token,
  which Zoology's shifted labels make the value); every other target is IGNORE (-100);
- every other position (filler) gets a random token from [0, V), as Zoology's random_non_queries does.

Everything is drawn from one numpy Generator seeded with `seed`, so the data is a pure function of its
arguments. Weighted sampling without replacement uses Gumbel top-k, which draws the same distribution as
numpy's sequential `choice(..., replace=False, p=...)` (the Plackett-Luce order), vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # target of positions without a question; skipped by the loss and the accuracy
_ROWS_PER_CHUNK = 1024  # examples whose [rows, V/2] random scores are held at once when drawing keys/values


@dataclass(frozen=True)
class MQARData:
    """inputs[n, T] token ids (int64) and targets[n, T] (value token at query positions, else IGNORE)."""

    inputs: torch.Tensor
    targets: torch.Tensor


def check_task(seq: int, pairs: int, vocab_size: int) -> None:
    """Raise ValueError unless (seq, pairs, vocab_size) can be generated (Zoology's own preconditions)."""
    if seq < 2 or seq % 2:
        raise ValueError(f"seq must be an even integer >= 2 (got {seq})")
    if pairs < 1 or 4 * pairs > seq:
        raise ValueError(f"pairs must be >= 1 with 4 * pairs <= seq (got pairs={pairs}, seq={seq})")
    if vocab_size <= seq or vocab_size // 2 - 1 < pairs:
        raise ValueError(f"vocab_size must exceed seq and give at least `pairs` keys (got {vocab_size})")


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """p(g) for g = 0..space-1, proportional to (g+1)^(power_a-1), summing to 1."""
    weights = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1.0)
    return weights / weights.sum()


def _distinct(rng: np.random.Generator, n: int, low: int, high: int, count: int) -> np.ndarray:
    """[n, count] int64: per row `count` distinct integers from [low, high) in uniformly random order."""
    out = np.empty((n, count), dtype=np.int64)
    for start in range(0, n, _ROWS_PER_CHUNK):
        scores = rng.random((min(_ROWS_PER_CHUNK, n - start), high - low))
        chosen = np.argpartition(scores, count - 1, axis=1)[:, :count]
        order = np.argsort(np.take_along_axis(scores, chosen, axis=1), axis=1)  # random order of the chosen
        out[start:start + len(scores)] = np.take_along_axis(chosen, order, axis=1) + low
    return out


def _weighted_without_replacement(rng: np.random.Generator, n: int, p: np.ndarray, count: int) -> np.ndarray:
    """[n, count] int64: per row `count` distinct indices of p, drawn in sequence with probabilities p."""
    keys = np.log(p)[None, :] + rng.gumbel(size=(n, len(p)))
    return np.argsort(-keys, axis=1)[:, :count].astype(np.int64)


def generate_mqar(n: int, seq: int, pairs: int, vocab_size: int, power_a: float, seed: int) -> MQARData:
    """n MQAR examples of length `seq` with `pairs` key-value pairs; a pure function of its arguments."""
    check_task(seq, pairs, vocab_size)
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = _distinct(rng, n, 1, half, pairs)
    values = _distinct(rng, n, half, vocab_size, pairs)
    space = (seq - 2 * pairs) // 2
    gaps = _weighted_without_replacement(rng, n, gap_probabilities(space, power_a), pairs)

    inputs = np.zeros((n, seq), dtype=np.int64)  # 0 marks filler until the end (keys are >= 1)
    targets = np.full((n, seq), IGNORE, dtype=np.int64)
    inputs[:, 0:2 * pairs:2] = keys
    inputs[:, 1:2 * pairs:2] = values
    query_pos = 2 * pairs + 2 * gaps
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    np.put_along_axis(targets, query_pos, values, axis=1)
    filler = inputs == 0
    inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
    return MQARData(torch.from_numpy(inputs), torch.from_numpy(targets))


def train_test_seeds(seed: int) -> tuple[int, int]:
    """Seeds of the training and test sets: `seed` and `seed + 10`, as Zoology separates them."""
    return seed, seed + 10
