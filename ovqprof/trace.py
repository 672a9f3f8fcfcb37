"""Where a cell's time goes: one cell's call run under torch.profiler, written as a Chrome / Perfetto trace and
summarised as a breakdown by phase (the layers' `ovqprof.phases` marks) and by operator.

The traced calls are separate from the timed ones (a sweep's row timings never include profiling): after
`WARMUP_CALLS` untraced calls, `reps` calls run under the profiler, each inside an `ovqprof::cell` range whose
wall time is the cell's traced total. On CUDA every traced call ends with a synchronize inside that range
and phase and operator times are the device time of the kernels they launched; on the CPU they are CPU time.
Phases nest (e.g. OVQ's core holds read, assign and spawn, merge); the top-level phases and `other` (the
traced total minus their sum: glue between phases, allocator work) add up to the total, and a breakdown whose
top-level phases exceed the total by more than `PHASE_TOLERANCE` says so in its `note`.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ovqprof.cell import Cell, build_cell_layer
from ovqprof.errors import UsageError
from ovqprof.phases import PREFIX, tracing

WARMUP_CALLS = 2
PHASE_TOLERANCE = 0.05  # top-level phases may exceed the traced total by this fraction (timer granularity)
TOP_OPERATORS = 10
CELL_RANGE = PREFIX + "cell"


@dataclass
class BreakdownRow:
    """One line of a breakdown: a phase (`parent`: the enclosing phase, "" at top level), `other`, or an
    operator (self time). ms per traced call; pct of the cell's traced total."""

    layer: str
    mode: str
    seq: int
    batch: int
    kind: str  # "phase", "other" or "op"
    name: str
    parent: str
    ms: float
    calls: float
    pct: float


@dataclass
class Breakdown:
    """A traced cell: its total, its rows, the trace file and how times were taken."""

    cell: Cell
    total_ms: float
    rows: list[BreakdownRow] = field(default_factory=list)
    trace_file: str = ""
    clock: str = "cpu"  # "cpu" (CPU time) or "device" (kernel time on the GPU)
    note: str = ""

    def document(self) -> dict:
        """The JSON document of a breakdown file: {"header": {...}, "rows": [...]}."""
        c = self.cell
        header = dict(kind="breakdown", layer=c.layer.name, layer_type=c.layer.type, mode=c.mode, seq=c.seq,
                      batch=c.batch, total_ms=self.total_ms, clock=self.clock, trace_file=self.trace_file,
                      phase_tolerance=PHASE_TOLERANCE, note=self.note)
        return {"header": header, "rows": [asdict(r) for r in self.rows]}


def trace_stem(cell: Cell) -> str:
    """File name stem of a cell's trace: <layer>-<mode>-<seq>, plus -b<batch> when batch > 1."""
    stem = f"{cell.layer.name}-{cell.mode}-{cell.seq}"
    return stem if cell.batch == 1 else f"{stem}-b{cell.batch}"


def _cell_call(layer, cell: Cell, device: torch.device):
    """The call a cell times (see ovqprof.cell), as a function run under the profiler; prefill for decode
    runs here, untraced."""
    x_shape = (cell.batch, cell.seq, layer.d_model)
    if cell.mode == "decode":
        with torch.no_grad():
            _, state = layer.prefill(torch.randn(*x_shape, device=device, dtype=layer.dtype), capacity=cell.seq + 1)
        x_t = torch.randn(cell.batch, 1, layer.d_model, device=device, dtype=layer.dtype)

        def call():
            with torch.no_grad():
                layer.step(x_t, state)
        return call
    x = torch.randn(*x_shape, device=device, dtype=layer.dtype)
    if cell.mode == "fwd":
        def call():
            with torch.no_grad():
                layer(x)
        return call
    x.requires_grad_(True)
    dy = torch.randn_like(x)

    def call():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        y = layer(x)
        with record_function(PREFIX + "backward"):  # autograd's ops carry no phase of the layer's own
            y.backward(dy)
    return call


