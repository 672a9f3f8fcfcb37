"""Measure a sweep's cells concurrently: one isolated worker at a time on each device slot.

A thread per slot takes the next cell from a shared queue and measures it with `measure_cell_isolated` (a
fresh worker process per cell, so a worker that dies or hangs costs only its cell's row, and the slot's next
cell gets a fresh worker). Rows go back to the calling thread, which alone calls `on_start` and `on_row`, so
writers and progress need no locks. Rows arrive in the order cells finish, not spec order.

Ctrl-C (KeyboardInterrupt in the calling thread) cancels the waits, kills the running workers, passes the
rows already finished to `on_row`, and re-raises.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable

from ovqprof.cell import Cell, CellSettings
from ovqprof.devices import WorkerSlot
from ovqprof.worker import CellCancelled, measure_cell_isolated

# How long a cancelled slot thread may take to kill its worker and stop (s).
_JOIN_S = 10.0


def _serve(slot: WorkerSlot, settings: CellSettings, todo: queue.SimpleQueue, events: queue.SimpleQueue,
           cancel: threading.Event, timeout_s: float | None) -> None:
    """One slot's loop: measure cells from `todo` until it is empty or `cancel` is set. Posts (kind, slot,
    payload) events: ("start", cell), ("row", row), ("failed", exception), and ("idle", None) last."""
    on_device = dataclasses.replace(settings, device=slot.device)
    try:
        while not cancel.is_set():
            try:
                cell = todo.get_nowait()
            except queue.Empty:
                break
            events.put(("start", slot, cell))
            try:
                row = measure_cell_isolated(cell, on_device, timeout_s, cancel=cancel)
            except CellCancelled:
                break
            row["device"] = slot.label
            if slot.note:
                row["note"] = "; ".join(n for n in (row["note"], slot.note) if n)
            events.put(("row", slot, row))
    except Exception as exc:  # noqa: BLE001 - e.g. a worker that cannot start: the caller raises it
        events.put(("failed", slot, exc))
    finally:
        events.put(("idle", slot, None))


def run_pool(cells: list[Cell], settings: CellSettings, slots: list[WorkerSlot], on_row: Callable[[dict], None],
             *, cell_timeout_s: float | None = None,
             on_start: Callable[[Cell, str], None] | None = None) -> list[dict]:
    """Measure every cell on the first free slot, calling `on_start(cell, slot label)` and `on_row(row)` in
    this thread; returns the rows in the order they finished. Each row's device is its slot's label."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for cell in cells:
        todo.put(cell)
    events: queue.SimpleQueue = queue.SimpleQueue()
    cancel = threading.Event()
    threads = [threading.Thread(target=_serve, args=(slot, settings, todo, events, cancel, cell_timeout_s),
                                name=f"ovqprof-slot-{slot.label}", daemon=True) for slot in slots]
    for thread in threads:
        thread.start()
    rows: list[dict] = []
    running = len(threads)
    try:
        while running:
            try:
                kind, slot, payload = events.get(timeout=1.0)  # a timeout keeps Ctrl-C prompt
            except queue.Empty:
                continue
            if kind == "start" and on_start is not None:
                on_start(payload, slot.label)
            elif kind == "row":
                on_row(payload)
                rows.append(payload)
            elif kind == "failed":
                raise payload
            elif kind == "idle":
                running -= 1
    except KeyboardInterrupt:
        _stop(cancel, threads)
        _keep_finished(events, on_row, rows)
        raise
    except BaseException:
        _stop(cancel, threads)
        raise
    return rows


def _stop(cancel: threading.Event, threads: list[threading.Thread]) -> None:
    """Cancel every slot's wait (each kills its worker) and wait for the threads to end."""
    cancel.set()
    for thread in threads:
        thread.join(_JOIN_S)


def _keep_finished(events: queue.SimpleQueue, on_row: Callable[[dict], None], rows: list[dict]) -> None:
    """Hand on the rows that finished before the interrupt but were not yet taken from the queue."""
    while True:
        try:
            kind, _, payload = events.get_nowait()
        except queue.Empty:
            return
        if kind == "row":
            on_row(payload)
            rows.append(payload)
