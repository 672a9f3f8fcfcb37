"""Progress of a long command on stderr: the run header once at the start, then a rich bar with an ETA in a
terminal, or one line per finished cell when stderr is a file or a pipe (a CI log). `quiet` silences both.

The ETA is the mean time of the finished cells times the cells left; before the first cell finishes it is
the cells' time budget (warm-up plus repetitions) when the caller knows one.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


class CellProgress:
    """Progress over `total` cells: `start(label)` when one begins, `done(label, result)` when it ends."""

    def __init__(self, total: int, *, quiet: bool = False, stream: TextIO | None = None,
                 budget_s: float | None = None, what: str = "cells", workers: int = 1):
        """`workers`: cells measured at once (`--devices`); above 1 every line names the cell's device, and the
        ETA before the first cell finishes is the budget shared among the workers."""
        self.total, self.quiet, self.budget_s, self.what = total, quiet, budget_s, what
        self.workers = workers
        self.stream = stream or sys.stderr
        self.finished = 0
        self.current = ""  # the label of the cell running now
        self.t0 = time.perf_counter()
        self.bar = None
        if not quiet and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=Console(file=self.stream), transient=True)
            self.task = self.bar.add_task(what, total=total)

    def header(self, lines: list[str]) -> None:
        """Print the run header (device, versions, ...) once, before the first cell."""
        if not self.quiet and lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    def __enter__(self) -> CellProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def eta_s(self) -> float | None:
        """Seconds left: mean finished-cell time x cells left, else the budget per cell x cells left."""
        left = self.total - self.finished
        if self.finished:
            return (time.perf_counter() - self.t0) / self.finished * left
        return None if self.budget_s is None else self.budget_s * left / self.workers

    def start(self, label: str) -> None:
        self.current = label
        if self.bar is not None:
            self.bar.update(self.task, description=label)

    def done(self, label: str | None = None, result: str = "") -> None:
        """A cell finished: `label` (default: the one last started) and its outcome in a few words."""
        label = self.current if label is None else label
        self.finished += 1
        if self.bar is not None:
            self.bar.advance(self.task)
            return
        if self.quiet:
            return
        eta = self.eta_s()
        tail = f"; elapsed {_duration(time.perf_counter() - self.t0)}" + (
            f", ETA {_duration(eta)}" if eta is not None and self.finished < self.total else "")
        self.stream.write(f"[{self.finished}/{self.total}] {label}{': ' + result if result else ''}{tail}\n")
        self.stream.flush()

    def cell_started(self, cell, device: str | None = None) -> None:
        """`start` for an ovqprof.cell.Cell (a sweep's on_start), on `device` when cells run concurrently."""
        self.start(cell_label(cell) + (f" on {device}" if device and self.workers > 1 else ""))

    def row_finished(self, row: dict) -> None:
        """`done` for a sweep row (a sweep's on_row), labelled from the row itself: with several workers the
        cell last started is not the one that finished."""
        label = f"{row['layer']} {row['mode']} T={row['seq']} B={row['batch']}"
        self.done(label + (f" on {row['device']}" if self.workers > 1 else ""), row_result(row))


def cell_label(cell) -> str:
    """`layer mode T=seq B=batch` of an ovqprof.cell.Cell."""
    return f"{cell.layer.name} {cell.mode} T={cell.seq} B={cell.batch}"


def row_result(row: dict) -> str:
    """A sweep row's outcome in a few words: status and median ms."""
    ms = row.get("ms_median")
    return f"{row['status']}" + (f" {ms:.3g} ms" if isinstance(ms, (int, float)) else "")


def cell_budget_s(spec) -> float:
    """A spec's timing budget per cell in seconds (warm-up plus repetitions): the ETA before any cell ends."""
    return (spec.sweep.warmup_ms + spec.sweep.rep_ms) / 1e3
