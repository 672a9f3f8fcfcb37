"""`ovqprof check`: compare a run with a baseline cell by cell, with a noise-aware rule.

Per cell (layer, mode, seq, batch) whose rows are both `ok`, with baseline median `b` and current median `c`
in ms, `t` the cell's relative threshold and `min_delta_ms` an absolute floor:

- regressed: c > b * (1 + t)  and  c_p20 > b_p80  and  c - b > min_delta_ms
- improved:  b > c * (1 + t)  and  b_p20 > c_p80  and  b - c > min_delta_ms
- unchanged: otherwise.

A baseline recorded in several rounds (`ovqprof baseline --repeats N`, 3 by default on a CPU) lists each cell's
round medians in its header; then `b` above is the slowest round's median for a slow-down and the fastest's
for a speed-up (the rounds' p20/p80 spread is the kept row's), so a baseline that caught a quiet moment in one
round does not make unchanged code fail.

The middle condition says the runs' p20..p80 bands do not overlap: the change is larger than the noise the two
runs show in its direction, `noise_ms` = (b_p80 - b) + (c - c_p20) for a slow-down (the baseline's upper
spread plus the current run's lower spread), mirrored for a speed-up. Timing distributions have long upper
tails, and this uses the side of each that could fake the change.
So a change counts only when it passes a relative threshold (asv's factor), the runs' own spread (NVBench's
rule) and a floor that keeps the jitter of microsecond kernels from counting (xformers' rule). The other
verdicts: `failed` (ok in the baseline, not ok now: error, oom, check_failed, timeout, skipped), `missing`
(ok in the baseline, absent now), `new` (only in the current run), `not compared` (not ok in the baseline).
`regressed` and `failed` cells are re-measured before they count, when a profile to measure with is given:
up to `repeats` more runs (default 3 on a CPU, whose cells move by more than the threshold between runs on a
shared machine, and 1 on a GPU), all flagged cells in turn each round, so a burst of load hits them alike. A
cell fails only when every run agrees; one whose runs disagree is `noisy` (its run-to-run spread exceeds the
change, so it cannot be gated honestly): reported with every run's time, and not failing the check unless
`fail_on_noisy`.

Exit codes (the CLI's): 0 pass, 1 regressed or failed cells (or missing ones with `fail_on_missing`), 2 usage
or a corrupt file, 3 a baseline from another device or with incompatible versions, 4 infrastructure.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from ovqprof.errors import IncompatibleBaselineError, InfrastructureError, UsageError
from ovqprof.layers.base import MODES
from ovqprof.resume import read_rows
from ovqprof.rows import cell_key

EXIT_PASS, EXIT_REGRESSION = 0, 1
DEFAULT_THRESHOLD = 0.10
# Re-measurements of a flagged cell on a CPU: on a shared 2-core machine a cell moved by up to 1.7x between
# two sweeps of unchanged code, so one re-run would often confirm noise.
CPU_REPEATS = 3
DEFAULT_MIN_DELTA_MS = 0.005  # 5 us: below this, launch and clock jitter dominate a GPU kernel's time

# Report order: what fails first.
VERDICTS = ("regressed", "failed", "missing", "noisy", "improved", "unchanged", "new", "not compared")
FAILING_VERDICTS = frozenset({"regressed", "failed"})
RECORD_HINT = "`ovqprof baseline` or `ovqprof sweep --format json --output FILE`"

# Header fields that must match exactly (another device is refused, not guessed), and versions compared by
# their leading release numbers: (field, how many numbers must agree).
DEVICE_FIELDS = ("device_type", "device")
VERSION_FIELDS = (("torch", 2), ("triton", 2), ("cuda", 2), ("driver", 1), ("ovqprof", 2))


# --- thresholds --------------------------------------------------------------------------------------------
def parse_percent(text: str, option: str) -> float:
    """'10%' or '10' -> 0.10 (a fraction)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*%?\s*", text)
    if not match:
        raise UsageError(f"{option} {text!r} is not a percentage. Allowed: a number >= 0, optionally with %, "
                         "e.g. 10%")
    return float(match.group(1)) / 100.0


