"""`ovqprof distributed`: the settings from the spec and the flags, the cells, OVQ's single-device step,
resume, and rows to a writer.

Cells run world size by world size (one rank group per world size, restarted after a failed cell), then by
context, then by strategy. A failed cell is a row; the run goes on. KeyboardInterrupt propagates after the
ranks are killed and the writer has closed on the rows already written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from ovqprof.distributed.cost import available_memory_bytes, peak_bytes_estimate
from ovqprof.distributed.cost import bytes_sent as formula_bytes
from ovqprof.distributed.rows import (
    COLUMNS,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    cell_key,
    empty_row,
    layout,
    ranks_text,
)
from ovqprof.distributed.settings import BACKENDS, STRATEGY_NAMES, DistributedSettings
from ovqprof.errors import UsageError
from ovqprof.output import RowWriter, check_output_writable
from ovqprof.ranges import RangeError, parse_seq_range
from ovqprof.spec import LayerSpec, Spec, torch_dtype

MEMORY_SHARE = 0.6  # cells whose ranks together would hold more than this share of free RAM are skipped
GATE_TOLERANCE = 1e-12  # float64 relative error of a strategy against single-device SDPA


@dataclass(frozen=True)
class DistributedRequest:
    """The command line's choices; None means "as the spec says". `faults` (tests only): {(world_size,
    strategy, seq): (rank, "raise" | "exit" | "hang")}."""

    world_sizes: str | None = None
    strategies: str | None = None
    seq: str | None = None
    backend: str | None = None
    cell_timeout_s: float | None = None
    collective_timeout_s: float | None = None
    format: str = "table"
    output: Path | None = None
    resume: bool = False
    columns: list[str] | None = None
    show_progress: bool = False
    faults: dict = field(default_factory=dict)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{flag} {text!r} is not valid. Allowed: a comma list of integers >= 1, e.g. 1,2,4")
    return list(dict.fromkeys(values))


def distributed_settings(spec: Spec, request: DistributedRequest) -> DistributedSettings:
    """The spec's `distributed:` settings (defaults when it has none) with the flags applied."""
    settings = spec.distributed or DistributedSettings()
    changes: dict = {}
    if request.world_sizes is not None:
        changes["world_sizes"] = _ints(request.world_sizes, "--world-size")
    if request.strategies is not None:
        names = [s.strip() for s in request.strategies.split(",") if s.strip()]
        bad = [s for s in names if s not in STRATEGY_NAMES]
        if bad or not names:
            raise UsageError(f"--strategy {request.strategies!r} is not valid. Allowed: a comma list of "
                             f"{', '.join(STRATEGY_NAMES)}")
        changes["strategies"] = list(dict.fromkeys(names))
    if request.seq is not None:
        try:
            changes["seq"] = parse_seq_range(request.seq)
        except RangeError as exc:
            raise UsageError(f"--seq: {exc}") from None
    if request.backend is not None:
        if request.backend not in BACKENDS:
            raise UsageError(f"--backend {request.backend!r} is not known. Allowed: {', '.join(BACKENDS)}")
        changes["backend"] = request.backend
    for flag, key, value in (("--cell-timeout", "cell_timeout_s", request.cell_timeout_s),
                             ("--collective-timeout", "collective_timeout_s", request.collective_timeout_s)):
        if value is not None:
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{flag} {value} is not valid. Allowed: a number of seconds > 0")
            changes[key] = value
    try:
        return settings.replace(**changes)
    except ValidationError as exc:
        raise UsageError(f"invalid distributed settings: {exc.errors()[0]['msg']}") from None


def chosen_layers(spec: Spec, settings: DistributedSettings) -> tuple[LayerSpec, LayerSpec | None]:
    """The softmax layer to shard and the OVQ layer to compare with (None when the spec has none)."""
    softmax = [layer for layer in spec.layers if layer.type == "softmax_attention" and not layer.options.get("window")]
    ovq = [layer for layer in spec.layers if layer.type == "ovq"]
    if settings.layer is not None:
        softmax = [layer for layer in softmax if layer.name == settings.layer]
    if settings.ovq is not None:
        ovq = [layer for layer in ovq if layer.name == settings.ovq]
    if not softmax:
        raise UsageError(f"{spec.file} has no softmax_attention layer without a window to shard. Allowed: a spec "
                         "with one (see profiles/distributed.yaml)")
    return softmax[0], (ovq[0] if ovq else None)


def plan_cells(settings: DistributedSettings) -> list[tuple[int, int, str]]:
    """(world_size, seq, strategy) in run order."""
    return [(r, t, s) for r in settings.world_sizes for t in settings.seq for s in settings.strategies]


