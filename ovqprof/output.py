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


def check_json_output(path: Path, option: str = "--output") -> None:
    """Fail before measuring (exit 2) when a JSON result could not be written at `path`; creates nothing."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory. Allowed: a file path ending in .json")
    if path.suffix.lower() != ".json":
        raise UsageError(f"{option} {path}: the file is written as JSON. Allowed: a path ending in .json")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path}: the directory {parent} does not exist or is not writable. Allowed: "
                         "a path in an existing, writable directory")


def check_output_dir(path: Path, holds: str, option: str = "--output") -> None:
    """Fail before any work (exit 2) when the directory `path` (created when missing) cannot hold `holds`
    (traces, a report and its plots): it is a file, or cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file. Allowed: a directory (created when missing) {holds}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / ".ovqprof-write-test").write_text("")
        (path / ".ovqprof-write-test").unlink()
    except OSError as exc:
        raise UsageError(f"{option} {path} cannot be written ({exc.strerror or exc}). Allowed: a directory in "
                         "a writable place") from exc


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
            out.append("; ".join(parts))  # whole: a terminal table wraps it, piped output keeps it all
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
    drop_order: tuple[str, ...] = ()  # headers a narrow terminal hides first (the rest always show)


SWEEP_LAYOUT = Layout(COLUMNS, SHORT_HEADERS, short_row, frozenset({"layer", "impl", "mode", "status", "note"}),
                      "ovqprof sweep", "ovqprof results",
                      ("p20", "p80", "GB/s", "TFLOP/s", "%roof", "batch", "impl", "tok/s", "peak mem", "state"))
NOTE_HEADER = "note"
NOTE_MIN_WIDTH = 24  # the note column wraps; below this it is hidden instead
CELL_PADDING = 3  # rich's padding and rule per column


def fit_columns(headers: tuple[str, ...], cells: list[list[str]], width: int, drop_order: tuple[str, ...]
                ) -> list[str]:
    """The headers to show so the table fits `width` characters: every column as wide as its widest cell
    (numbers never wrap), the note column wrapping into what is left (at least NOTE_MIN_WIDTH), columns of
    `drop_order` hidden first to last until it fits."""
    natural = {h: max([len(h), *(len(row[i]) for row in cells)]) + CELL_PADDING for i, h in enumerate(headers)}
    shown = list(headers)

    def needed() -> int:
        return sum(min(natural[h], NOTE_MIN_WIDTH) if h == NOTE_HEADER else natural[h] for h in shown) + 1

    for h in (*drop_order, NOTE_HEADER):
        if needed() <= width:
            break
        if h in shown:
            shown.remove(h)
    return shown


def select_columns(layout: Layout, wanted: list[str] | None) -> list[str] | None:
    """`--columns a,b`: those headers, in the given order; None keeps the default. UsageError names the
    allowed headers."""
    if wanted is None:
        return None
    unknown = [w for w in wanted if w not in layout.headers]
    if unknown or not wanted:
        raise UsageError(f"--columns: unknown column(s) {unknown}. Allowed: a comma list of "
                         f"{', '.join(layout.headers)}")
    return wanted


def run_header_lines(header: dict) -> list[str]:
    """The run header as the lines a result file starts with (device, versions, date, profile, ...)."""
    return _header_lines(header)


def _header_lines(header: dict) -> list[str]:
    keys = ("device", "devices", "driver", "torch", "triton", "cuda", "python", "git_revision", "date", "profile",
            "argv")
    lines = [f"- {k}: {', '.join(v) if isinstance(v, list) else v}" for k in keys
             if (v := header.get(k)) is not None]
    for dtype, p in (header.get("peaks") or {}).items():
        lines.append(f"- peaks ({dtype}, median of {p.get('rounds', 1)} rounds, spread max-min): matmul "
                     f"{p['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({100 * p.get('matmul_spread', 0):.0f}%), copy "
                     f"{p['copy_bytes_per_s'] / 1e9:.3g} GB/s ({100 * p.get('copy_spread', 0):.0f}%)")
    return lines + [f"- note: {note}" for note in header.get("notes", [])]


class RowWriter:
    """Writes rows in one format to `path` (or stdout when None). Use as a context manager."""

    def __init__(self, fmt: str, path: Path | None, header: dict, stdout: TextIO | None = None,
                 existing_rows: list[dict] | None = None, layout: Layout = SWEEP_LAYOUT,
                 columns: list[str] | None = None):
        """`existing_rows`: rows already in `path` (resuming); new rows are appended after them. `layout`:
        the columns and short table (default: the sweep's). `columns`: the table and Markdown headers to show
        (see `select_columns`; default: all, a terminal table hiding some to fit its width)."""
        self.chosen = select_columns(layout, columns)
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
            headers = self.chosen or self.layout.headers
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
            cells = [c.replace("|", "\\|") for c in self._cells(row, self.chosen)]
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

    def _cells(self, row: dict, headers: list[str] | None) -> list[str]:
        """A row's table cells for `headers` (None: all)."""
        cells = self.layout.cells(row)
        if headers is None:
            return cells
        index = {h: i for i, h in enumerate(self.layout.headers)}
        return [cells[index[h]] for h in headers]

    def table_text(self) -> str:
        headers = self.chosen or list(self.layout.headers)
        return tabulate([self._cells(r, headers) for r in self.rows], headers=list(headers), tablefmt="simple",
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
        import shutil

        from rich.console import Console
        from rich.table import Table

        width = shutil.get_terminal_size().columns  # $COLUMNS first, then the terminal
        console = Console(file=self.stdout, width=width)
        all_cells = [self.layout.cells(r) for r in self.rows]
        shown = self.chosen or fit_columns(self.layout.headers, all_cells, width, self.layout.drop_order)
        table = Table(title=f"{self.layout.title}: {self.header.get('device')}", title_justify="left")
        for col in shown:
            wraps = col == NOTE_HEADER  # only the note wraps; a number is never split across lines
            table.add_column(col, justify="left" if col in self.layout.left else "right",
                             overflow="fold" if wraps else "ellipsis", no_wrap=not wraps, ratio=1 if wraps else None,
                             min_width=NOTE_MIN_WIDTH if wraps else None)
        captions = [f"note: {line}" for line in self.header.get("notes", [])]
        hidden = [h for h in self.layout.headers if h not in shown]
        if hidden and self.chosen is None:
            captions.append(f"hidden to fit {width} columns: {', '.join(hidden)} (--columns to choose; piped "
                            "output has every column)")
        table.caption = "; ".join(captions) or None
        for row in self.rows:
            style = None if row.get("status") == "ok" else "red"
            table.add_row(*self._cells(row, shown), style=style)
        console.print(table)