@dataclass(frozen=True)
class Thresholds:
    """Relative thresholds as fractions: `by_layer` keys are `layer` or `layer:mode`, `by_mode` keys modes.
    The most specific wins: layer:mode, then layer, then mode, then `default`."""

    default: float = DEFAULT_THRESHOLD
    by_layer: dict[str, float] = field(default_factory=dict)
    by_mode: dict[str, float] = field(default_factory=dict)
    min_delta_ms: float = DEFAULT_MIN_DELTA_MS

    def for_cell(self, layer: str, mode: str) -> float:
        for table, key in ((self.by_layer, f"{layer}:{mode}"), (self.by_layer, layer), (self.by_mode, mode)):
            if key in table:
                return table[key]
        return self.default

    @classmethod
    def parse(cls, default: str, layer_items: list[str], mode_items: list[str], min_delta_ms: float) -> Thresholds:
        """From CLI text: `--threshold 10%`, `--layer-threshold mha=15%` or `mha:decode=25%`,
        `--mode-threshold decode=20%`."""
        if not (min_delta_ms >= 0 and math.isfinite(min_delta_ms)):
            raise UsageError(f"--min-delta-ms {min_delta_ms} is not valid. Allowed: a number of ms >= 0")
        by_layer = _parse_items(layer_items, "--layer-threshold", "NAME=PCT or NAME:MODE=PCT, e.g. mha=15%")
        by_mode = _parse_items(mode_items, "--mode-threshold", f"MODE=PCT with MODE one of {', '.join(MODES)}")
        for key in by_layer:
            if ":" in key and key.split(":", 1)[1] not in MODES:
                raise UsageError(f"--layer-threshold {key!r}: unknown mode {key.split(':', 1)[1]!r}. Allowed: "
                                 f"NAME:MODE with MODE one of {', '.join(MODES)}")
        bad = [m for m in by_mode if m not in MODES]
        if bad:
            raise UsageError(f"--mode-threshold: unknown mode(s) {bad}. Allowed: {', '.join(MODES)}")
        return cls(parse_percent(default, "--threshold"), by_layer, by_mode, min_delta_ms)


def _parse_items(items: list[str], option: str, allowed: str) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, pct = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{option} {item!r} is not valid. Allowed: {allowed}")
        out[name.strip()] = parse_percent(pct, option)
    return out


# --- result files ------------------------------------------------------------------------------------------
def load_results(path: Path, option: str) -> tuple[dict, list[dict]]:
    """(header, rows) of a JSON result or baseline file, validated. A corrupt, truncated or header-less file
    is a UsageError (exit 2) that says what is wrong."""
    hint = f"Record one with {RECORD_HINT}"
    if path.suffix.lower() != ".json":
        raise UsageError(f"{option} {path}: only a JSON result file carries the machine header that says which "
                         f"device and versions it was measured with. {hint}")
    if not path.is_file():
        raise UsageError(f"{option} {path} does not exist or is not a file. {hint}")
    try:
        _, rows, header = read_rows(path, option)
    except UsageError as exc:
        raise UsageError(f"{exc}. {hint}") from None
    if not isinstance(header, dict):
        raise UsageError(f"{option} {path} has no machine header, so its device and versions are unknown. {hint}")
    absent = [k for k in (*DEVICE_FIELDS, *(f for f, _ in VERSION_FIELDS)) if k not in header]
    if absent or not header.get("device"):
        raise UsageError(f"{option} {path}: the machine header lacks {', '.join(absent) or 'device'}. {hint}")
    seen: set[tuple] = set()
    for i, row in enumerate(rows):
        where = f"{option} {path}, row {i + 1}"
        if any(row.get(k) is None for k in ("layer", "mode", "seq", "batch", "status")):
            raise UsageError(f"{where}: a cell without layer, mode, seq, batch or status. {hint}")
        key = cell_key(row)
        if key in seen:
            raise UsageError(f"{where}: cell {_key_text(key)} appears twice. {hint}")
        seen.add(key)
        median = row.get("ms_median")
        if row["status"] == "ok" and not (median is not None and math.isfinite(median) and median > 0):
            raise UsageError(f"{where}: an ok cell without a positive ms_median (got {median!r}). {hint}")
    return header, rows


