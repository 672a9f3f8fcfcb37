"""The sweep: plan the cells of a spec, measure each (in process or in a worker), hand rows to a writer.

Cells run in spec order: layer, then mode, then batch, then sequence length; with several worker slots
(`--devices`, `ovqprof.pool`) they run concurrently and rows come in the order they finish. A failing cell is
a row; the sweep goes on. KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the CLI) stops after the rows
already written.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import torch

from ovqprof.cell import Cell, CellSettings, measure_cell
from ovqprof.devices import WorkerSlot
from ovqprof.rows import NOTE_CPU_MEMORY, NOTE_NO_PEAKS
from ovqprof.spec import Spec, profile_label, torch_dtype
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


def start_run(spec: Spec, run_device: torch.device, header: dict, *, roofline: bool,
              isolate: bool, slots: list[WorkerSlot] | None = None) -> CellSettings:
    """Complete `header` (from `machine_info(run_device)`) with the run's date, profile, layer specs, timing
    budgets, device peaks (measured here when `roofline`), worker slots (`devices`, when several) and run-wide
    notes; return the cell settings."""
    from ovqprof.measure.peaks import measure_peaks

    header.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  profile=profile_label(spec.file), isolate=isolate)
    # What was measured, so a later `ovqprof check` can tell whether the same layers are being compared.
    header["layers"] = [layer.model_dump(mode="json", exclude={"line"}) for layer in spec.layers]
    header["timing"] = {"warmup_ms": spec.sweep.warmup_ms, "rep_ms": spec.sweep.rep_ms,
                        "check_seq": spec.sweep.check_seq}
    peaks = {}
    if roofline:
        for dtype_name in sorted({layer.dtype for layer in spec.layers}):
            peaks[dtype_name] = measure_peaks(run_device, torch_dtype(dtype_name))
    header["peaks"] = {k: v.as_dict() for k, v in peaks.items()}
    header["notes"] = [note for note, applies in ((NOTE_CPU_MEMORY, run_device.type != "cuda"),
                                                  (NOTE_NO_PEAKS, not roofline)) if applies]
    if slots:
        header["devices"] = [slot.label for slot in slots]
        header["notes"] += list(dict.fromkeys(slot.note for slot in slots if slot.note))
    return CellSettings(device=str(run_device), warmup_ms=spec.sweep.warmup_ms, rep_ms=spec.sweep.rep_ms,
                        check_seq=spec.sweep.check_seq, peaks=peaks)


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


class SpecRunner:
    """Measures cells of one spec on one device for commands that need rows, not a file (`baseline`,
    `check`), on several worker slots when given. `header` starts as `machine_info(run_device)`; the first
    `measure` completes it (`start_run`)."""

    def __init__(self, spec: Spec, run_device: torch.device, header: dict, *, isolate: bool,
                 cell_timeout_s: float | None = None, roofline: bool = False,
                 slots: list[WorkerSlot] | None = None):
        self.spec, self.run_device, self.header = spec, run_device, header
        self.isolate, self.cell_timeout_s, self.roofline = isolate, cell_timeout_s, roofline
        self.slots = slots
        self.settings: CellSettings | None = None

    def start(self) -> CellSettings:
        """Complete the header (peaks, notes) once, before the first cell; `measure` calls it too."""
        if self.settings is None:
            self.settings = start_run(self.spec, self.run_device, self.header, roofline=self.roofline,
                                      isolate=self.isolate, slots=self.slots)
        return self.settings

    def measure(self, cells: list[Cell], on_start: Callable[..., None] | None = None,
                on_row: Callable[[dict], None] | None = None) -> list[dict]:
        self.start()
        return run_sweep(cells, self.settings, on_row or (lambda row: None), isolate=self.isolate,
                         cell_timeout_s=self.cell_timeout_s, on_start=on_start, slots=self.slots)
