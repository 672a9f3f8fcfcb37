"""`ovqprof capacity`: settings from the spec and the flags, the chosen method, rows to a writer.

The CLI function only parses flags and maps interrupts and write failures to exit codes; everything else
(validating the flags against the spec's `capacity:` section, the JSON header, running the probe or MQAR,
the summary) is here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from ovqprof.capacity.rows import (
    COLUMNS,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    INTERRUPTED_NOTE,
    METHODS,
    layout,
)
from ovqprof.capacity.settings import KEY_KINDS, PAIRS_FORMS, ProbeSettings
from ovqprof.errors import SpecError, UsageError
from ovqprof.output import RowWriter, check_output_writable
from ovqprof.ranges import RangeError, parse_seq_range
from ovqprof.resume import read_rows
from ovqprof.spec import Spec


@dataclass(frozen=True)
class CapacityRequest:
    """The command line's choices; None means "as the spec says"."""

    method: str = "probe"
    pairs: str | None = None
    keys: str | None = None
    gap: int | None = None
    seeds: str | None = None
    dims: int | None = None
    format: str = "table"
    output: Path | None = None
    show_progress: bool = False
    layers_from_cli: bool = False  # --layers was given: it wins over capacity.mqar.layers
    resume: bool = False  # `output` is an earlier result file: skip what it holds, append the rest
    columns: list[str] | None = None  # --columns: the table's headers


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UsageError(f"--method {method!r} is not known. Allowed: {', '.join(METHODS)}")


def probe_settings(spec: Spec, request: CapacityRequest) -> ProbeSettings:
    """The spec's `capacity.probe` settings with the flags applied; UsageError names a bad flag."""
    changes: dict = {}
    if request.pairs is not None:
        try:
            changes["pairs"] = parse_seq_range(request.pairs)
        except RangeError as exc:
            raise UsageError(f"--pairs {request.pairs!r} is not valid: {exc.reason}. Allowed: {PAIRS_FORMS}") \
                from None
    if request.keys is not None:
        if request.keys not in KEY_KINDS:
            raise UsageError(f"--keys {request.keys!r} is not known. Allowed: {', '.join(KEY_KINDS)}")
        changes["keys"] = request.keys
    if request.gap is not None:
        if request.gap < 0:
            raise UsageError(f"--gap {request.gap} is not valid. Allowed: an integer >= 0 (filler pairs)")
        changes["gap"] = request.gap
    if request.seeds is not None:
        try:
            seeds = [int(s) for s in request.seeds.split(",") if s.strip()]
        except ValueError:
            seeds = []
        if not seeds:
            raise UsageError(f"--seeds {request.seeds!r} is not valid. Allowed: a comma list of integers, e.g. 0,1")
        changes["seeds"] = seeds
    if request.dims is not None:
        if request.dims < 1:
            raise UsageError(f"--dims {request.dims} is not valid. Allowed: an integer >= 1 (dk = dv)")
        changes["dims"] = request.dims
    return spec.capacity.probe.replace(**changes)


def mqar_settings(spec: Spec, request: CapacityRequest):
    """The spec's `capacity.mqar` mapping validated by MQARSettings (SpecError at its line when invalid)."""
    given = [flag for flag, value in (("--pairs", request.pairs), ("--keys", request.keys), ("--gap", request.gap),
                                      ("--seeds", request.seeds), ("--dims", request.dims)) if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} set(s) the probe; --method mqar takes its settings from the spec's "
                         "capacity.mqar section. Allowed: these flags with --method probe only")
    try:
        from ovqprof.capacity.mqar import MQARSettings
    except ImportError as exc:
        raise UsageError(f"--method mqar is not available: {exc}. Allowed: --method probe") from None
    raw = spec.capacity.mqar or {}
    try:
        return MQARSettings.model_validate(raw)
    except ValidationError as exc:
        raise _mqar_error(spec, exc, MQARSettings) from None


def mqar_layers(spec: Spec, settings, request: CapacityRequest) -> list:
    """The spec's layers MQAR trains: all, those of `capacity.mqar.layers`, or the command line's --layers."""
    if settings.layers is None or request.layers_from_cli:
        return list(spec.layers)
    names = [layer.name for layer in spec.layers]
    unknown = [name for name in settings.layers if name not in names]
    if unknown:
        raise UsageError(f"{spec.file}: capacity.mqar.layers names {', '.join(unknown)}, not a layer of the spec. "
                         f"Allowed: names from the spec's layers: {', '.join(names)}")
    return [layer for layer in spec.layers if layer.name in settings.layers]