def _key_text(key: tuple) -> str:
    layer, mode, seq, batch = key
    return f"{layer} {mode} seq={seq} batch={batch}"


def _release(version: object, parts: int) -> tuple | object:
    """The leading `parts` release numbers of a version ('2.13.0+cpu' -> (2, 13)); other values as they are."""
    if not isinstance(version, str):
        return version
    numbers = re.findall(r"\d+", version.split("+")[0])
    return tuple(int(n) for n in numbers[:parts]) if numbers else version


def _device_text(header: dict) -> str:
    text = str(header.get("device"))
    if header.get("device_type") == "cpu" and header.get("cpu_threads") is not None:
        text += f" ({header['cpu_threads']} threads)"
    if header.get("triton_interpret"):
        text += " (Triton interpreter)"
    return text


def check_compatible(baseline: dict, current: dict, *, allow_version_change: bool = False,
                     current_name: str = "the current run") -> list[str]:
    """Refuse (IncompatibleBaselineError, exit 3) a comparison across devices, CPU thread counts, Triton
    interpreter on/off, or, unless `allow_version_change`, different major.minor of torch, triton, CUDA and
    ovqprof or a different driver major; return notes on smaller differences (patch versions, Python)."""
    if _device_text(baseline) != _device_text(current) or any(baseline.get(k) != current.get(k)
                                                              for k in DEVICE_FIELDS):
        raise IncompatibleBaselineError(
            f"the baseline was measured on {_device_text(baseline)!r}, {current_name} on "
            f"{_device_text(current)!r}. Timings from different devices are not compared. Allowed: a baseline "
            "recorded on this device (`ovqprof baseline` on the same machine type)")
    notes, problems = [], []
    for name, parts in VERSION_FIELDS:
        old, new = baseline.get(name), current.get(name)
        if old == new:
            continue
        if _release(old, parts) == _release(new, parts):
            notes.append(f"{name} {old} -> {new}")
        else:
            problems.append(f"{name} {old} -> {new}")
    if baseline.get("python") != current.get("python"):
        notes.append(f"python {baseline.get('python')} -> {current.get('python')}")
    if problems and not allow_version_change:
        raise IncompatibleBaselineError(
            f"the baseline was measured with other versions than {current_name} ({'; '.join(problems)}); "
            "kernel speed can change with them. Allowed: re-record the baseline with these versions "
            "(`ovqprof baseline`), or pass --allow-version-change to compare anyway")
    notes.extend(f"version change allowed: {p}" for p in problems)
    return notes


def check_same_layers(baseline: dict, current_layers: list[dict] | None, names: set[str], where: str) -> None:
    """UsageError when a layer compared in both runs was configured differently (dimensions, dtype, options
    with their defaults filled in, so a spec that spells out a default is the same workload): its cells would
    measure another workload."""
    if not current_layers or not baseline.get("layers"):
        return
    old = {layer.get("name"): _comparable(layer) for layer in baseline["layers"] if isinstance(layer, dict)}
    new = {layer.get("name"): _comparable(layer) for layer in current_layers}
    for name in sorted(names & set(old) & set(new)):
        diff = [f"{k}: {old[name].get(k)!r} -> {new[name].get(k)!r}"
                for k in sorted(set(old[name]) | set(new[name])) if old[name].get(k) != new[name].get(k)]
        if diff:
            raise UsageError(f"layer {name!r} in {where} is configured differently from the baseline's "
                             f"({'; '.join(diff)}), so its cells measure another workload. Allowed: the spec "
                             "the baseline was recorded with, or a re-recorded baseline")