def distributed_header(header: dict, spec: Spec, settings: DistributedSettings, layers: list[LayerSpec]) -> dict:
    """The JSON header: machine_info plus the run's date, profile, settings, layers and CPU count."""
    from ovqprof.run import RunHeader

    return RunHeader.begin(header, spec, layers, command="distributed", settings=settings.model_dump(mode="json"),
                           cpu_count=os.cpu_count()).as_dict()


def merge_rank_results(results: list[dict], base: dict, settings: DistributedSettings, layer: LayerSpec,
                       world_size: int, strategy: str, seq: int) -> dict:
    """One row from every rank's figures: the slowest rank's timing, the busiest rank's bytes."""
    row = dict(base)
    slowest = max(results, key=lambda r: r["ms_median"])
    kv_heads = layer.options.get("kv_heads") or layer.heads
    el = torch.empty((), dtype=torch_dtype(layer.dtype)).element_size()
    formula = [formula_bytes(strategy, r, world_size, seq + 1, settings.batch, layer.heads, kv_heads,
                             layer.head_dim, el) for r in range(world_size)]
    counted = [r["bytes_sent"] for r in results]
    gate_error = max(r["gate_error"] for r in results)
    passed = gate_error <= GATE_TOLERANCE
    peaks = [r["mem_peak_bytes"] for r in results]
    notes = []
    if any(abs(c - f) > 0.5 for c, f in zip(counted, formula, strict=True)):
        notes.append(f"counted bytes {ranks_text(counted)} differ from the formula {ranks_text(formula)}")
    if not passed:
        notes.append(f"gate: relative error {gate_error:.3g} against single-device SDPA in float64 exceeds "
                     f"{GATE_TOLERANCE:g}")
    row.update(status="ok" if passed else "check_failed", check=f"{'ok' if passed else 'FAIL'} {gate_error:.1e}",
               ms_median=slowest["ms_median"], ms_p20=slowest["ms_p20"], ms_p80=slowest["ms_p80"],
               reps=slowest["reps"], ms_ranks=ranks_text([r["ms_median"] for r in results]),
               bytes_sent=max(counted), bytes_sent_formula=max(formula), bytes_sent_ranks=ranks_text(counted),
               mem_peak_bytes=None if None in peaks else max(peaks), mem_source=results[0]["mem_source"],
               mem_peak_ranks=ranks_text(["-" if p is None else p for p in peaks]),
               kv_shard_bytes=max(r["kv_shard_bytes"] for r in results),
               kv_shard_ranks=ranks_text([r["kv_shard_bytes"] for r in results]))
    if notes:
        row["note"] = "; ".join(filter(None, [row.get("note"), *notes]))
    return row


class OvqSteps:
    """OVQ's single-device decode step per context, measured once each in a fresh worker process (the
    sweep's own cell: prefill to T untimed, then the timed step), or taken from rows being resumed."""

    def __init__(self, layer: LayerSpec | None, settings: DistributedSettings, device: str, existing: list[dict]):
        self.layer, self.settings, self.device = layer, settings, device
        self.known: dict[int, dict] = {}
        for row in existing:
            if layer is not None and row.get("ovq_layer") == layer.name and row.get("ovq_ms") is not None:
                self.known[int(row["seq"])] = {"ovq_ms": row["ovq_ms"], "ovq_state_bytes": row["ovq_state_bytes"]}

    def at(self, seq: int) -> tuple[dict, str | None]:
        """({ovq_ms, ovq_state_bytes}, note)."""
        if self.layer is None:
            return {}, None
        if seq not in self.known:
            from ovqprof.cell import Cell, CellSettings
            from ovqprof.worker import measure_cell_isolated

            cell = Cell(self.layer, "decode", seq, self.settings.batch)
            row = measure_cell_isolated(cell, CellSettings(device=self.device, warmup_ms=self.settings.warmup_ms,
                                                           rep_ms=self.settings.rep_ms), self.settings.cell_timeout_s)
            figures = {"ovq_ms": row["ms_median"] if row["status"] in ("ok", "check_failed") else None,
                       "ovq_state_bytes": row["state_bytes"]}
            self.known[seq] = figures | ({} if figures["ovq_ms"] is not None else
                                         {"note": f"ovq step {row['status']}: {row['note']}"})
        figures = dict(self.known[seq])
        return {k: figures[k] for k in ("ovq_ms", "ovq_state_bytes")}, figures.get("note")


def resume_rows(path: Path) -> list[dict]:
    from ovqprof.resume import read_rows

    _, rows, _ = read_rows(path, "--resume", COLUMNS, INT_COLUMNS, FLOAT_COLUMNS)
    return rows