def trace_cell(cell: Cell, device: str, out_dir: Path, reps: int = 3) -> Breakdown:
    """Trace `reps` calls of `cell` on `device` into out_dir/<stem>.json.gz and return its breakdown (also
    written to out_dir/<stem>.breakdown.json). UsageError for a mode the layer cannot run; otherwise raises
    what the layer raises (the caller reports it)."""
    dev = torch.device(device)
    layer = build_cell_layer(cell.layer, dev)
    if cell.mode == "decode" and not layer.supports_decode:
        raise UsageError(f"cannot trace {cell.layer.name} decode at T={cell.seq}: layer {cell.layer.name!r} "
                         f"({cell.layer.type}) has no decode path. Allowed: a mode the layer runs (fwd, bwd)")
    call = _cell_call(layer, cell, dev)
    cuda = dev.type == "cuda"
    for _ in range(WARMUP_CALLS):
        call()
    if cuda:
        torch.cuda.synchronize(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with tracing(nvtx=cuda), profile(activities=activities) as prof:
        for _ in range(reps):
            with record_function(CELL_RANGE):
                call()
                if cuda:
                    torch.cuda.synchronize(dev)
    stem = trace_stem(cell)
    trace_path = out_dir / f"{stem}.json.gz"
    prof.export_chrome_trace(str(trace_path))
    breakdown = summarise(prof, cell, reps, "device" if cuda else "cpu")
    breakdown.trace_file = trace_path.name
    (out_dir / f"{stem}.breakdown.json").write_text(json.dumps(breakdown.document(), indent=1) + "\n")
    return breakdown


def _time(event, clock: str, self_only: bool = False) -> float:
    """An event's time in µs on `clock`."""
    if clock == "device":
        return event.self_device_time_total if self_only else event.device_time_total
    return event.self_cpu_time_total if self_only else event.cpu_time_total


def summarise(prof, cell: Cell, reps: int, clock: str) -> Breakdown:
    """The breakdown of a finished profile whose calls each ran inside a CELL_RANGE."""
    events = prof.events()
    cells = [e for e in events if e.name == CELL_RANGE]
    total_us = sum(e.time_range.elapsed_us() for e in cells)
    phases: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    order: list[tuple[str, str]] = []

    def walk(event, parent: str) -> None:
        for child in event.cpu_children:
            if child.name.startswith(PREFIX):
                key = (child.name[len(PREFIX):], parent)
                if key not in phases:
                    order.append(key)
                phases[key][0] += _time(child, clock) if clock == "device" else child.time_range.elapsed_us()
                phases[key][1] += 1
                walk(child, key[0])
            else:
                walk(child, parent)

    for c in cells:
        walk(c, "")
    per_call = 1e-3 / reps  # µs over all reps -> ms per call
    total_ms = total_us * per_call
    out = Breakdown(cell, total_ms, clock=clock)

    def row(kind: str, name: str, parent: str, ms: float, calls: float) -> BreakdownRow:
        pct = 100.0 * ms / total_ms if total_ms > 0 else 0.0
        return BreakdownRow(cell.layer.name, cell.mode, cell.seq, cell.batch, kind, name, parent, ms, calls, pct)

    top = 0.0
    for name, parent in order:
        us, calls = phases[(name, parent)]
        out.rows.append(row("phase", name, parent, us * per_call, calls / reps))
        top += us * per_call if not parent else 0.0
    if phases:
        out.rows.append(row("other", "other", "", max(total_ms - top, 0.0), 0))
        if top > total_ms * (1 + PHASE_TOLERANCE):
            out.note = (f"top-level phases sum to {top:.3g} ms, more than the traced total {total_ms:.3g} ms "
                        f"by over {PHASE_TOLERANCE:.0%}")
    else:
        out.note = "the layer marks no phases: operators only"
    ops = [a for a in prof.key_averages() if not a.key.startswith(PREFIX)]
    ops.sort(key=lambda a: -_time(a, clock, self_only=True))
    for a in ops[:TOP_OPERATORS]:
        out.rows.append(row("op", a.key, "", _time(a, clock, self_only=True) * per_call, a.count / reps))
    return out


def read_breakdown(path: Path) -> dict:
    """A breakdown file's document (see Breakdown.document); ValueError when it is not one."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable breakdown file ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("header", {}).get("kind") != "breakdown":
        raise ValueError(f"{path}: not a breakdown file (written by `ovqprof trace`)")
    return doc


def trace_events(path: Path) -> list[dict]:
    """The trace events of a gzip Chrome trace (what ui.perfetto.dev and chrome://tracing open)."""
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


def trace_ok_cells(cells, rows: list[dict], device: str, trace_dir: Path, log) -> None:
    """`sweep --trace`: trace the cells whose rows are ok, after the timed sweep; a trace that fails is
    reported with `log` and skipped (the sweep's rows are already written)."""
    from ovqprof.rows import cell_key

    ok = {cell_key(r) for r in rows if r["status"] == "ok"}
    traced = 0
    for cell in cells:
        if cell.key not in ok:
            continue
        try:
            trace_cell(cell, device, trace_dir)
            traced += 1
        except Exception as exc:  # noqa: BLE001 - a failed trace must not lose the sweep's rows
            log(f"trace of {cell.layer.name} {cell.mode} T={cell.seq} failed: {exc}")
    log(f"traced {traced} cells into {trace_dir}")


def trace_cells(spec, device: str, out_dir: Path, reps: int) -> list:
    """Trace every planned cell of `spec` (a cell the layer cannot run is trace_cell's UsageError)."""
    from ovqprof.sweep import plan_cells

    return [trace_cell(cell, device, out_dir, reps) for cell in plan_cells(spec)]