def _comparable(layer: dict) -> dict:
    """A header layer flattened for comparison: its fields, the options resolved (`options.NAME` keys)."""
    from ovqprof.run import resolved_options

    out = {k: v for k, v in layer.items() if k not in ("options", "resolved_options")}
    out.update({f"options.{k}": v for k, v in resolved_options(layer).items()})
    return out


# --- comparison --------------------------------------------------------------------------------------------
@dataclass
class CellResult:
    """One cell's verdict; `first_ms` is the current median before a re-measurement replaced it."""

    key: tuple
    verdict: str
    baseline: dict | None
    current: dict | None
    threshold: float | None = None
    noise_ms: float | None = None
    note: str = ""
    first_ms: float | None = None

    @property
    def change(self) -> float | None:
        """Relative change of the median time (+0.2: 20% slower)."""
        if self.baseline is None or self.current is None or self.verdict == "not compared":
            return None
        b, c = self.baseline.get("ms_median"), self.current.get("ms_median")
        return c / b - 1.0 if b and c is not None else None


def _spread_ms(row: dict, side: str) -> float:
    """How far the row's p80 (`side` 'up') or p20 ('down') lies from its median, in ms (0 when unknown)."""
    q = row.get("ms_p80" if side == "up" else "ms_p20")
    return 0.0 if q is None else max(0.0, q - row["ms_median"] if side == "up" else row["ms_median"] - q)


def compare_cell(key: tuple, base: dict | None, cur: dict | None, thresholds: Thresholds,
                 base_runs: list[float] | None = None) -> CellResult:
    """The verdict of one cell; `base_runs` are the baseline's round medians in ms (None: one round)."""
    if base is None:
        return CellResult(key, "new", None, cur, note="not in the baseline")
    if base["status"] != "ok":
        now = f", now {cur['status']}" if cur is not None else ""
        return CellResult(key, "not compared", base, cur, note=f"baseline status {base['status']}{now}")
    if cur is None:
        return CellResult(key, "missing", base, None, note="not in the current run")
    if cur["status"] != "ok":
        return CellResult(key, "failed", base, cur, note=f"now {cur['status']}: {cur.get('note') or ''}".strip(": "))
    layer, mode = key[0], key[1]
    t = thresholds.for_cell(layer, mode)
    median, c = base["ms_median"], cur["ms_median"]
    rounds = [median, *(base_runs or ())]
    # The reference is the baseline round that makes the change smallest: its slowest for a slow-down.
    b = max(rounds) if c > median else min(rounds)
    delta = c - b
    if c > median:  # slower: the baseline's upper spread and the current run's lower one could fake it
        noise = _spread_ms(base, "up") + _spread_ms(cur, "down")
    else:
        noise = _spread_ms(base, "down") + _spread_ms(cur, "up")
    result = CellResult(key, "unchanged", base, cur, threshold=t, noise_ms=noise)
    beyond_median = c > median * (1 + t) if c > median else median > c * (1 + t)
    beyond_threshold = c > b * (1 + t) if c > median else b > c * (1 + t)
    if beyond_median and not beyond_threshold:
        result.note = (f"beyond the threshold of the baseline's median but not of its "
                       f"{'slowest' if c > median else 'fastest'} of {len(base_runs or ())} rounds "
                       f"({min(rounds):.4g}-{max(rounds):.4g} ms)")
    elif beyond_threshold:
        if abs(delta) <= noise:
            result.note = "beyond the threshold but within the runs' spread"
        elif abs(delta) <= thresholds.min_delta_ms:
            result.note = f"beyond the threshold but under the {thresholds.min_delta_ms:g} ms floor"
        else:
            result.verdict = "regressed" if delta > 0 else "improved"
    if base.get("impl") != cur.get("impl"):
        result.note = "; ".join(n for n in (result.note, f"impl {base.get('impl')} -> {cur.get('impl')}") if n)
    return result


