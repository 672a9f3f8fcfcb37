"""The distributed result row: one per (layer, world_size, strategy, seq, batch).

Units are in the names: `_ms` milliseconds, `_bytes` bytes. Per-rank figures are comma lists in rank order
(`*_ranks`); the scalar next to each is the largest rank's, the one that bounds the step.

layer, ovq_layer    the softmax layer whose KV cache is sharded, and the OVQ layer of the comparison
world_size, strategy, backend, device   R ranks, tree | ring | allgather, gloo | nccl, rank 0's device
seq, batch          decode context T (the step attends T + 1 keys), batch size
heads, kv_heads, head_dim   H, G, dh
status, check       ok | check_failed | error | oom | timeout | skipped (would not fit in free RAM); check: the float64 gate of the strategy against single-device
                    SDPA at check_seq ("ok 3e-16" or "FAIL ...")
ms_median, ms_p20, ms_p80   the slowest rank's median step (and that rank's p20, p80); ms_ranks each rank's
reps                timed steps per rank (the same on every rank: collectives need equal counts)
bytes_sent          bytes the busiest rank sent in one step, counted from the collectives' tensor sizes
bytes_sent_formula  the same by formula (cost.py); bytes_sent_ranks each rank's count
mem_peak_bytes      peak memory above the rank's level before the cell (RSS on CPU, torch allocator on GPU,
                    named by mem_source); mem_peak_ranks each rank's
kv_shard_bytes      bytes of the largest rank's KV shard; kv_shard_ranks each rank's
ovq_ms              OVQ-attention's single-device decode step at the same context and batch (None: no OVQ
                    layer, or it failed; see note); ovq_state_bytes its decode state
"""

from __future__ import annotations

COLUMNS: tuple[str, ...] = (
    "layer", "ovq_layer", "world_size", "strategy", "backend", "device", "dtype", "seq", "batch", "heads",
    "kv_heads", "head_dim", "status", "check", "ms_median", "ms_p20", "ms_p80", "reps", "ms_ranks", "bytes_sent",
    "bytes_sent_formula", "bytes_sent_ranks", "mem_peak_bytes", "mem_source", "mem_peak_ranks", "kv_shard_bytes",
    "kv_shard_ranks", "ovq_ms", "ovq_state_bytes", "note",
)
INT_COLUMNS = frozenset({"world_size", "seq", "batch", "heads", "kv_heads", "head_dim", "reps",
                         "mem_peak_bytes", "kv_shard_bytes", "ovq_state_bytes"})
FLOAT_COLUMNS = frozenset({"ms_median", "ms_p20", "ms_p80", "bytes_sent", "bytes_sent_formula", "ovq_ms"})
STATUSES: tuple[str, ...] = ("ok", "check_failed", "oom", "error", "timeout", "skipped")
FAILED_STATUSES = frozenset({"check_failed", "error", "timeout"})
MARKERS = frozenset({"world_size", "strategy", "bytes_sent", "ms_median"})  # how a report tells these rows

SHORT_COLUMNS: tuple[str, ...] = ("layer", "world_size", "strategy", "seq", "status", "check", "ms_median",
                                  "ms_p20", "ms_p80", "bytes_sent", "mem_peak_bytes", "kv_shard_bytes",
                                  "ovq_ms", "note")
SHORT_HEADERS: tuple[str, ...] = ("layer", "R", "strategy", "seq", "status", "check", "ms", "p20", "p80",
                                  "sent/rank", "peak mem", "kv shard", "ovq ms", "note")


def empty_row(**known: object) -> dict:
    """A row with every column present (None where not known)."""
    from ovqprof.rows import row_of

    return row_of(COLUMNS, "distributed", known)


def cell_key(row: dict) -> tuple:
    """(layer, world_size, strategy, seq, batch)."""
    return (row["layer"], int(row["world_size"]), row["strategy"], int(row["seq"]), int(row["batch"]))


def ranks_text(values: list) -> str:
    """Per-rank figures as a comma list ("1.2,1.3"); floats to 4 significant digits."""
    return ",".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)


def short_row(row: dict) -> list[str]:
    from ovqprof.output import _fmt_number, human_bytes

    cells = []
    for col in SHORT_COLUMNS:
        value = row.get(col)
        if col in ("bytes_sent", "mem_peak_bytes", "kv_shard_bytes"):
            cells.append(human_bytes(value))
        elif col == "note":
            cells.append(value or "")
        else:
            cells.append(_fmt_number(value))
    return cells


def layout():
    """The output Layout of distributed rows (for ovqprof.output.RowWriter)."""
    from ovqprof.output import Layout

    return Layout(COLUMNS, SHORT_HEADERS, short_row, frozenset({"layer", "strategy", "status", "check", "note"}),
                  "ovqprof distributed", "ovqprof distributed decode results",
                  ("p20", "p80", "kv shard", "check", "layer", "peak mem", "ovq ms"))
