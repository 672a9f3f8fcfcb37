"""Named phases of a layer's call (projections, core, read, ...) for `ovqprof trace`.

`phase("core")` is a context manager: while tracing is on (`tracing()`, entered only by the trace run) it opens
a `torch.profiler.record_function` range named `ovqprof::core` (and an NVTX range of the same name on CUDA, so
Nsight Systems shows it too); otherwise it does nothing, so the timed runs of a sweep carry no profiling cost.
Phases nest: a phase opened inside another is its sub-phase in the breakdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PREFIX = "ovqprof::"
_state = {"on": False, "nvtx": False}


@contextlib.contextmanager
def tracing(nvtx: bool = False) -> Iterator[None]:
    """Turn phase ranges on for the block (NVTX ranges too with `nvtx`, for a CUDA run)."""
    before = dict(_state)
    _state.update(on=True, nvtx=nvtx)
    try:
        yield
    finally:
        _state.update(before)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A named phase of the enclosing call (see the module docstring)."""
    if not _state["on"]:
        yield
        return
    if _state["nvtx"]:
        torch.cuda.nvtx.range_push(PREFIX + name)
    try:
        with torch.profiler.record_function(PREFIX + name):
            yield
    finally:
        if _state["nvtx"]:
            torch.cuda.nvtx.range_pop()