def compare(base_rows: list[dict], cur_rows: list[dict], thresholds: Thresholds,
            base_runs: dict[tuple, list[float]] | None = None) -> list[CellResult]:
    """Every baseline cell in order, then the cells only the current run has. `base_runs`: each cell's
    baseline round medians (`baseline.read_run_medians`)."""
    current = {cell_key(r): r for r in cur_rows}
    base_keys = [cell_key(r) for r in base_rows]
    runs = base_runs or {}
    results = [compare_cell(k, r, current.get(k), thresholds, runs.get(k))
               for k, r in zip(base_keys, base_rows, strict=True)]
    known = set(base_keys)
    results += [compare_cell(k, None, r, thresholds) for k, r in current.items() if k not in known]
    return results


def check_dtypes(results: list[CellResult]) -> None:
    mismatched = [f"{_key_text(r.key)} ({r.baseline.get('dtype')} -> {r.current.get('dtype')})" for r in results
                  if r.baseline and r.current and r.baseline.get("dtype") != r.current.get("dtype")]
    if mismatched:
        raise UsageError(f"cells measured at another dtype than the baseline's: {', '.join(mismatched[:5])}"
                         f"{' ...' if len(mismatched) > 5 else ''}. Allowed: the spec the baseline was "
                         "recorded with, or a re-recorded baseline")


@dataclass
class CheckReport:
    results: list[CellResult]
    notes: list[str] = field(default_factory=list)
    fail_on_missing: bool = False
    fail_on_noisy: bool = False

    def counts(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.results) for v in VERDICTS}

    @property
    def exit_code(self) -> int:
        failing = FAILING_VERDICTS | ({"missing"} if self.fail_on_missing else set()) | (
            {"noisy"} if self.fail_on_noisy else set())
        return EXIT_REGRESSION if any(r.verdict in failing for r in self.results) else EXIT_PASS

    def summary(self) -> str:
        counts = ", ".join(f"{n} {v}" for v, n in self.counts().items() if n) or "no cells"
        text = f"{'FAIL' if self.exit_code else 'PASS'}: {counts}"
        if self.counts()["noisy"] and not self.fail_on_noisy:
            text += " (noisy cells are not gated: runs disagreed)"
        return text


def run_check(base_rows: list[dict], cur_rows: list[dict], thresholds: Thresholds, *,
              remeasure: Callable[[list[tuple]], list[dict]] | None = None, repeats: int = 1,
              fail_on_missing: bool = False, fail_on_noisy: bool = False,
              notes: list[str] | None = None,
              base_runs: dict[tuple, list[float]] | None = None) -> tuple[CheckReport, list[dict]]:
    """Compare; re-measure the flagged cells with `remeasure(keys) -> rows` (when given) up to `repeats` times,
    all of them in turn each round, and judge them on every measurement (`confirm`). Returns the report and
    the current rows with re-measured ones replaced (by the cell's median run)."""
    base_runs = base_runs or {}
    results = compare(base_rows, cur_rows, thresholds, base_runs)
    check_dtypes(results)
    notes = notes if notes is not None else []
    flagged = {r.key: r for r in results if r.verdict in FAILING_VERDICTS}
    if flagged and remeasure is not None:
        runs = {key: [] for key in flagged}
        pending = list(flagged)
        for _ in range(repeats):
            fresh = {cell_key(row): row for row in remeasure(pending)}
            for key in pending:
                if key in fresh:
                    runs[key].append(fresh[key])
            # Only a cell that keeps failing needs another run: one that did not is already `noisy`.
            pending = [key for key in pending if key in fresh and compare_cell(
                key, flagged[key].baseline, fresh[key], thresholds, base_runs.get(key)).verdict in FAILING_VERDICTS]
            if not pending:
                break
        chosen = {}
        for i, old in enumerate(results):
            if old.key in flagged and runs[old.key]:
                results[i], chosen[old.key] = confirm(old, runs[old.key], thresholds, base_runs.get(old.key))
        cur_rows = [chosen.get(cell_key(r), r) for r in cur_rows]
        notes.append(f"{len(flagged)} flagged cell(s) re-measured (up to {repeats} more run(s) each, in turn) "
                     "before judging: a cell counts only when every run agrees")
    elif flagged:
        notes.append("flagged cells were not re-measured (pass --profile to re-measure them)")
    return CheckReport(results, notes, fail_on_missing, fail_on_noisy), cur_rows


