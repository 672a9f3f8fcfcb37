"""One run of measurements, whatever the command: the plan built once from a spec and the flags, its typed
header, and the interrupt and write-error rule every command shares.

`RunPlan` holds what is decided before anything is measured (the spec with the command line's overrides, the
device, worker slots, whether cells run isolated and for how long). `RunPlan.start()` measures the device
peaks once and returns a `Run`: its frozen `RunHeader` (what a result file's `header` holds) and the cell
settings; `Run.measure` runs cells. sweep, baseline and check use it; capacity and distributed build their
headers with `RunHeader.begin`. `interruptible` maps Ctrl-C / SIGTERM and write errors to exit codes 130 and 4
with the messages the README documents.

Each layer in a header carries its options as written in the spec (`options`) and as validated, defaults
filled in (`resolved_options`): `check` compares the resolved ones, so a spec that spells out a default is
the same workload, and the report reads any option (the OVQ dictionary size) from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ovqprof.cell import Cell, CellSettings
from ovqprof.devices import WorkerSlot
from ovqprof.errors import EXIT_INTERRUPTED, InfrastructureError, UsageError
from ovqprof.rows import NOTE_CPU_MEMORY, NOTE_NO_PEAKS
from ovqprof.spec import LayerSpec, Spec, profile_label, torch_dtype


# --- layers as a header records them -----------------------------------------------------------------------
def resolved_options(layer: Mapping[str, Any]) -> dict[str, Any]:
    """A header layer's options with every default filled in: its `resolved_options` when the file has them,
    else its `options` validated by the layer type's options model (files written before they were stored),
    else its options as written (a custom module type, or options its model no longer accepts)."""
    if isinstance(layer.get("resolved_options"), dict):
        return dict(layer["resolved_options"])
    options = dict(layer.get("options") or {})
    from ovqprof import registry

    try:
        layer_type = registry.get_layer_type(str(layer.get("type")))
        model = registry.validate_options(layer_type, options)
    except Exception:  # noqa: BLE001 - an old or foreign file: compare what it says
        return options
    return model.model_dump(mode="json") if model is not None else options


def layer_record(layer: LayerSpec) -> dict[str, Any]:
    """A spec layer as a header lists it: name, type, dimensions, dtype, `options` as written and
    `resolved_options` (defaults filled in)."""
    record = layer.model_dump(mode="json", exclude={"line"})
    record["resolved_options"] = resolved_options(record)
    return record


# --- the header --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunHeader:
    """What a result file's `header` says about its run. `machine` is `machine_info(device)` (device, driver,
    versions, CPU); `command` holds a command's own fields (sweep: `isolate`; capacity: `method`, `settings`);
    `timing` (ms budgets), `peaks` (by dtype), `notes` and `devices` are left out of the file when None."""

    machine: Mapping[str, Any]
    date: str
    profile: str
    layers: tuple[Mapping[str, Any], ...]
    command: Mapping[str, Any] = field(default_factory=dict)
    timing: Mapping[str, Any] | None = None
    peaks: Mapping[str, Mapping[str, Any]] | None = None
    notes: tuple[str, ...] | None = None
    devices: tuple[str, ...] | None = None

    @classmethod
    def begin(cls, machine: Mapping[str, Any], spec: Spec, layers: tuple[LayerSpec, ...] | list[LayerSpec] | None
              = None, **command: Any) -> RunHeader:
        """A header dated now for `spec`'s layers (or `layers`), with the command's own fields."""
        return cls(machine=dict(machine), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   profile=profile_label(spec.file),
                   layers=tuple(layer_record(x) for x in (spec.layers if layers is None else layers)),
                   command=dict(command))

    def as_dict(self) -> dict[str, Any]:
        """The JSON header, keys as result files have always had them."""
        out: dict[str, Any] = {**self.machine, "date": self.date, "profile": self.profile, **self.command,
                               "layers": [dict(x) for x in self.layers]}
        for name in ("timing", "peaks"):
            if getattr(self, name) is not None:
                out[name] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in getattr(self, name).items()}
        if self.notes is not None:
            out["notes"] = list(self.notes)
        if self.devices is not None:
            out["devices"] = list(self.devices)
        return out


def spec_timing(spec: Spec) -> dict[str, Any]:
    """The timing budgets a header records (and `check` compares)."""
    return {"warmup_ms": spec.sweep.warmup_ms, "rep_ms": spec.sweep.rep_ms, "check_seq": spec.sweep.check_seq}


# --- the plan ----------------------------------------------------------------------------------------------
def decide_isolation(isolate: bool | None, cell_timeout_s: float | None, device: torch.device,
                     slots: list[WorkerSlot] | None) -> bool:
    """Whether cells run in worker processes: as asked, else on for a GPU; always with several --devices;
    --cell-timeout only with isolation (a cell in this process cannot be stopped safely)."""
    if slots and isolate is False:
        raise UsageError("--no-isolate with several --devices: each device's cells run in their own worker "
                         "processes. Allowed: --devices with --isolate (the default), or one --device")
    if isolate is None:
        isolate = bool(slots) or device.type == "cuda"
    if cell_timeout_s is not None and not isolate:
        raise UsageError("--cell-timeout needs --isolate (a cell in this process cannot be stopped safely)")
    return isolate


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before the first cell: the spec (overrides applied), the device, worker slots,
    isolation and its per-cell timeout (s), and whether device peaks are measured for `% of roofline`."""

    spec: Spec
    device: torch.device
    isolate: bool
    cell_timeout_s: float | None = None
    roofline: bool = True
    slots: tuple[WorkerSlot, ...] | None = None

    @classmethod
    def build(cls, spec: Spec, device: torch.device, *, isolate: bool | None, cell_timeout_s: float | None,
              roofline: bool = True, slots: list[WorkerSlot] | None = None) -> RunPlan:
        return cls(spec, device, decide_isolation(isolate, cell_timeout_s, device, slots), cell_timeout_s,
                   roofline, tuple(slots) if slots else None)

    @property
    def workers(self) -> int:
        return len(self.slots) if self.slots else 1

    def start(self, machine: Mapping[str, Any]) -> Run:
        """Measure the peaks (when `roofline`) and date the header; `machine` is `machine_info(device)`."""
        from ovqprof.measure.peaks import measure_peaks

        peaks = {}
        if self.roofline:
            for dtype_name in sorted({layer.dtype for layer in self.spec.layers}):
                peaks[dtype_name] = measure_peaks(self.device, torch_dtype(dtype_name))
        notes = [note for note, applies in ((NOTE_CPU_MEMORY, self.device.type != "cuda"),
                                            (NOTE_NO_PEAKS, not self.roofline)) if applies]
        if self.slots:
            notes += list(dict.fromkeys(slot.note for slot in self.slots if slot.note))
        header = dataclasses.replace(
            RunHeader.begin(machine, self.spec, isolate=self.isolate), timing=spec_timing(self.spec),
            peaks={k: v.as_dict() for k, v in peaks.items()}, notes=tuple(notes),
            devices=tuple(slot.label for slot in self.slots) if self.slots else None)
        settings = CellSettings(device=str(self.device), warmup_ms=self.spec.sweep.warmup_ms,
                                rep_ms=self.spec.sweep.rep_ms, check_seq=self.spec.sweep.check_seq, peaks=peaks)
        return Run(self, header, settings)


