"""Bytes by formula, independent of the code that sends them: what `CountingComm`'s counts must equal.

B batch, H query heads, G kv heads, dh head dim, el bytes per element, R ranks, n_r keys on rank r (T keys
in all, `shards.shard_lengths`), one decode step. Units: bytes.
"""

from __future__ import annotations

from ovqprof.distributed.shards import shard_lengths


def bytes_sent(strategy: str, rank: int, world_size: int, keys: int, batch: int, heads: int, kv_heads: int,
               head_dim: int, element_size: int) -> float:
    """Bytes rank `rank` sends in one step (the ring-algorithm count of comm.py)."""
    R, B, H, G, dh, el = world_size, batch, heads, kv_heads, head_dim, element_size
    if R == 1:
        return 0.0
    n = shard_lengths(keys, R)
    if strategy == "tree":  # all-reduce of m [B, H], then of [num | l] [B, H, dh + 1]
        return 2 * (R - 1) / R * B * H * (1 + dh + 1) * el
    if strategy == "ring":  # all blocks except the one of the next rank, K and V
        return float(2 * B * G * dh * el * (keys - n[(rank + 1) % R]))
    if strategy == "allgather":  # R - 1 hops of a block padded to the longest shard
        return float((R - 1) * 2 * B * G * max(n) * dh * el)
    raise ValueError(f"unknown strategy {strategy!r}")


def kv_shard_bytes(rank: int, world_size: int, keys: int, batch: int, kv_heads: int, head_dim: int,
                   element_size: int) -> int:
    """2 B G n_r dh el: the K and V that rank `rank` holds."""
    return 2 * batch * kv_heads * shard_lengths(keys, world_size)[rank] * head_dim * element_size


def peak_bytes_estimate(strategy: str, rank: int, world_size: int, keys: int, batch: int, kv_heads: int,
                        head_dim: int, element_size: int) -> int:
    """What rank `rank` holds at the peak of a step, KV tensors only: its shard, plus for ring the block it
    sends and the one it receives, plus for allgather the R padded blocks and their concatenation."""
    n = shard_lengths(keys, world_size)
    block = 2 * batch * kv_heads * head_dim * element_size  # bytes per key position, K and V
    own = block * n[rank]
    if strategy == "tree":
        return own
    if strategy == "ring":
        return own + 2 * block * max(n)
    return own + block * (world_size * max(n) + keys)


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
