"""Measure one cell (layer, mode, seq, batch): build, gate, time, track memory, and fill one result row.

`measure_cell` never raises for a failure of the measured code: out-of-memory becomes status `oom`, any
other exception status `error` with the message in `note`. Only KeyboardInterrupt propagates.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field

import torch

from ovqprof import registry
from ovqprof.gate import GateResult, check_decode_matches_forward
from ovqprof.layers.base import Cost, SequenceLayer
from ovqprof.measure.memory import MemoryTrackers
from ovqprof.measure.peaks import Peaks
from ovqprof.measure.timing import Timing, time_cpu, time_gpu, time_gpu_graph
from ovqprof.rows import NOTE_CPU_MEMORY, NOTE_NO_PEAKS, empty_row
from ovqprof.spec import LayerSpec, torch_dtype


@dataclass(frozen=True)
class Cell:
    """One measurement: `layer` in `mode` at sequence length (or decode context) `seq` and `batch`."""

    layer: LayerSpec
    mode: str
    seq: int
    batch: int

    @property
    def key(self) -> tuple:
        """The identity its row will have: `ovqprof.rows.cell_key` of that row."""
        return (self.layer.name, self.mode, self.seq, self.batch)


@dataclass(frozen=True)
class CellSettings:
    """How cells are measured: device (resolved, e.g. `cpu`, `cuda:0`), timing budgets in ms, the gate's
    prefix length, and the device peaks by dtype name for `% of roofline` (missing: column is null)."""

    device: str
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    check_seq: int = 64
    peaks: dict[str, Peaks] = field(default_factory=dict)


# Gate results, so each layer configuration is checked once per process:
# (layer spec as JSON, device, check_seq) -> result.
_GATE_CACHE: dict[tuple, GateResult] = {}


def classify_failure(exc: BaseException) -> str:
    """`oom` for every flavour of out-of-memory (torch CUDA, CPU allocator), else `error`. A Triton
    OutOfResources (a kernel's tiles exceed shared memory or registers) is a kernel configuration fault that
    no smaller workload avoids, so it is an `error`, not an `oom`."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom"
    text = str(exc).lower()
    if isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError)
    ):
        return "oom"
    return "error"


