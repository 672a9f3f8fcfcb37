"""Breakdowns (`ovqprof trace`) as text: a terminal table, CSV, JSON or Markdown, one line per phase or operator."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, fields

from tabulate import tabulate

from ovqprof.trace import Breakdown, BreakdownRow

HEADERS = ("layer", "mode", "seq", "batch", "kind", "name", "parent", "ms", "calls", "%")


def _cells(row: BreakdownRow) -> list:
    name = row.name if len(row.name) <= 48 else row.name[:45] + "..."
    return [row.layer, row.mode, row.seq, row.batch, row.kind, name, row.parent, f"{row.ms:.4g}",
            f"{row.calls:g}", f"{row.pct:.1f}"]


def format_breakdowns(breakdowns: list[Breakdown], fmt: str) -> str:
    """All breakdowns' rows in `fmt` (table, csv, json or md); the total of each cell is its own line."""
    if fmt == "json":
        return json.dumps([b.document() for b in breakdowns], indent=1) + "\n"
    names = [f.name for f in fields(BreakdownRow)]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for b in breakdowns:
            for r in b.rows:
                writer.writerow(asdict(r))
        return out.getvalue()
    lines = []
    for b in breakdowns:
        c = b.cell
        lines.append(f"{c.layer.name} {c.mode} T={c.seq} B={c.batch}: {b.total_ms:.4g} ms per call "
                     f"({b.clock} time; trace {b.trace_file})" + (f"; {b.note}" if b.note else ""))
    body = tabulate([_cells(r) for b in breakdowns for r in b.rows], headers=HEADERS,
                    tablefmt="github" if fmt == "md" else "simple", disable_numparse=True)
    if fmt == "md":
        return "\n".join(f"- {line}" for line in lines) + "\n\n" + body + "\n"
    return "\n".join(lines) + "\n\n" + body + "\n"
