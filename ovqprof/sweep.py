"""The sweep: plan the cells of a spec, measure each (in process or in a worker), hand rows to a writer.

Cells run in spec order: layer, then mode, then batch, then sequence length. A failing cell is a row; the
sweep goes on. KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the CLI) stops after the rows
already written.
"""

from __future__ import annotations

from collections.abc import Callable

from ovqprof.cell import Cell, CellSettings, measure_cell
from ovqprof.spec import Spec
from ovqprof.worker import measure_cell_isolated


def plan_cells(spec: Spec) -> list[Cell]:
    return [
        Cell(layer, mode, seq, batch)
        for layer in spec.layers
        for mode in spec.sweep.modes
        for batch in spec.sweep.batch
        for seq in spec.sweep.seq
    ]


def run_sweep(cells: list[Cell], settings: CellSettings, on_row: Callable[[dict], None], *,
              isolate: bool = False, cell_timeout_s: float | None = None,
              on_start: Callable[[Cell], None] | None = None) -> list[dict]:
    """Measure every cell, calling `on_row(row)` as each finishes; returns the rows."""
    rows = []
    for cell in cells:
        if on_start is not None:
            on_start(cell)
        if isolate:
            row = measure_cell_isolated(cell, settings, cell_timeout_s)
        else:
            row = measure_cell(cell, settings)
        on_row(row)
        rows.append(row)
    return rows