def failure_note(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    note = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return note if len(note) <= 300 else note[:297] + "..."


def build_cell_layer(spec: LayerSpec, device: torch.device) -> SequenceLayer:
    torch.manual_seed(0)  # the same weights for a layer in every cell and every run
    layer_type = registry.get_layer_type(spec.type)
    with torch.device(device):
        layer = registry.build_layer(layer_type, spec.d_model, spec.heads, spec.head_dim, dict(spec.options))
    return layer.to(dtype=torch_dtype(spec.dtype)).eval()


def _rates(row: dict, cost: Cost | None, timing: Timing, tokens: int, peaks: Peaks | None) -> list[str]:
    seconds = timing.median_ms * 1e-3
    row["tokens_per_s"] = tokens / seconds if seconds > 0 else None
    notes: list[str] = []
    if cost is None:
        notes.append("no cost model: tflops, gbps and % of roofline unknown")
        return notes
    row["flops"], row["bytes"] = float(cost.flops), float(cost.bytes)
    if seconds <= 0:
        return notes
    row["tflops"] = cost.flops / seconds / 1e12
    row["gbps"] = cost.bytes / seconds / 1e9
    if peaks is None:
        notes.append(NOTE_NO_PEAKS)
    else:
        compute_bound = cost.flops / peaks.matmul_flops_per_s >= cost.bytes / peaks.copy_bytes_per_s
        roofline_s = max(cost.flops / peaks.matmul_flops_per_s, cost.bytes / peaks.copy_bytes_per_s)
        pct = 100.0 * roofline_s / seconds
        spread = peaks.matmul_spread if compute_bound else peaks.copy_spread
        if pct > 100.0 * (1.0 + spread):
            # Faster than the measured peak by more than its own run-to-run spread: the peak is an
            # underestimate (or the cost model overcounts), so the figure is not a fraction of anything.
            notes.append(f"% of roofline measured {pct:.0f} (peak spread {100 * spread:.0f}%): clipped to 100")
            pct = 100.0
        row["pct_roofline"] = pct
    return notes


def _timer(settings: CellSettings, device: torch.device):
    if device.type == "cuda":
        return lambda fn, grads=None: time_gpu(fn, settings.warmup_ms, settings.rep_ms, grads)
    return lambda fn, grads=None: time_cpu(fn, settings.warmup_ms, settings.rep_ms, grad_to_none=grads)


def _time_decode(layer: SequenceLayer, cell: Cell, settings: CellSettings, device: torch.device,
                 trackers: MemoryTrackers, notes: list[str]) -> Timing:
    """Prefill to `seq` tokens (untimed), then time one step at that context. The step is replayed with
    the same input state, which the decode contract makes idempotent."""
    x = torch.randn(cell.batch, cell.seq, layer.d_model, device=device, dtype=layer.dtype)
    x_t = torch.randn(cell.batch, 1, layer.d_model, device=device, dtype=layer.dtype)
    with torch.no_grad():
        _, state = layer.prefill(x, capacity=cell.seq + 1)
        del x
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        trackers.start()

        def step() -> object:
            return layer.step(x_t, state)

        if device.type != "cuda":
            return time_cpu(step, settings.warmup_ms, settings.rep_ms)
        for _ in range(3):  # warm every lazy init and autotune before any capture
            step()
        if layer.supports_cuda_graph:
            try:
                return time_gpu_graph(step, settings.rep_ms)
            except Exception as exc:  # capture is an optimisation; eager timing is still a measurement
                notes.append(f"cuda graph capture failed, timed eagerly ({failure_note(exc)})")
        else:
            notes.append("layer step not graph-capturable: timed eagerly (includes launch overhead)")
        return time_gpu(step, settings.warmup_ms, settings.rep_ms)


def _time_forward(layer: SequenceLayer, cell: Cell, settings: CellSettings, device: torch.device,
                  trackers: MemoryTrackers) -> Timing:
    x = torch.randn(cell.batch, cell.seq, layer.d_model, device=device, dtype=layer.dtype)
    timer = _timer(settings, device)
    if cell.mode == "fwd":
        trackers.start()
        with torch.no_grad():
            return timer(lambda: layer(x))
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    trackers.start()
    return timer(lambda: layer(x).backward(dy), [x, *params])


def measure_cell(cell: Cell, settings: CellSettings) -> dict:
    """Run one cell and return its row (see `ovqprof.rows`)."""
    device = torch.device(settings.device)
    spec = cell.layer
    row = empty_row(layer=spec.name, device=str(device), dtype=spec.dtype, mode=cell.mode, seq=cell.seq,
                    batch=cell.batch, status="error")
    notes: list[str] = []
    layer = None
    trackers = MemoryTrackers(device)
    try:
        layer = build_cell_layer(spec, device)
        row["kind"] = layer.kind
        row["state_bytes"] = layer.state_bytes(cell.batch, cell.seq)
        if row["state_bytes"] is None:
            notes.append("state_bytes unknown: the layer has no state model")
        if cell.mode == "decode" and not layer.supports_decode:
            row.update(status="skipped", impl=layer.implementation(), check="n/a",
                       note="layer has no decode path (prefill/step)")
            return row
        gate_key = (spec.model_dump_json(), settings.device, settings.check_seq)
        if gate_key not in _GATE_CACHE:
            _GATE_CACHE[gate_key] = check_decode_matches_forward(layer, settings.check_seq)
        gate = _GATE_CACHE[gate_key]
        row["check"] = gate.label
        if gate.passed is False:
            notes.append(gate.message)
        if cell.mode == "decode":
            timing = _time_decode(layer, cell, settings, device, trackers, notes)
            tokens = cell.batch
        else:
            timing = _time_forward(layer, cell, settings, device, trackers)
            tokens = cell.batch * cell.seq
        memory = trackers.stop()
        row["impl"] = layer.implementation()  # after running: some layers pick their backend on first call
        row.update(ms_median=timing.median_ms, ms_p20=timing.p20_ms, ms_p80=timing.p80_ms, timer=timing.timer)
        row.update(memory.figures)
        notes.extend(n for n in memory.notes if device.type == "cuda")
        peaks = settings.peaks.get(spec.dtype)
        notes.extend(_rates(row, layer.cost(cell.mode, cell.batch, cell.seq), timing, tokens, peaks))
        row["status"] = "check_failed" if gate.passed is False else "ok"
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: B036 - a failing cell is data; SystemExit from user code included
        row["status"] = classify_failure(exc)
        if layer is not None and row["impl"] is None:
            row["impl"] = layer.implementation()
        notes.append(failure_note(exc))
    finally:
        trackers.close()  # a cell that failed mid-measurement must not leave the NVML sampler running
        del layer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type != "cuda":
        notes.append(NOTE_CPU_MEMORY)
    row["note"] = "; ".join(n for n in notes if n) or None
    _drop_nan(row)
    return row


def _drop_nan(row: dict) -> None:
    """JSON has no NaN; an undefined figure is null."""
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            row[key] = None