def _run_text(row: dict) -> str:
    return f"{row['ms_median']:.4g} ms" if row.get("status") == "ok" else str(row.get("status"))


def confirm(first: CellResult, reruns: list[dict], thresholds: Thresholds,
            base_runs: list[float] | None = None) -> tuple[CellResult, dict]:
    """The verdict of a flagged cell (`first`, from the first run) after its re-measurements `reruns`, and
    the row that stands for it (the median run among the last verdict's runs).

    Every run failing (regressed or failed) confirms the failure, judged on the median failing run. Any run
    that does not is `noisy`: the cell's run-to-run spread is larger than the change it would have to show,
    so no verdict about it would be honest; it does not fail the check unless `--fail-on-noisy`."""
    judged = [compare_cell(first.key, first.baseline, row, thresholds, base_runs) for row in reruns]
    runs = [first.current, *reruns]
    texts = ", ".join(_run_text(row) for row in runs)
    if all(j.verdict in FAILING_VERDICTS for j in judged):
        row = _median_run(reruns)
        result = judged[reruns.index(row)]
        result.first_ms = first.current.get("ms_median") if first.current else None
        result.note = "; ".join(n for n in (f"re-measured: {result.verdict} in all {len(runs)} runs ({texts})",
                                            result.note) if n)
        return result, row
    row = _median_run(runs)
    ok = [r["ms_median"] for r in runs if r.get("status") == "ok"]
    spread = f"; run-to-run spread {max(ok) / min(ok) - 1:.0%}" if len(ok) > 1 else ""
    failing = 1 + sum(j.verdict in FAILING_VERDICTS for j in judged)
    threshold = first.threshold if first.threshold is not None else thresholds.for_cell(first.key[0], first.key[1])
    result = CellResult(first.key, "noisy", first.baseline, row, threshold=threshold,
                        noise_ms=first.noise_ms, first_ms=first.current.get("ms_median") if first.current else None,
                        note=f"{first.verdict} in {failing} of {len(runs)} runs ({texts}){spread}: too noisy "
                             f"to gate at {threshold:.0%}")
    return result, row


