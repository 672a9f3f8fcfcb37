"""`ovqprof baseline`: record the rows `ovqprof check` compares against, with the machine header.

A baseline is a JSON result file (`{"header": {...}, "rows": [...]}`, as `ovqprof sweep --format json` writes)
whose header also says when and from what it was recorded. It is written once, atomically, when every cell has
been measured, so an interrupted recording never leaves half a baseline behind.

On a CPU every cell is measured `repeats` times (default 3), the whole list once per round, so a burst of
load from another process lands on one round of a cell, not on all of them. The row kept for a cell is its
median round, and the header's `baseline.run_medians_ms` lists every round's median: `check` counts a cell
slower only beyond its slowest round and faster only beyond its fastest. One round caught in a quiet (fast)
moment would otherwise make unchanged code fail the check in every later run: seen on a 2-core machine,
linear bwd +15% in four checks in a row against a one-round baseline.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path

from ovqprof.errors import FailedCellsError, InfrastructureError, UsageError
from ovqprof.output import check_json_output, json_document, write_atomic
from ovqprof.rows import FAILED_STATUSES, cell_key, status_summary


def device_slug(header: dict) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'CPU: Intel(R) Xeon(R)' -> 'cpu-intel-xeon'."""
    text = re.sub(r"\((r|tm)\)", "", str(header.get("device") or "unknown"), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_path(profile_name: str, header: dict) -> Path:
    """`<profile>-<device>.json` in the current directory, e.g. `default-nvidia-h100-80gb-hbm3.json`."""
    return Path(f"{profile_name}-{device_slug(header)}.json")


CPU_ROUNDS = 3  # rounds per cell on a CPU; a GPU's run-to-run spread is well under check's 10% threshold


def rounds_for(repeats: int | None, device) -> int:
    """--repeats, or its default for `device` (3 on a CPU, 1 on a GPU); UsageError below 1."""
    rounds = repeats if repeats is not None else (CPU_ROUNDS if device.type == "cpu" else 1)
    if rounds < 1:
        raise UsageError(f"--repeats {rounds} is not valid. Allowed: an integer >= 1")
    return rounds


def measure_rounds(measure: Callable[[list], list[dict]], cells: list, rounds: int
                   ) -> tuple[list[dict], dict[tuple, list[float]]]:
    """Measure `cells` `rounds` times with `measure(cells) -> rows`, the whole list each round. Returns one row
    per cell (its median round among the ok ones, the lower middle one; a cell that was not ok in some round
    keeps that round's row, so `record` refuses a flaky failure instead of hiding it) and each cell's round
    medians in ms (ok rounds only)."""
    if rounds < 1:
        raise UsageError(f"--repeats {rounds} is not valid. Allowed: an integer >= 1")
    runs: dict[tuple, list[dict]] = {}
    order: list[tuple] = []
    for _ in range(rounds):
        for row in measure(cells):
            key = cell_key(row)
            if key not in runs:
                order.append(key)
            runs.setdefault(key, []).append(row)
    rows, medians = [], {}
    for key in order:
        measured = runs[key]
        ok = sorted((r for r in measured if r["status"] == "ok"), key=lambda r: r["ms_median"])
        bad = [r for r in measured if r["status"] != "ok"]
        rows.append(bad[0] if bad or not ok else ok[(len(ok) - 1) // 2])
        if ok:
            medians[key] = [r["ms_median"] for r in measured if r["status"] == "ok"]
    return rows, medians


def run_medians_entry(medians: dict[tuple, list[float]]) -> list[dict]:
    """The header's `baseline.run_medians_ms`: one {layer, mode, seq, batch, ms: [...]} per cell."""
    return [{"layer": k[0], "mode": k[1], "seq": k[2], "batch": k[3], "ms": ms} for k, ms in medians.items()]


def read_run_medians(header: dict) -> dict[tuple, list[float]]:
    """Each cell's round medians from a baseline header (empty for a one-round or older baseline); entries
    that are not well formed are ignored, so a hand-edited file degrades to the one-round rule."""
    out = {}
    entry = header.get("baseline")
    entries = entry.get("run_medians_ms") if isinstance(entry, dict) else None
    for e in entries if isinstance(entries, list) else []:
        try:
            ms = [float(x) for x in e["ms"]]
            out[(str(e["layer"]), str(e["mode"]), int(e["seq"]), int(e["batch"]))] = ms
        except (KeyError, TypeError, ValueError):
            continue
    return out


def record(path: Path, header: dict, rows: list[dict], *, source: str, allow_failed: bool = False,
           run_medians: dict[tuple, list[float]] | None = None) -> str:
    """Write `rows` with `header` as a baseline at `path`; returns a one-line summary. Refuses (exit 1) when a
    cell failed (error, check_failed, timeout) unless `allow_failed`, or when no cell is ok; `oom` and
    `skipped` rows are results and are kept (check does not compare them). `run_medians` (from
    `measure_rounds`, when more than one round) goes to the header as `baseline.run_medians_ms`."""
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
    rounds = max((len(ms) for ms in (run_medians or {}).values()), default=1)
    entry = {"recorded": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "source": source,
             "rounds": rounds}
    if rounds > 1:
        entry["run_medians_ms"] = run_medians_entry(run_medians)
    header = {**header, "baseline": entry}
    try:
        write_atomic(path, json_document(header, rows))
    except OSError as exc:
        raise InfrastructureError(f"cannot write the baseline {path} ({exc.strerror or exc}). Allowed: a path in "
                                  "an existing, writable directory") from None
    per_cell = f", {rounds} rounds per cell" if rounds > 1 else ""
    return f"wrote baseline {path}: {len(rows)} cells on {header.get('device')} ({status_summary(rows)}{per_cell})"


def record_from(source: Path, output: Path | None, *, allow_failed: bool = False) -> str:
    """`baseline --from`: record the rows of a finished JSON result (its header, its round medians if it has
    them) at `output`, or at `<profile>-<device>.json`; returns the one-line summary."""
    from ovqprof.check import load_results

    header, rows = load_results(source, "--from")
    output = output or default_path(Path(str(header.get("profile") or "results")).stem, header)
    check_json_output(output)
    return record(output, header, rows, source=str(source), allow_failed=allow_failed,
                  run_medians=read_run_medians(header))
