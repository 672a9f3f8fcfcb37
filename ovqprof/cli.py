"""The `ovqprof` command line: thin wiring of specs, the sweep, writers and machine info.

Errors meant for the user (OvqprofError) print one paragraph and exit 2 without a traceback; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ovqprof.errors import EXIT_INTERRUPTED, OvqprofError, UsageError
from ovqprof.output import (
    FORMATS,
    SWEEP_LAYOUT,
    RowWriter,
    check_json_output,
    check_output_dir,
    check_output_writable,
    run_header_lines,
    select_columns,
)
from ovqprof.progress import CellProgress, cell_budget_s
from ovqprof.resume import resume_target
from ovqprof.rows import STATUSES
from ovqprof.run_spec import default_profile, load_run_spec, split_list

app = typer.Typer(
    help="Profile attention-like layers (OVQ-attention and its rivals): speed, memory and recall capacity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # messages stay one paragraph

EXIT_OK, EXIT_FAILED_ROWS, EXIT_USAGE = 0, 1, 2
DEBUG_HELP = "Show the full traceback of an error instead of a one-paragraph message."
DEVICES_HELP = ("Comma list of devices measuring cells at once, one isolated worker each: cuda:0,cuda:1 (cpu,cpu "
                "to test; its timings share cores). One device is --device.")

# Options several commands share, declared once (typer reads them from the annotations).
RunProfile = Annotated[str | None, typer.Option("--profile", "-p", help="YAML spec: a path or a name in profiles/ "
                                                "(default: default.yaml on a GPU, quick.yaml otherwise).")]
Isolate = Annotated[bool | None, typer.Option("--isolate/--no-isolate", help="Run each cell in a fresh worker "
                                              "process (default: on for GPU and --devices, off for CPU).")]
Roofline = Annotated[bool, typer.Option("--roofline/--no-roofline", help="Measure device peaks for the % of "
                                        "roofline column.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No run header or progress on stderr (a bar with an "
                                     "ETA in a terminal, one line per finished cell otherwise).")]
Debug = Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)]



def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def user_errors(fn):
    """Turn OvqprofError into a one-paragraph message and exit 2 (re-raised with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OvqprofError as exc:
            if kwargs.get("debug"):
                raise
            raise _fail(str(exc), exc.exit_code) from None

    return wrapper


def _resume_command(output: Path) -> str:
    """This command line with --output/--resume replaced by `--resume output`."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("--output", "-o", "--resume"):
            skip = True
            continue
        if arg.startswith(("--output=", "--resume=")):
            continue
        args.append(shlex.quote(arg))
    return " ".join(["ovqprof", *args, "--resume", shlex.quote(str(output))])


def _warn_shared_gpu(header: dict) -> None:
    if header.get("gpu_other_processes"):
        err_console.print(f"[yellow]warning:[/] other processes hold memory on this GPU "
                          f"({header['gpu_other_processes']}); device-wide NVML figures include their changes")


@app.command()
@user_errors
def sweep(
    profile: RunProfile = None,
    seq: str | None = typer.Option(None, help="Sequence lengths, overriding the spec: 1k..64k (powers of "
                                      "two), 512..4k:x2, 1k..8k:+1k, 1k,3k,8k (k = 1024)."),
    modes: str | None = typer.Option(None, help="Comma list of modes, overriding the spec: fwd,bwd,decode."),
    batch: str | None = typer.Option(None, help="Comma list of batch sizes, overriding the spec."),
    layers: str | None = typer.Option(None, help="Comma list of layer names from the spec to run."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N (overrides defaults.device)."),
    devices: str | None = typer.Option(None, "--devices", help=DEVICES_HELP),
    format: str = typer.Option("table", "--format", "-f", help=f"Output format: {', '.join(FORMATS)}."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write rows to this file as they "
                                          "finish (default: stdout)."),
    isolate: Isolate = None,
    cell_timeout: float | None = typer.Option(None, help="Seconds before an isolated cell is killed and "
                                                 "reported as status timeout."),
    roofline: Roofline = True,
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted sweep: skip the "
                                          "cells already in this CSV or JSON file and append the rest to it."),
    columns: str | None = typer.Option(None, "--columns", help="Comma list of table columns to show (table and "
                                          "md formats; default: all, a terminal hiding some to fit its width)."),
    quiet: Quiet = False,
    trace_dir: Path | None = typer.Option(None, "--trace", help="Also trace every successful cell into this "
                                             "directory (as `ovqprof trace`; separate calls, timings unchanged)."),
    debug: Debug = False,
) -> None:
    """Measure every (layer, mode, seq, batch) cell of a spec and write one row per cell."""
    from ovqprof.devices import devices_option
    from ovqprof.machine import machine_info
    from ovqprof.resume import cells_to_run, sweep_resume
    from ovqprof.run import RunPlan, interruptible, kept_rows
    from ovqprof.trace import trace_ok_cells

    _check_format(format, FORMATS)
    select_columns(SWEEP_LAYOUT, split_list(columns))  # before any measurement
    device, slots = devices_option(devices, device)
    spec, run_device = load_run_spec(profile, seq, modes, batch, layers, device, _log)
    machine = machine_info(run_device)
    output, format, existing = sweep_resume(resume, output, format, machine)
    if output is not None:
        check_output_writable(output)
    if trace_dir is not None:
        check_output_dir(trace_dir, "for traces", "--trace")
    plan = RunPlan.build(spec, run_device, isolate=isolate, cell_timeout_s=cell_timeout, roofline=roofline,
                         slots=slots)
    run = plan.start(machine)
    header = run.header.as_dict()
    _warn_shared_gpu(header)
    cells = cells_to_run(spec, resume, existing, _log)
    writer = RowWriter(format, output, header, existing_rows=existing, columns=split_list(columns))
    progress = CellProgress(len(cells), quiet=quiet, budget_s=cell_budget_s(spec), workers=plan.workers)
    progress.header(run_header_lines(header))
    rows: list[dict] = []
    with interruptible(_log, *kept_rows(rows, output, _resume_command, total=len(cells))), writer, progress:
        def on_row(row: dict) -> None:
            writer.write(row)
            rows.append(row)
            progress.row_finished(row)

        run.measure(cells, on_start=progress.cell_started, on_row=on_row)
    if trace_dir is not None:
        trace_ok_cells(cells, rows, str(run_device), trace_dir, _log)
    _finish(rows, output, "cells")


def _check_format(format: str, allowed) -> None:
    if format not in allowed:
        raise UsageError(f"--format {format!r} is not known. Allowed: {', '.join(allowed)}")


def _finish(rows: list[dict], output: Path | None, what: str, statuses: tuple[str, ...] | None = None) -> None:
    """Say where the rows went and how they ended; exit 1 when any failed (error, check_failed, timeout)."""
    from ovqprof.rows import any_failed, status_summary

    text = status_summary(rows, statuses or STATUSES)
    if output is not None:
        err_console.print(f"wrote {len(rows)} rows to {output} ({text})", markup=False)
    if any_failed(rows):
        err_console.print(f"[red]some {what} failed[/] ({text}); see the status and note columns")
        raise typer.Exit(EXIT_FAILED_ROWS)


def _log(text: str) -> None:
    err_console.print(text, markup=False)


@app.command()
@user_errors
def capacity(
    profile: str | None = typer.Option(None, "--profile", "-p", help="YAML spec: a path or a name in "
                                          "profiles/ (default: capacity.yaml on a GPU, capacity-quick.yaml "
                                          "otherwise)."),
    method: str = typer.Option("probe", help="probe (training-free associative-memory probe) or mqar "
                                  "(trained multi-query associative recall)."),
    pairs: str | None = typer.Option(None, help="Stored pairs N, overriding capacity.probe.pairs: 16..16k "
                                        "(powers of two), 64..4k:x2, 100,200 (k = 1024)."),
    keys: str | None = typer.Option(None, help="Probe keys: gaussian or clustered."),
    gap: int | None = typer.Option(None, help="Filler pairs written between the stored pairs and the reads."),
    seeds: str | None = typer.Option(None, help="Comma list of seeds to average over, e.g. 0,1."),
    dims: int | None = typer.Option(None, help="Key and value dimension dk = dv (default: each layer's "
                                       "head_dim)."),
    layers: str | None = typer.Option(None, help="Comma list of layer names from the spec to run."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N (overrides defaults.device)."),
    format: str = typer.Option("table", "--format", "-f", help=f"Output format: {', '.join(FORMATS)}."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write rows to this file as they "
                                          "finish (default: stdout)."),
    columns: str | None = typer.Option(None, "--columns", help="Comma list of table columns to show (table and "
                                          "md formats; default: all, a terminal hiding some to fit its width)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted run: skip the layers "
                                          "(probe) or tasks (mqar) already in this CSV or JSON file, append "
                                          "the rest."),
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Recall capacity: accuracy against stored pairs N, and capacity@tau, for every layer of a spec."""
    from ovqprof.capacity.command import CapacityRequest, check_method, run_capacity
    from ovqprof.capacity.rows import STATUSES as CAPACITY_STATUSES
    from ovqprof.machine import machine_info
    from ovqprof.run import interruptible, kept_rows

    _check_format(format, FORMATS)
    check_method(method)
    if profile is None:
        default, why = default_profile()
        profile = "capacity" if default == "default" else "capacity-quick"
        _log(f"no --profile given: using {profile}.yaml ({why})")
    spec, run_device = load_run_spec(profile, None, None, None, layers, device, _log)
    output, format = resume_target(resume, output, format)
    request = CapacityRequest(method=method, pairs=pairs, keys=keys, gap=gap, seeds=seeds, dims=dims,
                              format=format, output=output, show_progress=not quiet,
                              layers_from_cli=layers is not None, resume=resume is not None,
                              columns=split_list(columns))
    rows: list[dict] = []
    messages = kept_rows(rows, output, _resume_command, after_write_error="Free space or choose another --output.")
    with interruptible(_log, *messages):
        run_capacity(spec, run_device, machine_info(run_device), request, rows, log=_log)
    _finish(rows, output, "rows", CAPACITY_STATUSES)


@app.command("distributed")
@user_errors
def distributed_cmd(
    profile: str = typer.Option("distributed", "--profile", "-p", help="YAML spec with a softmax_attention "
                                "layer and a `distributed:` section (default: profiles/distributed.yaml)."),
    world_size: str | None = typer.Option(None, "--world-size", help="Comma list of rank counts R, overriding "
                                             "distributed.world_sizes, e.g. 1,2,4."),
    strategy: str | None = typer.Option(None, "--strategy", help="Comma list of tree, ring, allgather, "
                                           "overriding distributed.strategies."),
    seq: str | None = typer.Option(None, help="Decode contexts, overriding distributed.seq (as for sweep)."),
    backend: str | None = typer.Option(None, help="auto (nccl with a GPU per rank, else gloo), gloo or nccl."),
    cell_timeout: float | None = typer.Option(None, help="Seconds before a cell's ranks are killed (status "
                                                 "timeout)."),
    collective_timeout: float | None = typer.Option(None, help="Seconds a collective waits for a missing rank "
                                                       "before failing."),
    format: str = typer.Option("table", "--format", "-f", help=f"Output format: {', '.join(FORMATS)}."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write rows to this file as they "
                                          "finish (default: stdout)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted run: skip the cells "
                                          "already in this CSV or JSON file and append the rest to it."),
    columns: str | None = typer.Option(None, "--columns", help="Comma list of table columns to show."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No run header or progress on stderr."),
    debug: Debug = False,
) -> None:
    """Decode with the KV cache sharded over R ranks (torch.distributed): tree, ring and all-gather
    attention, one row per (world size, strategy, context), with OVQ's single-device step beside them."""
    from ovqprof.distributed.command import DistributedRequest, run_distributed
    from ovqprof.distributed.rows import STATUSES as DISTRIBUTED_STATUSES
    from ovqprof.distributed.rows import layout
    from ovqprof.machine import machine_info
    from ovqprof.run import interruptible, kept_rows

    _check_format(format, FORMATS)
    select_columns(layout(), split_list(columns))
    spec, run_device = load_run_spec(profile, None, None, None, None, "cpu", _log)
    output, format = resume_target(resume, output, format)
    request = DistributedRequest(world_sizes=world_size, strategies=strategy, seq=seq, backend=backend,
                                 cell_timeout_s=cell_timeout, collective_timeout_s=collective_timeout,
                                 format=format, output=output, resume=resume is not None,
                                 columns=split_list(columns), show_progress=not quiet)
    rows: list[dict] = []
    with interruptible(_log, *kept_rows(rows, output, _resume_command)):
        run_distributed(spec, machine_info(run_device), request, rows, log=_log)
    _finish(rows, output, "cells", DISTRIBUTED_STATUSES)


@app.command("baseline")
@user_errors
def baseline_cmd(
    profile: RunProfile = None,
    seq: str | None = typer.Option(None, help="Sequence lengths, overriding the spec (as for sweep)."),
    modes: str | None = typer.Option(None, help="Comma list of modes, overriding the spec: fwd,bwd,decode."),
    batch: str | None = typer.Option(None, help="Comma list of batch sizes, overriding the spec."),
    layers: str | None = typer.Option(None, help="Comma list of layer names from the spec to run."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N (overrides defaults.device)."),
    devices: str | None = typer.Option(None, "--devices", help=DEVICES_HELP),
    isolate: Isolate = None,
    cell_timeout: float | None = typer.Option(None, help="Seconds before an isolated cell is killed."),
    roofline: Roofline = True,
    repeats: int | None = typer.Option(None, "--repeats", help="Rounds: every cell measured this many times, "
                                       "the whole list each round; check compares with the slowest and fastest "
                                       "round (default 3 on a CPU, 1 on a GPU)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Baseline file to write (default: "
                                          "<profile>-<device>.json in the current directory)."),
    from_file: Path | None = typer.Option(None, "--from", help="Record the rows of a finished JSON result "
                                             "(sweep --format json, check --output) instead of measuring."),
    allow_failed: bool = typer.Option(False, "--allow-failed", help="Record even when cells failed (error, "
                                      "check_failed, timeout); check does not compare those cells."),
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Record a baseline for `ovqprof check`: a sweep's rows with the machine header, as JSON."""
    from ovqprof import baseline as recording

    if from_file is not None:
        _refuse_with_from(from_file, {"--profile": profile, "--seq": seq, "--modes": modes, "--batch": batch,
                                      "--layers": layers, "--device": device, "--devices": devices,
                                      "--isolate": isolate, "--cell-timeout": cell_timeout, "--repeats": repeats})
        _log(recording.record_from(from_file, output, allow_failed=allow_failed))
        return
    from ovqprof.devices import devices_option
    from ovqprof.machine import machine_info
    from ovqprof.run import RunPlan, interruptible
    from ovqprof.sweep import plan_cells

    device, slots = devices_option(devices, device)
    spec, run_device = load_run_spec(profile, seq, modes, batch, layers, device, _log)
    machine = machine_info(run_device)
    output = output or recording.default_path(spec.name, machine)
    check_json_output(output)
    plan = RunPlan.build(spec, run_device, isolate=isolate, cell_timeout_s=cell_timeout, roofline=roofline,
                         slots=slots)
    cells = plan_cells(spec)
    rounds = recording.rounds_for(repeats, run_device)
    progress = CellProgress(rounds * len(cells), quiet=quiet, budget_s=cell_budget_s(spec), workers=plan.workers)
    with interruptible(_log, lambda: f"interrupted: no baseline written to {output}",
                       lambda exc: f"cannot run the measurement ({exc.strerror or exc}); no baseline written."):
        run = plan.start(machine)  # peaks and run-wide notes (shared CPU cores) belong in the header below
        header = run.header.as_dict()
        progress.header(run_header_lines(header))
        with progress:
            rows, medians = recording.measure_rounds(
                lambda todo: run.measure(todo, on_start=progress.cell_started, on_row=progress.row_finished),
                cells, rounds)
    _warn_shared_gpu(header)
    _log(recording.record(output, header, rows, source=f"sweep of {spec.file}", allow_failed=allow_failed,
                          run_medians=medians))


def _refuse_with_from(from_file: Path, flags: dict) -> None:
    """`baseline --from FILE` records rows already measured: a measuring flag beside it is a usage error."""
    given = [name for name, value in flags.items() if value is not None]
    if given:
        raise UsageError(f"--from {from_file} records rows already measured; {', '.join(given)} would "
                         "change nothing. Allowed: --from FILE with --output, or a sweep's options without --from")


@app.command("check")
@user_errors
def check_cmd(
    baseline: Path = typer.Option(..., "--baseline", "-b", help="Baseline JSON (ovqprof baseline)."),
    current: Path | None = typer.Option(None, "--current", "-c", help="Result JSON to compare (ovqprof "
                                           "sweep --format json --output FILE)."),
    profile: str | None = typer.Option(None, "--profile", "-p", help="YAML spec to measure the baseline's cells "
                                          "with now (and to re-measure flagged cells once before failing)."),
    threshold: str = typer.Option("10%", help="Relative slow-down (or speed-up) that counts, e.g. 10%."),
    layer_threshold: list[str] | None = typer.Option(None, "--layer-threshold", help="Per-layer threshold "
                                                        "NAME=PCT or NAME:MODE=PCT (repeatable)."),
    mode_threshold: list[str] | None = typer.Option(None, "--mode-threshold", help="Per-mode threshold "
                                                       "MODE=PCT, e.g. decode=20% (repeatable)."),
    min_delta_ms: float = typer.Option(0.005, "--min-delta-ms", help="Absolute floor: smaller changes (ms) "
                                       "never count."),
    fail_on_missing: bool = typer.Option(False, "--fail-on-missing", help="Fail when a baseline cell is "
                                         "missing from the current run."),
    allow_version_change: bool = typer.Option(False, "--allow-version-change", help="Compare although "
                                              "torch, triton, CUDA, driver or ovqprof versions differ."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N for --profile measurements."),
    isolate: bool | None = typer.Option(None, "--isolate/--no-isolate", help="Run each measured cell in a "
                                           "fresh worker process (default: on for GPU, off for CPU)."),
    cell_timeout: float | None = typer.Option(None, help="Seconds before an isolated cell is killed."),
    repeats: int | None = typer.Option(None, "--repeats", min=1, help="Re-measurements of a flagged cell, "
                                       "all flagged cells in turn; it fails only if every run agrees, else it "
                                       "is `noisy` (default: 3 on a CPU, 1 on a GPU)."),
    fail_on_noisy: bool = typer.Option(False, "--fail-on-noisy", help="Fail when a flagged cell's runs "
                                       "disagree (`noisy`) instead of reporting it as not gated."),
    format: str = typer.Option("table", "--format", "-f", help="Report format: table, md or json."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the current rows (after "
                                          "re-measurement) as a JSON result, e.g. to promote to a baseline."),
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Compare a run with a baseline (exit 0 pass, 1 regression, 2 usage, 3 other device or versions, 4 infra)."""
    from ovqprof.check import REPORT_FORMATS, CheckOptions, Thresholds, check_command, render_report
    from ovqprof.run import interruptible

    if format not in REPORT_FORMATS:
        raise UsageError(f"--format {format!r} is not known. Allowed: {', '.join(REPORT_FORMATS)}")
    opts = CheckOptions(
        baseline=baseline, current=current, profile=profile, device=device, isolate=isolate,
        cell_timeout_s=cell_timeout, fail_on_missing=fail_on_missing, allow_version_change=allow_version_change,
        thresholds=Thresholds.parse(threshold, layer_threshold or [], mode_threshold or [], min_delta_ms),
        output=output, quiet=quiet, repeats=repeats, fail_on_noisy=fail_on_noisy)
    with interruptible(_log, lambda: "interrupted: no check result",
                       lambda exc: f"cannot run the check ({exc.strerror or exc}); no check result."):
        report, base_header = check_command(opts, log=_log)
    typer.echo(render_report(report, format, baseline, base_header), nl=False)
    colour = "red" if report.exit_code else "green"
    err_console.print(f"[bold {colour}]check {report.summary()}[/]")
    raise typer.Exit(report.exit_code)


@app.command()
@user_errors
def trace(
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the traces (<layer>-<mode>-<seq>"
                                ".json.gz) and breakdowns (created when missing)."),
    profile: RunProfile = None,
    layers: str | None = typer.Option(None, help="Comma list of layer names from the spec to trace."),
    modes: str = typer.Option("fwd", help="Comma list of modes: fwd,bwd,decode."),
    seq: str | None = typer.Option(None, help="Sequence lengths (as for sweep), e.g. 16k or 4k,16k; default: "
                                      "the spec's longest."),
    batch: str | None = typer.Option(None, help="Comma list of batch sizes (default: the spec's first)."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N (overrides defaults.device)."),
    reps: int = typer.Option(3, min=1, help="Traced calls per cell (after two untraced warm-up calls)."),
    format: str = typer.Option("table", "--format", "-f", help=f"Breakdown format: {', '.join(FORMATS)}."),
    debug: Debug = False,
) -> None:
    """Trace cells under torch.profiler: a Perfetto / Chrome trace per cell and a breakdown of its time by
    phase (projections, core, ...) and by operator. The traced calls are not the timed ones of a sweep."""
    from ovqprof.breakdown_output import format_breakdowns
    from ovqprof.trace import trace_cells

    _check_format(format, FORMATS)
    spec, run_device = load_run_spec(profile, seq, modes, batch, layers, device, _log)
    if seq is None:
        spec = spec.replace(sweep=spec.sweep.replace(seq=(max(spec.sweep.seq),)))
    if batch is None:
        spec = spec.replace(sweep=spec.sweep.replace(batch=spec.sweep.batch[:1]))
    check_output_dir(output, "for traces")
    breakdowns = trace_cells(spec, str(run_device), output, reps)
    sys.stdout.write(format_breakdowns(breakdowns, format))
    err_console.print(f"wrote {len(breakdowns)} traces and breakdowns to {output} (open a .json.gz in "
                      "ui.perfetto.dev or chrome://tracing)", markup=False)


@app.command()
@user_errors
def report(
    result_files: list[Path] = typer.Argument(..., metavar="RESULT...", help="Sweep and capacity result files "
                                              "(CSV or JSON, any mix), e.g. from `sweep --format json --output "
                                              "FILE`."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for report.md and its PNG plots "
                                "(created when missing)."),
    traces: Path | None = typer.Option(None, "--traces", help="Directory of breakdowns from `ovqprof trace` "
                                          "or `sweep --trace` for the \"Where the time goes\" section."),
    trace_seq: str | None = typer.Option(None, "--trace-seq", help="Length of that section's bars, e.g. 4k "
                                            "(default: the longest traced)."),
    debug: Debug = False,
) -> None:
    """Write a Markdown design-review report with PNG plots: throughput, decode latency, memory, state
    bytes, recall vs pairs and capacity vs state bytes, each with a reading computed from the rows, and
    where the time goes from trace breakdowns."""
    from ovqprof.ranges import parse_seq_range
    from ovqprof.report import write_report

    seq = None
    if trace_seq is not None:
        values = parse_seq_range(trace_seq)
        if len(values) != 1:
            raise UsageError(f"--trace-seq {trace_seq!r}: one length. Allowed: e.g. 4k or 4096")
        seq = values[0]
    path = write_report(result_files, output, traces=traces, trace_seq=seq)
    err_console.print(f"wrote {path}", markup=False)


@app.command()
@user_errors
def layers(
    format: str = typer.Option("table", "--format", "-f", help="table or json."),
    debug: Debug = False,
) -> None:
    """List the registered layer types with their options and defaults."""
    from ovqprof.registry import all_layer_types

    types = all_layer_types()
    if format == "json":
        doc = [{"type": t.name, "kind": t.kind, "summary": t.summary,
                "options": [dict(zip(("name", "type", "default", "description"), o, strict=True)) for o in t.option_table()]}
               for t in types]
        typer.echo(json.dumps(doc, indent=1))
        return
    if format != "table":
        raise UsageError(f"--format {format!r} is not known. Allowed: table, json")
    from rich.table import Table

    console = Console()
    for t in types:
        table = Table(title=f"{t.name} ({t.kind}): {t.summary}", title_justify="left")
        for col in ("option", "type", "default", "description"):
            table.add_column(col, overflow="fold")
        for option in t.option_table():
            table.add_row(*option)
        console.print(table)
    console.print("A layer type can also be an import path package.module:Class; its other keys are passed "
                  "to the constructor.")


@app.command()
@user_errors
def env(
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    format: str = typer.Option("table", "--format", "-f", help="table or json."),
    peaks: bool = typer.Option(True, "--peaks/--no-peaks", help="Measure matmul FLOP/s and copy GB/s."),
    debug: Debug = False,
) -> None:
    """Show the device, versions, NVML availability and measured peaks (the roofline the sweep uses)."""
    import torch

    from ovqprof.machine import machine_info, resolve_device
    from ovqprof.measure.peaks import measure_peaks

    if format not in ("table", "json"):
        raise UsageError(f"--format {format!r} is not known. Allowed: table, json")
    try:
        run_device = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--device {device!r} cannot be used: {exc}. Allowed: auto, cpu, cuda, cuda:N") from exc
    info = machine_info(run_device)
    if peaks:
        dtypes = (torch.bfloat16, torch.float16, torch.float32) if run_device.type == "cuda" else (torch.float32,)
        info["peaks"] = {str(d).removeprefix("torch."): measure_peaks(run_device, d).as_dict() for d in dtypes}
    if format == "json":
        typer.echo(json.dumps(info, indent=1, default=str))
        return
    from rich.table import Table

    table = Table(title="ovqprof env", title_justify="left", show_header=False)
    for key, value in info.items():
        if key == "peaks":
            for dname, p in value.items():
                table.add_row(f"peak {dname} matmul", f"{p['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s "
                              f"({p['matmul_size']}^3)")
                table.add_row(f"peak copy ({dname} run)", f"{p['copy_bytes_per_s'] / 1e9:.1f} GB/s "
                              f"({p['copy_bytes'] / 2**20:.0f} MiB read+write)")
        else:
            table.add_row(key, "-" if value is None else str(value))
    Console().print(table)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"ovqprof {version('ovqprof')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Profile attention-like layers (OVQ-attention and its rivals): speed, memory and recall capacity."""


def main() -> None:
    """The console script: typer's usage errors (unknown option, missing argument) in the same one-paragraph
    style and exit code 2 as every other bad input."""
    try:  # typer >= 0.20 vendors click as typer._click; older releases use click itself
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    try:
        code = app(prog_name="ovqprof", standalone_mode=False)  # a command's typer.Exit(n) comes back as n
    except click_errors.NoArgsIsHelpError as exc:  # `ovqprof` alone prints the help, as before
        typer.echo(exc.ctx.get_help())
        raise SystemExit(EXIT_OK) from None
    except click_errors.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "ovqprof"
        err_console.print(f"[bold red]error:[/] {exc.format_message()} (see `{command} --help`)", markup=True,
                          highlight=False)
        raise SystemExit(EXIT_USAGE) from None
    except _click_classes(click_errors, "Abort"):
        raise SystemExit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:  # `ovqprof --help | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        raise SystemExit(EXIT_OK) from None
    except _click_classes(click_errors, "Exit") as exc:
        raise SystemExit(exc.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else EXIT_OK)


def _click_classes(module, name: str) -> tuple[type[BaseException], ...]:
    """click's exception `name` where this typer's click has it (typer's vendored click has no Abort or Exit):
    an except clause over an empty tuple catches nothing."""
    cls = getattr(module, name, None)
    return (cls,) if cls is not None else ()
