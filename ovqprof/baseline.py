"""`ovqprof baseline`: record the rows `ovqprof check` compares against, with the machine header.

A baseline is a JSON result file (`{"header": {...}, "rows": [...]}`, as `ovqprof sweep --format json` writes)
whose header also says when and from what it was recorded. It is written once, atomically, when every cell has
been measured, so an interrupted recording never leaves half a baseline behind.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

from ovqprof.errors import FailedCellsError, InfrastructureError, UsageError
from ovqprof.output import json_document, write_atomic
from ovqprof.rows import FAILED_STATUSES, STATUSES, cell_key


def device_slug(header: dict) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'CPU: Intel(R) Xeon(R)' -> 'cpu-intel-xeon'."""
    text = re.sub(r"\((r|tm)\)", "", str(header.get("device") or "unknown"), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_path(profile_name: str, header: dict) -> Path:
    """`<profile>-<device>.json` in the current directory, e.g. `default-nvidia-h100-80gb-hbm3.json`."""
    return Path(f"{profile_name}-{device_slug(header)}.json")


def status_summary(rows: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no rows"


def record(path: Path, header: dict, rows: list[dict], *, source: str, allow_failed: bool = False) -> str:
    """Write `rows` with `header` as a baseline at `path`; returns a one-line summary. Refuses (exit 1) when a
    cell failed (error, check_failed, timeout) unless `allow_failed`, or when no cell is ok; `oom` and
    `skipped` rows are results and are kept (check does not compare them)."""
    failed = [r for r in rows if r["status"] in FAILED_STATUSES]
    if failed and not allow_failed:
        names = ", ".join(f"{r['layer']} {r['mode']} seq={r['seq']} batch={r['batch']} ({r['status']})"
                          for r in failed[:5])
        raise FailedCellsError(f"{len(failed)} cell(s) failed ({names}{' ...' if len(failed) > 5 else ''}); no "
                               f"baseline written to {path}. Fix them, leave them out (--layers, --modes, --seq), "
                               "or pass --allow-failed to record them as not compared")
    if not any(r["status"] == "ok" for r in rows):
        raise FailedCellsError(f"no cell was measured ok ({status_summary(rows)}); no baseline written to {path}")
    keys = [cell_key(r) for r in rows]
    if len(set(keys)) != len(keys):
        raise FailedCellsError(f"the rows hold a cell twice; no baseline written to {path}")
    header = {**header, "baseline": {
        "recorded": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "source": source}}
    try:
        write_atomic(path, json_document(header, rows))
    except OSError as exc:
        raise InfrastructureError(f"cannot write the baseline {path} ({exc.strerror or exc}). Allowed: a path in "
                                  "an existing, writable directory") from None
    return f"wrote baseline {path}: {len(rows)} cells on {header.get('device')} ({status_summary(rows)})"


def check_writable(path: Path, option: str = "--output") -> None:
    """Fail before measuring (exit 2) when a JSON result could not be written at `path`; creates nothing."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory. Allowed: a file path ending in .json")
    if path.suffix.lower() != ".json":
        raise UsageError(f"{option} {path}: the file is written as JSON. Allowed: a path ending in .json")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path}: the directory {parent} does not exist or is not writable. Allowed: "
                         "a path in an existing, writable directory")
