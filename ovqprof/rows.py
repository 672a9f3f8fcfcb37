"""The result row: one per (layer, mode, seq, batch), columns as in the README's "Row schema".

Units are in the names: `_ms` milliseconds, `_bytes` bytes, `tflops` 1e12 FLOP/s, `gbps` 1e9 bytes/s.
Memory columns name their source (torch allocator, NVML, process RSS). Unknown is None (null), never 0,
and the `note` column says why.
"""

from __future__ import annotations

MODES: tuple[str, ...] = ("fwd", "bwd", "decode")  # here, not in layers/, so the CLI parses without torch

COLUMNS: tuple[str, ...] = (
    "layer", "kind", "impl", "device", "dtype", "mode", "seq", "batch", "status", "check",
    "ms_median", "ms_p20", "ms_p80", "timer", "tokens_per_s", "tflops", "gbps", "pct_roofline",
    "mem_torch_alloc_bytes", "mem_torch_reserved_bytes", "mem_nvml_device_bytes", "mem_nvml_process_bytes",
    "mem_rss_peak_bytes", "state_bytes", "flops", "bytes", "note",
)

# ok: measured and checked; check_failed: measured, but decode disagreed with forward (not to be trusted);
# oom: out of memory (a result, not a crash); error: any other failure (message in note);
# skipped: mode not supported by the layer or device; timeout: the cell ran past its time limit.
STATUSES: tuple[str, ...] = ("ok", "check_failed", "oom", "error", "skipped", "timeout")
FAILED_STATUSES = frozenset({"check_failed", "error", "timeout"})

# Notes that hold for every row of a run; tables and Markdown show them once, under the header, not per row.
NOTE_CPU_MEMORY = "memory: torch/nvml columns are GPU-only"
NOTE_NO_PEAKS = "no measured device peaks: % of roofline unknown"
NOTE_SHARED_CORES = "timed while other workers shared the CPU cores (--devices cpu,...): slower than alone"
RUN_WIDE_NOTES = (NOTE_CPU_MEMORY, NOTE_NO_PEAKS, NOTE_SHARED_CORES)

INT_COLUMNS = frozenset({
    "seq", "batch", "mem_torch_alloc_bytes", "mem_torch_reserved_bytes", "mem_nvml_device_bytes",
    "mem_nvml_process_bytes", "mem_rss_peak_bytes", "state_bytes",
})
FLOAT_COLUMNS = frozenset({"ms_median", "ms_p20", "ms_p80", "tokens_per_s", "tflops", "gbps", "pct_roofline",
                           "flops", "bytes"})


def row_of(columns: tuple[str, ...], what: str, known: dict) -> dict:
    """A row with every one of `columns` present (None where not yet known); a key outside them is a
    KeyError naming `what` rows they are (sweep, capacity and distributed rows share this)."""
    unknown = set(known) - set(columns)
    if unknown:
        raise KeyError(f"not {what} columns: {sorted(unknown)}")
    row = dict.fromkeys(columns)
    row.update(known)
    return row


def empty_row(**known: object) -> dict:
    """A sweep row with every column present (None where not yet known)."""
    return row_of(COLUMNS, "result", known)


def cell_key(row: dict) -> tuple:
    """Identity of a cell: (layer, mode, seq, batch)."""
    return (row["layer"], row["mode"], int(row["seq"]), int(row["batch"]))


def status_summary(rows: list[dict], statuses: tuple[str, ...] = STATUSES) -> str:
    """'3 ok, 1 skipped' (in the order of `statuses`: a command's own, e.g. capacity's), or 'no rows'."""
    counts = {s: sum(r.get("status") == s for r in rows) for s in statuses}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no rows"


def any_failed(rows: list[dict]) -> bool:
    """Whether a row failed (error, check_failed, timeout); oom and skipped are results."""
    return any(r.get("status") in FAILED_STATUSES for r in rows)