@dataclass(frozen=True)
class Run:
    """A started plan: its header and cell settings; `measure` runs cells as the plan says."""

    plan: RunPlan
    header: RunHeader
    settings: CellSettings

    def measure(self, cells: list[Cell], on_start: Callable[..., None] | None = None,
                on_row: Callable[[dict], None] | None = None) -> list[dict]:
        """Measure `cells` in order (or concurrently on the plan's slots); `on_start(cell[, slot])` as each
        begins, `on_row(row)` as each finishes. Returns the rows."""
        from ovqprof.sweep import run_sweep

        return run_sweep(cells, self.settings, on_row or (lambda row: None), isolate=self.plan.isolate,
                         cell_timeout_s=self.plan.cell_timeout_s, on_start=on_start,
                         slots=list(self.plan.slots) if self.plan.slots else None)


# --- interrupts and write errors ---------------------------------------------------------------------------
def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible(log: Callable[[str], None], interrupted: Callable[[], str],
                  write_failed: Callable[[OSError], str]) -> Iterator[None]:
    """Run a command's measurements with SIGTERM treated as Ctrl-C. An interrupt logs `interrupted()` (what
    was kept, how to resume) and exits 130; an OSError (disk full, a vanished output, a worker that cannot
    start) becomes InfrastructureError(`write_failed(exc)`), exit 4. The previous SIGTERM handler returns."""
    import typer

    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    except KeyboardInterrupt:
        log(interrupted())
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except OSError as exc:
        raise InfrastructureError(write_failed(exc)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def kept_rows(rows: list[dict], output, resume_command: Callable[[Any], str], total: int | None = None,
              after_write_error: str = "Free space or choose another --output, then continue with --resume."
              ) -> tuple[Callable[[], str], Callable[[OSError], str]]:
    """The `interrupted` and `write_failed` messages of a command that appends finished rows to `rows` (and
    to `output`): how many were kept and where, and how to resume."""
    of = f" of {total}" if total is not None else ""

    def interrupted() -> str:
        where = f" in {output}" if output else ""
        how = (f"Resume with: {resume_command(output)}" if output is not None else
               "Write rows to a file with --output FILE to be able to resume.")
        return f"interrupted: {len(rows)}{of} rows finished and kept{where}. {how}"

    def write_failed(exc: OSError) -> str:
        return (f"cannot write results to {output or 'stdout'} ({exc.strerror or exc}); {len(rows)}{of} rows "
                f"were finished before the failure. {after_write_error}")

    return interrupted, write_failed
