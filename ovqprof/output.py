"""Row writers: table, CSV, JSON and Markdown, to a file or stdout.

Rows are written as they finish so an interrupted sweep keeps every finished row:
- csv: header once, then one flushed line per row;
- json: {"header": {...}, "rows": [...]}; a file is rewritten atomically after every row, so it is valid JSON
  at every moment; on stdout the document is printed once at close;
- md: a header list, then a table whose lines are appended and flushed per row;
- table: a rich table at close on a terminal; to a file, a plain-text (tabulate) table rewritten per row.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tabulate import tabulate

from ovqprof.errors import UsageError
from ovqprof.rows import COLUMNS, RUN_WIDE_NOTES

FORMATS = ("table", "csv", "json", "md")

# Columns shown in the terminal table and Markdown (all columns go to CSV and JSON).
SHORT_COLUMNS = ("layer", "impl", "mode", "seq", "batch", "status", "ms_median", "ms_p20", "ms_p80",
                 "tokens_per_s", "tflops", "gbps", "pct_roofline", "mem_peak", "state_bytes", "note")
SHORT_HEADERS = ("layer", "impl", "mode", "seq", "batch", "status", "ms", "p20", "p80", "tok/s", "TFLOP/s",
                 "GB/s", "%roof", "peak mem", "state", "note")


def check_output_writable(path: Path) -> None:
    """Fail before the sweep starts if `path` cannot be created or written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"--output {path} is a directory. Allowed: a file path")
    if not parent.exists():
        raise UsageError(f"--output {path}: the directory {parent} does not exist. Allowed: a path in an "
                         "existing, writable directory")
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UsageError(f"--output {path} cannot be written ({exc.strerror}). Allowed: a path in an "
                         "existing, writable directory") from exc


