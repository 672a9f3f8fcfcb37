"""What the split kernels (forward_split.py, backward_split.py) share: the barrier between the P programs of a
(batch, head), and the host's choice of P, of rows merged at a time, and of the persistent or stepped launch.
A persistent launch needs all B * H * P programs resident (at most one per SM), or the barrier would wait for
a program that never starts; under TRITON_INTERPRET=1 programs run one at a time, so P > 1 runs stepped."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def barrier(flags, p, epoch, P: tl.constexpr):
    """Wait until the P programs sharing `flags` [P] have all reached `epoch` (a chunk count). The stores
    before it are released and the loads after it acquire theirs (the pattern of a cooperative grid sync:
    block barrier, one release store of a flag, acquire polling, block barrier). Flags only grow, so a flag
    store is idempotent and the poll is a plain minimum."""
    tl.debug_barrier()
    if P > 1:
        tl.atomic_xchg(flags + p, epoch, sem="release")
        ids = tl.arange(0, P)
        seen = tl.min(tl.atomic_add(flags + ids, 0, sem="acquire"), axis=0)
        while seen < epoch:
            seen = tl.min(tl.atomic_add(flags + ids, 0, sem="acquire"), axis=0)
    tl.debug_barrier()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def split_programs(bh: int, n_slots: int, block: int, chunk: int, sms: int) -> int:
    """P, programs per (batch, head): the largest power of two with all bh * P programs resident at once (at
    most one per SM, of `sms`), P <= chunk (each merges chunk / P output rows) and every program owning at
    least one full tile of `block` slots."""
    p = 1
    while 2 * p * bh <= sms and 2 * p <= chunk and 2 * p * block <= max(n_slots, block):
        p *= 2
    return p


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs one program at a time)."""
    if device.type != "cuda" or interpreted():
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def merge_rows(chunk: int, programs: int, cap: int = 16) -> int:
    """RM, rows merged at a time in phase B: all L / P of a program's rows, at most `cap` (P partial [RM, d]
    float32 tiles are in flight at once; at RM = 32, d = 128 the 4-warp merge spilled ~1 KB per thread)."""
    return min(chunk // programs, cap)


def split_launch(bh: int, dict_size: int, block: int, chunk: int, device: torch.device, programs: int | None,
                 stepped: bool | None, what: str) -> tuple[int, bool]:
    """(P, stepped) for a split kernel over `bh` (batch, head) pairs: P as given (a power of two <= chunk) or
    `split_programs`' choice; stepped as given, else whenever P > 1 under the interpreter. ValueError naming
    `what` when a persistent launch could not have all bh * P programs resident (one per SM; one at a time
    under TRITON_INTERPRET=1), since its barrier would then wait for a program that never starts."""
    sms = sm_count(device)
    P = programs if programs is not None else split_programs(bh, dict_size, block, chunk, sms)
    if P < 1 or P & (P - 1) or P > chunk:
        raise ValueError(f"programs must be a power of two between 1 and chunk_size={chunk}, got {P}")
    if stepped is None:
        stepped = P > 1 and interpreted()
    if not stepped and P > 1:
        if interpreted():
            raise ValueError(f"the persistent {what} needs P = 1 under TRITON_INTERPRET=1 (programs run one "
                             "after another there); use stepped=True")
        if bh * P > sms:
            raise ValueError(f"B * H * programs = {bh * P} programs exceed the {sms} SMs: they could not all "
                             f"be resident for the persistent {what}'s barrier; use fewer programs or stepped=True")
    return P, stepped
