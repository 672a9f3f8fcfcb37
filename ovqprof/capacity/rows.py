"""The capacity result row: one per (layer, pairs) of the probe or (layer, seq, pairs, d_model) of MQAR.

Both methods share these columns (the report reads them by name); a column a method does not use is None
(null). Units are in the names: `_bytes` bytes, `_s` seconds.

method      probe (training-free associative-memory probe) or mqar (trained multi-query associative recall)
layer, type, kind, dtype, device   the layer's name, registered type, family, dtype (its parameters'; linear
            and OVQ layers do their math in float32 for fp16/bf16) and device
keys        probe key distribution: gaussian or clustered
gap         probe filler pairs written between the stored pairs and the reads
seeds       the seeds averaged over, as a comma list ("0,1")
d_model, seq, lr   MQAR model width, sequence length and the learning rate of the best run
pairs       key-value pairs stored (N)
dk, dv      probe key and value dimensions
accuracy    probe: fraction of queries whose read is nearest (cosine) to its own stored value among the N;
            mqar: fraction of query positions answered correctly
cosine      probe: mean cosine(read, stored value)
rel_error   probe: mean ||read - v|| / ||v||
capacity    largest `pairs` of this layer with accuracy >= tau (repeated on each of its rows; None when even
            the smallest fails or the layer did not finish)
tau         the accuracy threshold of `capacity`
state_bytes the layer's decode-state bytes after pairs + gap tokens for one sequence (its `state_bytes`)
wall_s      seconds this row took (all seeds)
status      ok | skipped (no probe for this layer) | error | oom; `note` says why
"""

from __future__ import annotations

COLUMNS: tuple[str, ...] = (
    "method", "layer", "type", "kind", "dtype", "device", "keys", "gap", "seeds", "d_model", "seq", "pairs",
    "dk", "dv", "accuracy", "cosine", "rel_error", "capacity", "tau", "state_bytes", "lr", "wall_s", "status",
    "note",
)
INT_COLUMNS = frozenset({"gap", "d_model", "seq", "pairs", "dk", "dv", "capacity", "state_bytes"})
FLOAT_COLUMNS = frozenset({"accuracy", "cosine", "rel_error", "tau", "lr", "wall_s"})
METHODS: tuple[str, ...] = ("probe", "mqar")
INTERRUPTED_NOTE = "interrupted before the layer finished: capacity unknown"
STATUSES: tuple[str, ...] = ("ok", "skipped", "error", "oom")
FAILED_STATUSES = frozenset({"error"})

# Columns of the terminal table and Markdown (CSV and JSON get all of them), and their headers.
SHORT_COLUMNS: tuple[str, ...] = ("method", "layer", "keys", "gap", "seq", "pairs", "dk", "accuracy", "cosine",
                                  "rel_error", "capacity", "state_bytes", "lr", "wall_s", "status", "note")
SHORT_HEADERS: tuple[str, ...] = ("method", "layer", "keys", "gap", "seq", "pairs", "dk", "acc", "cos",
                                  "rel err", "capacity", "state", "lr", "s", "status", "note")


def empty_row(**known: object) -> dict:
    """A row with every column present (None where not known)."""
    from ovqprof.rows import row_of

    return row_of(COLUMNS, "capacity", known)


def capacity_of(rows: list[dict], tau: float) -> int | None:
    """The largest `pairs` among ok rows with accuracy >= tau; None when there is none."""
    passing = [r["pairs"] for r in rows if r["status"] == "ok" and r["accuracy"] is not None
               and r["accuracy"] >= tau]
    return max(passing) if passing else None


def short_row(row: dict) -> list[str]:
    """The SHORT_COLUMNS of a row as table cells: fractions to 3 decimals, bytes in KiB/MiB/GiB."""
    from ovqprof.output import _fmt_number, human_bytes

    cells = []
    for col in SHORT_COLUMNS:
        value = row.get(col)
        if col == "state_bytes":
            cells.append(human_bytes(value))
        elif col in ("accuracy", "cosine", "rel_error") and isinstance(value, (int, float)):
            cells.append(f"{value:.3f}")
        elif col == "note":
            cells.append(value or "")  # whole: a terminal table wraps it
        else:
            cells.append(_fmt_number(value))
    return cells


def layout():
    """The output Layout of capacity rows (for ovqprof.output.RowWriter)."""
    from ovqprof.output import Layout

    return Layout(COLUMNS, SHORT_HEADERS, short_row, frozenset({"method", "layer", "keys", "status", "note"}),
                  "ovqprof capacity", "ovqprof capacity results",
                  ("cos", "rel err", "lr", "gap", "keys", "dk", "s", "seq", "method", "state"))