def json_document(header: dict, rows: list[dict]) -> str:
    """The text of a JSON result file: {"header": {...}, "rows": [...]}."""
    return json.dumps({"header": header, "rows": rows}, indent=1, allow_nan=False, default=str) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it over `path`: readers see the old file or
    the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _fmt_number(value: object) -> str:
    """Three significant digits, with k/M/G suffixes for large numbers."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{suffix}"
        return f"{value:.3g}"
    return str(value)


def peak_memory(row: dict) -> tuple[int | None, str]:
    """The most direct peak-memory figure a row has, and its source."""
    for col, source in (("mem_torch_alloc_bytes", "torch"), ("mem_nvml_process_bytes", "nvml-proc"),
                        ("mem_nvml_device_bytes", "nvml-dev"), ("mem_rss_peak_bytes", "rss")):
        if row.get(col) is not None:
            return row[col], source
    return None, ""


def short_row(row: dict) -> list[str]:
    out = []
    for col in SHORT_COLUMNS:
        if col == "mem_peak":
            value, source = peak_memory(row)
            out.append(f"{human_bytes(value)} ({source})" if value is not None else "-")
        elif col == "state_bytes":
            out.append(human_bytes(row.get(col)))
        elif col == "note":
            parts = [p for p in (row.get("note") or "").split("; ") if p and p not in RUN_WIDE_NOTES]
            note = "; ".join(parts)
            out.append(note if len(note) <= 70 else note[:67] + "...")
        else:
            out.append(_fmt_number(row.get(col)))
    return out


@dataclass(frozen=True)
class Layout:
    """What a writer shows: every column (CSV), the short table of the terminal and Markdown (`headers`,
    one `cells(row)` string per header, headers in `left` aligned left) and the table titles."""

    columns: tuple[str, ...]
    headers: tuple[str, ...]
    cells: Callable[[dict], list[str]]
    left: frozenset[str]
    title: str
    md_title: str


SWEEP_LAYOUT = Layout(COLUMNS, SHORT_HEADERS, short_row, frozenset({"layer", "impl", "mode", "status", "note"}),
                      "ovqprof sweep", "ovqprof results")


def _header_lines(header: dict) -> list[str]:
    keys = ("device", "driver", "torch", "triton", "cuda", "python", "git_revision", "date", "profile", "argv")
    lines = [f"- {k}: {header.get(k)}" for k in keys if header.get(k) is not None]
    return lines + [f"- note: {note}" for note in header.get("notes", [])]


class RowWriter:
    """Writes rows in one format to `path` (or stdout when None). Use as a context manager."""

    def __init__(self, fmt: str, path: Path | None, header: dict, stdout: TextIO | None = None,
                 existing_rows: list[dict] | None = None, layout: Layout = SWEEP_LAYOUT):
        """`existing_rows`: rows already in `path` (resuming); new rows are appended after them. `layout`:
        the columns and short table (default: the sweep's)."""
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt!r} is not known. Allowed: {', '.join(FORMATS)}")
        self.fmt = fmt
        self.path = path
        self.layout = layout
        self.header = header
        self.rows: list[dict] = list(existing_rows or [])
        self._appending = bool(existing_rows) and path is not None
        self.stdout = stdout or sys.stdout
        self._stream: TextIO | None = None
        self._csv: csv.DictWriter | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> RowWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self.fmt == "csv":
            self._stream = self._open_stream()
            self._csv = csv.DictWriter(self._stream, fieldnames=list(self.layout.columns), lineterminator="\n")
            if not self._appending:
                self._csv.writeheader()
            self._stream.flush()
        elif self.fmt == "md":
            self._stream = self._open_stream()
            headers = self.layout.headers
            lines = [f"# {self.layout.md_title}", "", *_header_lines(self.header), "",
                     "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        elif self.path is not None:
            self._rewrite()

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.fmt == "csv":
            assert self._csv is not None and self._stream is not None
            self._csv.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.layout.columns})
            self._stream.flush()
        elif self.fmt == "md":
            assert self._stream is not None
            cells = [c.replace("|", "\\|") for c in self.layout.cells(row)]
            self._stream.write("| " + " | ".join(cells) + " |\n")
            self._stream.flush()
        elif self.path is not None:
            self._rewrite()

    def close(self) -> None:
        if self.fmt in ("csv", "md"):
            if self._stream is not None and self._stream is not self.stdout:
                self._stream.close()
            self._stream = None
        elif self.path is None:
            if self.fmt == "json":
                self.stdout.write(self.json_text())
            else:
                self._print_rich_table()
        else:
            self._rewrite()

    # --- helpers -----------------------------------------------------------------------------------------
    def _open_stream(self) -> TextIO:
        if self.path is None:
            return self.stdout
        return open(self.path, "a" if self._appending else "w", newline="")

    def json_text(self) -> str:
        return json_document(self.header, self.rows)

    def table_text(self) -> str:
        headers = self.layout.headers
        return tabulate([self.layout.cells(r) for r in self.rows], headers=list(headers), tablefmt="simple",
                        disable_numparse=True,
                        colalign=["left" if h in self.layout.left else "right" for h in headers])

    def _rewrite(self) -> None:
        """Write the whole document to a temporary file and rename it over the target (atomic)."""
        assert self.path is not None
        text = self.json_text() if self.fmt == "json" else "\n".join(_header_lines(self.header)) + "\n\n" + \
            self.table_text() + "\n"
        write_atomic(self.path, text)

    def _print_rich_table(self) -> None:
        """A rich table on a terminal; plain text (tabulate) when stdout is a pipe or a file."""
        if not self.stdout.isatty():
            self.stdout.write("\n".join(_header_lines(self.header)) + "\n\n" + self.table_text() + "\n")
            return
        from rich.console import Console
        from rich.table import Table

        console = Console(file=self.stdout)
        table = Table(title=f"{self.layout.title}: {self.header.get('device')}", title_justify="left")
        for col in self.layout.headers:
            table.add_column(col, justify="left" if col in self.layout.left else "right", overflow="fold")
        for line in self.header.get("notes", []):
            table.caption = (table.caption + "; " if table.caption else "note: ") + line
        for row in self.rows:
            style = None if row.get("status") == "ok" else "red"
            table.add_row(*self.layout.cells(row), style=style)
        console.print(table)