def _median_run(rows: list[dict]) -> dict:
    """The run with the median time among the ok ones (the lower middle one), else the last."""
    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: r["ms_median"])
    return ok[(len(ok) - 1) // 2] if ok else rows[-1]


# --- report ------------------------------------------------------------------------------------------------
REPORT_FORMATS = ("table", "md", "json")
_HEADERS = ("layer", "mode", "seq", "batch", "verdict", "base ms", "now ms", "change", "noise ms", "threshold",
            "note")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _report_rows(report: CheckReport) -> list[list[str]]:
    ordered = sorted(report.results, key=lambda r: VERDICTS.index(r.verdict))
    out = []
    for r in ordered:
        change = r.change
        out.append([*map(str, r.key), r.verdict,
                    _ms(r.baseline.get("ms_median") if r.baseline else None),
                    _ms(r.current.get("ms_median") if r.current else None),
                    "-" if change is None else f"{change * 100:+.1f}%",
                    _ms(r.noise_ms), "-" if r.threshold is None else f"{r.threshold * 100:g}%",
                    r.note if len(r.note) <= 90 else r.note[:87] + "..."])
    return out


def render_report(report: CheckReport, fmt: str, baseline_path: Path, baseline_header: dict) -> str:
    if fmt == "json":
        doc = {"baseline": str(baseline_path), "device": baseline_header.get("device"),
               "result": "fail" if report.exit_code else "pass", "exit_code": report.exit_code,
               "counts": report.counts(), "notes": report.notes,
               "cells": [dict(zip(("layer", "mode", "seq", "batch"), r.key, strict=True)) |
                         {"verdict": r.verdict, "baseline_ms": r.baseline.get("ms_median") if r.baseline else None,
                          "current_ms": r.current.get("ms_median") if r.current else None,
                          "change": r.change, "noise_ms": r.noise_ms, "threshold": r.threshold,
                          "first_ms": r.first_ms, "note": r.note} for r in report.results]}
        return json.dumps(doc, indent=1) + "\n"
    where = f"baseline {baseline_path} ({baseline_header.get('device')}, recorded " \
            f"{(baseline_header.get('baseline') or {}).get('recorded') or baseline_header.get('date')})"
    if fmt == "md":
        lines = ["# ovqprof check", "", f"**{report.summary()}**", "", f"- {where}",
                 *[f"- note: {n}" for n in report.notes], "",
                 "| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _report_rows(report)]
        return "\n".join(lines) + "\n"
    table = tabulate(_report_rows(report), headers=list(_HEADERS), tablefmt="simple", disable_numparse=True,
                     colalign=["left", "left", "right", "right", "left", "right", "right", "right", "right",
                               "right", "left"])
    lines = [f"- {where}", *[f"- note: {n}" for n in report.notes], "", table, "", report.summary()]
    return "\n".join(lines) + "\n"


# --- the command -------------------------------------------------------------------------------------------
@dataclass
class CheckOptions:
    """What `ovqprof check` was asked to do (parsed CLI options)."""

    baseline: Path
    current: Path | None = None
    profile: str | None = None
    device: str | None = None
    isolate: bool | None = None
    cell_timeout_s: float | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    fail_on_missing: bool = False
    allow_version_change: bool = False
    output: Path | None = None
    quiet: bool = False  # no progress lines or bar on stderr
    repeats: int | None = None  # re-measurements of a flagged cell; None: 3 on a CPU, 1 on a GPU
    fail_on_noisy: bool = False


def _profile_run(opts: CheckOptions, base_header: dict, names: set[str], notes: list[str]):
    """The started run of the profile on this machine, after checking that this machine and the profile's
    layers match the baseline."""
    from ovqprof.machine import machine_info
    from ovqprof.run import RunPlan
    from ovqprof.run_spec import resolve_run_device
    from ovqprof.spec import load_spec, resolve_profile

    spec = load_spec(resolve_profile(opts.profile))

    def unavailable(name: str, exc: Exception) -> InfrastructureError:
        return InfrastructureError(f"cannot measure on device {name!r}: {exc}. The baseline was measured on "
                                   f"{base_header.get('device')!r}; run the check on such a machine")

    run_device = resolve_run_device(spec, opts.device, unavailable)
    machine = machine_info(run_device)
    for note in check_compatible(base_header, machine, allow_version_change=opts.allow_version_change,
                                 current_name="this machine"):
        if note not in notes:
            notes.append(note)
    run = RunPlan.build(spec, run_device, isolate=opts.isolate, cell_timeout_s=opts.cell_timeout_s,
                        roofline=False).start(machine)
    check_same_layers(base_header, list(run.header.layers), names, str(spec.file))
    if base_header.get("timing") not in (None, run.header.timing):
        notes.append(f"timing budgets differ from the baseline's ({base_header['timing']} -> {run.header.timing})")
    return run


def _remeasurer(run, names: set[str], notes: list[str], quiet: bool, log: Callable[[str], None]
                ) -> Callable[[list[tuple]], list[dict]]:
    """`remeasure(keys) -> rows`: measure the baseline's cells `keys` with the profile's run (a progress bar
    unless `quiet`); a layer the profile lacks is a note, a profile with none of them a UsageError."""

    from ovqprof.progress import CellProgress, cell_budget_s
    from ovqprof.sweep import cells_for_keys

    spec = run.plan.spec

    def remeasure(keys: list[tuple]) -> list[dict]:
        cells, unknown = cells_for_keys(spec, keys)
        if unknown and not cells:
            raise UsageError(f"{spec.file} has none of the baseline's layers ({', '.join(sorted(names))}). "
                             "Allowed: the spec the baseline was recorded with")
        if unknown:
            notes.append(f"{len(unknown)} cell(s) not measured: layer(s) "
                         f"{', '.join(sorted({k[0] for k in unknown}))} not in {spec.file}")
        log(f"measuring {len(cells)} cell(s) with {spec.file} on {run.header.machine.get('device')}")
        try:
            with CellProgress(len(cells), quiet=quiet, budget_s=cell_budget_s(spec)) as progress:
                return run.measure(cells, on_start=progress.cell_started, on_row=progress.row_finished)
        except OSError as exc:  # a worker process that cannot start, a vanished device node
            raise InfrastructureError(f"cannot run the measurement ({exc.strerror or exc}); "
                                      f"{len(cells)} cell(s) were to be measured") from None

    return remeasure


def check_command(opts: CheckOptions, log: Callable[[str], None] = lambda text: None
                  ) -> tuple[CheckReport, dict]:
    """Load, refuse what cannot be compared, measure with the profile when asked, compare, re-measure
    flagged cells, write the current rows to `opts.output`. Returns the report and the baseline header."""
    from ovqprof.output import json_document, write_atomic

    if opts.current is None and opts.profile is None:
        raise UsageError("nothing to compare with the baseline. Allowed: --current RESULT.json (a finished sweep), "
                         "--profile P.yaml (measure the baseline's cells now), or both (re-measure flagged cells)")
    if opts.output is not None:
        from ovqprof.output import check_json_output

        check_json_output(opts.output)
    base_header, base_rows = load_results(opts.baseline, "--baseline")
    names = {r["layer"] for r in base_rows}
    notes: list[str] = []
    cur_header = cur_rows = None
    if opts.current is not None:
        cur_header, cur_rows = load_results(opts.current, "--current")
        notes += check_compatible(base_header, cur_header, allow_version_change=opts.allow_version_change,
                                  current_name=f"--current {opts.current}")
        check_same_layers(base_header, cur_header.get("layers"), names, f"--current {opts.current}")
    run = _profile_run(opts, base_header, names, notes) if opts.profile is not None else None

    remeasure = _remeasurer(run, names, notes, opts.quiet, log) if run is not None else None

    if cur_rows is None:
        assert run is not None and remeasure is not None
        cur_rows = remeasure([cell_key(r) for r in base_rows if r["status"] == "ok"])
        cur_header = run.header.as_dict()
    repeats = opts.repeats
    if repeats is None:
        repeats = CPU_REPEATS if run is not None and run.plan.device.type == "cpu" else 1
    from ovqprof.baseline import read_run_medians

    report, cur_rows = run_check(base_rows, cur_rows, opts.thresholds,
                                 remeasure=remeasure, repeats=repeats,
                                 fail_on_missing=opts.fail_on_missing, fail_on_noisy=opts.fail_on_noisy,
                                 notes=notes, base_runs=read_run_medians(base_header))
    if opts.output is not None:
        try:
            write_atomic(opts.output, json_document(cur_header, cur_rows))
        except OSError as exc:
            raise InfrastructureError(f"cannot write --output {opts.output} ({exc.strerror or exc})") from None
        report.notes.append(f"current rows written to {opts.output}")
    return report, base_header