def _mqar_error(spec: Spec, exc: ValidationError, model: type) -> SpecError:
    """The first error of MQARSettings as a SpecError at the line of its key in `capacity.mqar`."""
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"]]
    lines = spec.capacity.mqar_lines
    line = lines.get(loc[0] if loc else "", lines.get(""))
    field = ".".join(["capacity", "mqar", *loc])
    if err["type"] == "extra_forbidden":
        return SpecError(f"unknown key {loc[-1]!r}", file=spec.file, line=line, field=field,
                         allowed=", ".join(model.model_fields))
    top = model.model_fields.get(loc[0]) if loc else None
    problem = err["msg"].removeprefix("Value error, ")
    return SpecError(problem[:1].lower() + problem[1:], file=spec.file, line=line, field=field,
                     value=err.get("input") if loc else None, allowed=top.description if top else None)


def capacity_header(header: dict, spec: Spec, method: str, settings: object) -> dict:
    """The JSON header: machine_info plus the run's date, profile, method, settings and layers (with their
    resolved options, `ovqprof.run.RunHeader`)."""
    from ovqprof.run import RunHeader

    dumped = settings.model_dump(mode="json") if hasattr(settings, "model_dump") else None
    return RunHeader.begin(header, spec, method=method, settings=dumped).as_dict()


def run_capacity(spec: Spec, device: torch.device, header: dict, request: CapacityRequest, rows: list[dict],
                 log: Callable[[str], None]) -> None:
    """Run the request's method over the spec's layers, writing each row as it is handed over and
    appending it to `rows` (so an interrupted run still knows what it kept). Raises UsageError/SpecError
    for bad settings before anything runs; KeyboardInterrupt and OSError propagate after the writer closed."""
    check_method(request.method)
    settings = probe_settings(spec, request) if request.method == "probe" else mqar_settings(spec, request)
    if request.output is not None:
        check_output_writable(request.output)
    header = capacity_header(header, spec, request.method, settings)
    existing: list[dict] = []
    done: frozenset = frozenset()
    if request.resume:
        existing, done = resume_rows(request.output, request.method)
        log(f"resuming {request.output}: {len(existing)} rows already there")
    writer = RowWriter(request.format, request.output, header, layout=layout(), existing_rows=existing,
                       columns=request.columns)

    def on_row(row: dict) -> None:
        writer.write(row)
        rows.append(row)

    if request.show_progress:
        from ovqprof.output import run_header_lines

        log("\n".join(run_header_lines(header)))
    with writer:
        if request.method == "probe":
            from ovqprof.capacity.probe import run_probe
            from ovqprof.progress import CellProgress

            todo = [layer for layer in spec.layers if layer.name not in done]
            progress = CellProgress(len(todo) * len(settings.pairs), quiet=not request.show_progress,
                                    what="probe")

            def on_start(layer: str, pairs: int) -> None:
                progress.start(f"probe {layer} pairs={pairs}")

            def on_probe_row(row: dict) -> None:
                on_row(row)
                acc = row.get("accuracy")
                progress.done(f"probe {row['layer']} pairs={row['pairs']}",
                              row["status"] + (f" acc {acc:.3f}" if isinstance(acc, float) else ""))

            with progress:
                run_probe(todo, settings, device, on_probe_row, on_start)
        else:
            from ovqprof.capacity.mqar import run_mqar

            run_mqar(mqar_layers(spec, settings, request), settings, device, on_row, request.show_progress,
                     skip=done)


def resume_rows(path: Path, method: str) -> tuple[list[dict], frozenset]:
    """The rows of an earlier capacity file to keep, and what they cover: probe layer names whose rows are
    complete, or MQAR (layer, seq, pairs). A probe layer cut short by an interrupt (its rows carry
    INTERRUPTED_NOTE) is dropped from the file and probed again. Refuses a file of the other method."""
    fmt, rows, header = read_rows(path, "--resume", COLUMNS, INT_COLUMNS, FLOAT_COLUMNS)
    methods = {r["method"] for r in rows} | ({header["method"]} if header and header.get("method") else set())
    if methods - {method}:
        raise UsageError(f"--resume {path} holds {', '.join(sorted(methods))} rows, not {method}. Allowed: a "
                         f"file written by `ovqprof capacity --method {method} --output`")
    if method == "mqar":
        return rows, frozenset((r["layer"], r["seq"], r["pairs"]) for r in rows)
    cut = {r["layer"] for r in rows if r["note"] == INTERRUPTED_NOTE}
    kept = [r for r in rows if r["layer"] not in cut]
    if len(kept) != len(rows):  # rewrite the file without the partial layer before appending to it
        with RowWriter(fmt, path, header or {}, layout=layout()) as writer:
            for row in kept:
                writer.write(row)
    return kept, frozenset(r["layer"] for r in kept)
