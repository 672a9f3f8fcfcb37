"""Run one cell in a fresh worker process, so that a crash, a segfault, a CUDA error that poisons the
context, or a hang becomes that row's status instead of ending the sweep.

The worker is started with `spawn` (a clean CUDA context and a clean peak-RSS per cell) and ignores SIGINT:
the parent decides what an interrupt means. A caller waiting in another thread (`ovqprof.pool`) can cancel
the wait; the worker is then killed and no row is made.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time

from ovqprof.cell import Cell, CellSettings, measure_cell
from ovqprof.rows import empty_row


def _child(conn, cell: Cell, settings: CellSettings) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    row = measure_cell(cell, settings)
    conn.send(row)
    conn.close()


# How often a cancellable wait looks at its cancel event (s): short enough for a prompt Ctrl-C.
CANCEL_POLL_S = 0.1


class CellCancelled(Exception):
    """The wait for a worker's row was cancelled (the sweep is stopping); the worker was killed."""


def _row_ready(recv, timeout_s: float | None, cancel: threading.Event | None) -> bool:
    """True when the worker sent its row or died, False past `timeout_s` seconds (None: no limit). Raises
    CellCancelled as soon as `cancel` is set."""
    if cancel is None:
        return recv.poll(timeout_s)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        if recv.poll(CANCEL_POLL_S if left is None else min(left, CANCEL_POLL_S)):
            return True
        if cancel.is_set():
            raise CellCancelled


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def measure_cell_isolated(cell: Cell, settings: CellSettings, timeout_s: float | None = None,
                          cancel: threading.Event | None = None) -> dict:
    """Like `measure_cell`, in a worker process; a dead worker gives status `error`, a worker past
    `timeout_s` seconds is killed and gives status `timeout`. Setting `cancel` (from another thread) kills
    the worker and raises CellCancelled."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, cell, settings), name=f"ovqprof-cell-{cell.layer.name}",
                       daemon=True)
    proc.start()
    send.close()
    try:
        if _row_ready(recv, timeout_s, cancel):
            try:
                row = recv.recv()
                proc.join()
                return row
            except EOFError:
                pass  # the worker died before sending its row
        else:
            proc.kill()
            proc.join()
            return _failed_row(cell, settings, "timeout",
                               f"cell exceeded the time limit of {timeout_s:g} s and was killed")
        proc.join()
        code = proc.exitcode
        how = f"killed by {_signal_name(code)}" if code is not None and code < 0 else f"exit code {code}"
        return _failed_row(cell, settings, "error", f"worker process died ({how}) before reporting")
    except BaseException:
        if proc.is_alive():
            proc.kill()
            proc.join()
        raise
    finally:
        recv.close()


def _failed_row(cell: Cell, settings: CellSettings, status: str, note: str) -> dict:
    return empty_row(layer=cell.layer.name, device=settings.device, dtype=cell.layer.dtype, mode=cell.mode,
                     seq=cell.seq, batch=cell.batch, status=status, note=note)
