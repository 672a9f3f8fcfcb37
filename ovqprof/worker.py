"""Run one cell in a fresh worker process, so that a crash, a segfault, a CUDA error that poisons the
context, or a hang becomes that row's status instead of ending the sweep.

The worker is started with `spawn` (a clean CUDA context and a clean peak-RSS per cell) and ignores SIGINT:
the parent decides what an interrupt means.
"""

from __future__ import annotations

import multiprocessing as mp
import signal

from ovqprof.cell import Cell, CellSettings, measure_cell
from ovqprof.rows import empty_row


def _child(conn, cell: Cell, settings: CellSettings) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    row = measure_cell(cell, settings)
    conn.send(row)
    conn.close()


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def measure_cell_isolated(cell: Cell, settings: CellSettings, timeout_s: float | None = None) -> dict:
    """Like `measure_cell`, in a worker process; a dead worker gives status `error`, a worker past
    `timeout_s` seconds is killed and gives status `timeout`."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, cell, settings), name=f"ovqprof-cell-{cell.layer.name}",
                       daemon=True)
    proc.start()
    send.close()
    try:
        if recv.poll(timeout_s):
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
