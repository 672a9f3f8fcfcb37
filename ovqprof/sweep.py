"""The sweep: plan the cells of a spec, measure each (in process or in a worker), hand rows to a writer.

Cells run in spec order: layer, then mode, then batch, then sequence length; with several worker slots
(`--devices`, `ovqprof.pool`) they run concurrently and rows come in the order they finish. A failing cell is
a row; the sweep goes on. KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by `ovqprof.run.interruptible`)
stops after the rows already written. `ovqprof.run.Run.measure` is how commands call `run_sweep`.
"""

from __future__ import annotations

from collections.abc import Callable

from ovqprof.cell import Cell, CellSettings, measure_cell
from ovqprof.devices import WorkerSlot
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


def cells_for_keys(spec: Spec, keys: list[tuple]) -> tuple[list[Cell], list[tuple]]:
    """The cells of `spec`'s layers for the given cell keys (layer, mode, seq, batch), in that order, and the
    keys whose layer `spec` does not have."""
    layers = {layer.name: layer for layer in spec.layers}
    cells, unknown = [], []
    for key in keys:
        name, mode, seq, batch = key
        if name in layers:
            cells.append(Cell(layers[name], mode, int(seq), int(batch)))
        else:
            unknown.append(key)
    return cells, unknown


def run_sweep(cells: list[Cell], settings: CellSettings, on_row: Callable[[dict], None], *,
              isolate: bool = False, cell_timeout_s: float | None = None,
              on_start: Callable[..., None] | None = None, slots: list[WorkerSlot] | None = None) -> list[dict]:
    """Measure every cell, calling `on_start(cell)` as each begins and `on_row(row)` as each finishes; returns
    the rows. With `slots`, cells run concurrently in isolated workers, one per slot (`ovqprof.pool`), and
    `on_start` also gets the slot's label."""
    if slots:
        from ovqprof.pool import run_pool

        return run_pool(cells, settings, slots, on_row, cell_timeout_s=cell_timeout_s, on_start=on_start)
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