def run_distributed(spec: Spec, header: dict, request: DistributedRequest, rows: list[dict],
                    log: Callable[[str], None]) -> None:
    """Measure every planned cell not already in the resumed file, writing each row as it finishes and
    appending it to `rows`. UsageError for bad settings before anything runs."""
    from ovqprof.distributed.group import resolve_backend
    from ovqprof.distributed.rank import RankJob
    from ovqprof.progress import CellProgress

    settings = distributed_settings(spec, request)
    layer, ovq = chosen_layers(spec, settings)
    if request.output is not None:
        check_output_writable(request.output)
    existing = resume_rows(request.output) if request.resume else []
    done = {cell_key(r) for r in existing}
    cells = [c for c in plan_cells(settings) if (layer.name, c[0], c[2], c[1], settings.batch) not in done]
    if request.resume:
        log(f"resuming {request.output}: {len(existing)} rows already there, {len(cells)} cells to run")
    header = distributed_header(header, spec, settings, [x for x in (layer, ovq) if x is not None])
    ovq_device = "cuda" if resolve_backend(settings.backend, max(settings.world_sizes)) == "nccl" else "cpu"
    ovq_steps = OvqSteps(ovq, settings, ovq_device, existing)
    kv_heads = layer.options.get("kv_heads") or layer.heads
    writer = RowWriter(request.format, request.output, header, layout=layout(), existing_rows=existing,
                       columns=request.columns)
    progress = CellProgress(len(cells), quiet=not request.show_progress, what="distributed")
    groups = _RankGroups(settings)
    try:
        with writer, progress:
            for world_size, seq, strategy in cells:
                label = f"{layer.name} R={world_size} {strategy} T={seq}"
                progress.start(label)
                ovq_figures, ovq_note = ovq_steps.at(seq)
                base = empty_row(layer=layer.name, ovq_layer=ovq.name if ovq else None, world_size=world_size,
                                 strategy=strategy, backend=resolve_backend(settings.backend, world_size),
                                 dtype=layer.dtype, seq=seq, batch=settings.batch, heads=layer.heads,
                                 kv_heads=kv_heads, head_dim=layer.head_dim, note=ovq_note, **ovq_figures)
                too_big = _too_big_for_ram(strategy, world_size, seq, settings, layer, kv_heads)
                if too_big is not None:
                    row = dict(base, status="skipped", note="; ".join(filter(None, [too_big, base.get("note")])))
                else:
                    job = RankJob(layer, strategy, seq, settings.batch, seed=settings.seed,
                                  warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms, min_reps=settings.min_reps,
                                  max_reps=settings.max_reps, check_seq=settings.check_seq,
                                  fault=request.faults.get((world_size, strategy, seq)))
                    row = groups.measure(job, base, layer, world_size, strategy, seq)
                writer.write(row)
                rows.append(row)
                timing = f" {row['ms_median']:.3g} ms" if row.get("ms_median") else ""
                progress.done(label, row["status"] + timing)
    finally:
        groups.kill()


class _RankGroups:
    """One group of rank processes at a time, reused while the world size stays the same and its ranks live;
    a cell the group fails becomes a row with the failure's status and note."""

    def __init__(self, settings: DistributedSettings):
        self.settings = settings
        self.group = None

    def measure(self, job, base: dict, layer: LayerSpec, world_size: int, strategy: str, seq: int) -> dict:
        from ovqprof.distributed.group import GroupFailure, RankGroup

        settings = self.settings
        try:
            if self.group is not None and (self.group.world_size != world_size or not self.group.alive):
                self.group.close()
                self.group = None
            if self.group is None:
                self.group = RankGroup(world_size, settings.backend, settings.collective_timeout_s)
            base["device"] = self.group.devices[0]
            results = self.group.run(job, settings.cell_timeout_s)
            return merge_rank_results(results, base, settings, layer, world_size, strategy, seq)
        except GroupFailure as exc:
            return dict(base, status=exc.status, note="; ".join(filter(None, [exc.note, base.get("note")])))

    def kill(self) -> None:
        if self.group is not None:
            self.group.kill()


def _too_big_for_ram(strategy: str, world_size: int, seq: int, settings: DistributedSettings, layer: LayerSpec,
                     kv_heads: int) -> str | None:
    """Why a gloo cell on this machine would not fit in its free memory (all ranks share it), else None: a
    skipped row instead of a machine the kernel's OOM killer clears (other people's processes included)."""
    from ovqprof.distributed.group import resolve_backend

    free = available_memory_bytes()
    if free is None or resolve_backend(settings.backend, world_size) != "gloo":
        return None
    el = torch.empty((), dtype=torch_dtype(layer.dtype)).element_size()
    need = sum(peak_bytes_estimate(strategy, r, world_size, seq + 1, settings.batch, kv_heads, layer.head_dim, el)
               for r in range(world_size))
    if need <= MEMORY_SHARE * free:
        return None
    return (f"skipped: the {world_size} ranks would hold about {need / 2**30:.1f} GiB of KV tensors, more than "
            f"{MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB this machine has free")
