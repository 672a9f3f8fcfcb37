"""`ovqprof report`: result files in, DIR/report.md and its PNG plots out.

Each plot section is built by one function below: select the series, draw the plot, compute the reading;
when its data is missing the section keeps one sentence saying why and no image.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from ovqprof.errors import UsageError
from ovqprof.output import check_output_dir, human_bytes
from ovqprof.report import plots
from ovqprof.report.distributed import PLOT_FILES as DISTRIBUTED_PLOTS
from ovqprof.report.distributed import distributed_sections
from ovqprof.report.load import ResultFile, load_result_files
from ovqprof.report.markdown import Section, render, table
from ovqprof.report.readings import (
    ParetoPoint,
    dict_size_of,
    first_drop,
    fmt_ms,
    fmt_rate,
    is_ovq,
    kv_ratios,
    kv_reference,
    memory_reading,
    pareto_reading,
    ranking_reading,
    recall_reading,
    saturation_reading,
    series_tau,
    state_reading,
)
from ovqprof.report.series import (
    CapacityLabels,
    Series,
    SweepLabels,
    accuracy_series,
    capacity_ok,
    kind_of_label,
    split_groups,
    sweep_series,
)

PLOT_FILES = ("throughput.png", "decode.png", "memory.png", "state.png", "recall.png", "pareto.png",
              "breakdown.png", *DISTRIBUTED_PLOTS)
PEAK_COLUMNS = ("mem_torch_alloc_bytes", "mem_rss_peak_bytes")  # GPU allocator peak first, RSS on CPU
MODES = ("fwd", "bwd", "decode")
NOISY_SPREAD = 2.0  # ms_p80 / ms_p20 above this: the median of that row is not to be trusted


class Report:
    """The rows of all inputs, split by kind, with the labels every plot and table share."""

    def __init__(self, files: list[ResultFile], out_dir: Path):
        self.files = files
        self.out_dir = out_dir
        self.sweep = [r for f in files if f.kind == "sweep" for r in f.rows]
        self.capacity = [r for f in files if f.kind == "capacity" for r in f.rows]
        self.distributed = [r for f in files if f.kind == "distributed" for r in f.rows]
        self.sweep_labels = SweepLabels(self.sweep)
        self.capacity_labels = CapacityLabels(self.capacity)
        self.kinds = kind_of_label(self.sweep, self.sweep_labels)
        self.groups = {self.sweep_labels(r): self.sweep_labels.group(r) for r in self.sweep}
        labels = {self.sweep_labels(r) for r in self.sweep} | {self.capacity_labels(r) for r in self.capacity}
        families = {**kind_of_label(self.capacity, self.capacity_labels), **self.kinds}
        self.order = plots.Palette(sorted(labels), families)
        self.written: list[str] = []

    def path(self, name: str) -> Path:
        self.written.append(name)
        return self.out_dir / name

    # --- sweep sections ----------------------------------------------------------------------------------
    def modes_present(self, modes: tuple[str, ...]) -> list[str]:
        return [m for m in modes if any(r.get("mode") == m and r.get("status") == "ok" for r in self.sweep)]

    def series(self, mode: str | None, column: str, ok_only: bool = True) -> Series:
        return sweep_series(self.sweep, self.sweep_labels, mode, lambda r: r.get(column), ok_only)

    def ranked(self, what: str, series: Series, higher_is_better: bool, fmt) -> str:
        """ranking_reading within each batch/device group (prefixed by the group when there are several)."""
        parts = split_groups(series, self.groups)
        return " ".join(ranking_reading(f"{what} ({group})" if len(parts) > 1 else what, s, higher_is_better,
                                        fmt, "fastest") for group, s in parts.items())

    def throughput(self) -> Section:
        title = "Throughput vs sequence length"
        if not self.sweep:
            return Section(title, None, "Omitted: no sweep rows in the inputs.")
        modes = self.modes_present(("fwd", "bwd"))
        if not modes:
            return Section(title, None, "Omitted: no successful fwd or bwd rows in the inputs.")
        panels = {m: self.series(m, "tokens_per_s") for m in modes}
        image = plots.lines_by_panel(panels, self.path("throughput.png"), self.order, xlabel="sequence length T",
                                     ylabel="tokens/s", title="Throughput").name
        reading = " ".join(self.ranked(m, panels[m], True, fmt_rate) for m in modes)
        return Section(title, image, reading)

    def decode(self) -> Section:
        title = "Decode latency vs context"
        if not self.sweep:
            return Section(title, None, "Omitted: no sweep rows in the inputs.")
        if not self.modes_present(("decode",)):
            return Section(title, None, "Omitted: no successful decode rows in the inputs.")
        series = self.series("decode", "ms_median")
        image = plots.lines_by_panel({"": series}, self.path("decode.png"), self.order, ylabel="ms per step",
                                     xlabel="context length T", title="Decode latency (one token per step)").name
        return Section(title, image, self.ranked("decode ms per step", series, False, fmt_ms))

    def peak_column(self) -> str | None:
        for column in PEAK_COLUMNS:
            if any(r.get(column) is not None and r.get("status") == "ok" for r in self.sweep):
                return column
        return None

    def memory(self) -> Section:
        title = "Peak memory vs length"
        if not self.sweep:
            return Section(title, None, "Omitted: no sweep rows in the inputs.")
        column = self.peak_column()
        if column is None:
            return Section(title, None, "Omitted: no successful sweep row has a peak-memory figure "
                                        f"({' or '.join(PEAK_COLUMNS)}).")
        modes = self.modes_present(MODES)
        panels = {m: self.series(m, column) for m in modes}
        panels = {m: s for m, s in panels.items() if s}
        readable = {f"{m} ({group})" if group else m: s for m, series in panels.items()
                    for group, s in split_groups(series, self.groups).items()}
        isolated = {f.header.get("isolate") for f in self.files if f.kind == "sweep"}
        missing = sum(r.get("status") == "ok" and r.get(column) is None for r in self.sweep)
        tail = f" {missing} successful rows have no {column} (e.g. from another device) and are not plotted." \
            if missing else ""
        if column == "mem_rss_peak_bytes" and isolated != {True}:
            # One process's running RSS peak depends on the cells before it: a plot would compare the order.
            return Section(title, None, "Not plotted: one process's running RSS peaks are not comparable "
                                        "between layers (sweep with --isolate for a fresh process per cell). "
                           + memory_reading(readable, column, False if isolated == {False} else None, plotted=False))
        image = plots.lines_by_panel(panels, self.path("memory.png"), self.order, xlabel="sequence length T",
                                     ylabel=f"peak memory ({column})", title="Peak memory", ybytes=True).name
        return Section(title, image, memory_reading(readable, column, False if isolated == {False} else None) + tail)

    def state(self) -> Section:
        title = "State bytes vs context (KV cache vs constant state)"
        if not self.sweep:
            return Section(title, None, "Omitted: no sweep rows in the inputs.")
        state = self.series(None, "state_bytes", ok_only=False)
        if not state:
            return Section(title, None, "Omitted: no sweep row has state_bytes.")
        image = plots.lines_by_panel({"": state}, self.path("state.png"), self.order, xlabel="context length T",
                                     ylabel="state bytes (KV cache or recurrent state)",
                                     title="Decode state", ybytes=True).name
        parts = split_groups(state, self.groups)
        section = Section(title, image, " ".join(
            (f"{group}: " if len(parts) > 1 else "") + state_reading(s, self.kinds) for group, s in parts.items()))
        for s in parts.values():
            reference = kv_reference(s, self.kinds)
            if reference is None:
                continue
            ratios = kv_ratios(s, reference)
            xs = sorted(s[reference])
            rows = [[label] + [f"{r[x]:.3g}" if x in r else "-" for x in xs] for label, r in ratios.items() if r]
            if rows:
                section.tables.append(table([f"state / {reference} KV cache"] + [f"T={x}" for x in xs], rows))
        return section

    # --- capacity sections -------------------------------------------------------------------------------
    def capacity_rows_by_label(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for row in self.capacity:
            if capacity_ok(row):
                out.setdefault(self.capacity_labels(row), []).append(row)
        return out

    def tau(self) -> tuple[float, bool]:
        return series_tau([r for r in self.capacity if capacity_ok(r)])

    def recall(self) -> Section:
        title = "Recall vs pairs"
        if not self.capacity:
            return Section(title, None, "Omitted: no capacity rows in the inputs.")
        acc = accuracy_series(self.capacity, self.capacity_labels)
        if not acc:
            return Section(title, None, "Omitted: no capacity row has status ok with accuracy and pairs.")
        tau, given = self.tau()
        by_label = self.capacity_rows_by_label()
        taus = [series_tau(rows)[0] for rows in by_label.values()]
        image = plots.recall_plot(acc, taus, self.path("recall.png"), self.order).name
        text = recall_reading(acc, tau) + ("" if given else f" (tau={tau:g} assumed: the rows carry no tau.)")
        headers = [f.header for f in self.files if f.kind == "capacity"]  # a sweep's layer of that name may differ
        ovq = [label for label, rows in by_label.items() if any(is_ovq(r) for r in rows)]
        for label in ovq:
            rows = by_label[label]
            size = dict_size_of(str(rows[0]["layer"]), rows, headers)
            text += " " + saturation_reading(label, acc[label], series_tau(rows)[0], size)
        if not ovq:
            text += " No OVQ rows (kind or type ovq), so no dictionary saturation point."
        return Section(title, image, text)

    def pareto_points(self) -> tuple[list[ParetoPoint], list[str]]:
        """One point per series: capacity (the `capacity` column, else the last pairs with accuracy >= tau)
        and the state bytes at that capacity (the row with the largest pairs not above it)."""
        points, skipped = [], []
        for label, rows in self.capacity_rows_by_label().items():
            tau = series_tau(rows)[0]
            given = [float(r["capacity"]) for r in rows if r.get("capacity") is not None]
            capacity = max(given) if given else first_drop({int(r["pairs"]): float(r["accuracy"]) for r in rows},
                                                           tau)[0]
            with_state = sorted((int(r["pairs"]), int(r["state_bytes"])) for r in rows
                                if r.get("state_bytes") is not None)
            if not capacity or not with_state:
                skipped.append(label)
                continue
            below = [s for p, s in with_state if p <= capacity]
            points.append(ParetoPoint(label, float(below[-1] if below else with_state[0][1]), float(capacity)))
        return points, skipped

    def pareto(self) -> Section:
        title = "Capacity vs state bytes (Pareto)"
        if not self.capacity:
            return Section(title, None, "Omitted: no capacity rows in the inputs.")
        points, skipped = self.pareto_points()
        if not points:
            return Section(title, None, "Omitted: no capacity series has both a capacity above zero and "
                                        "state_bytes.")
        tau, _ = self.tau()
        image = plots.pareto_plot(points, tau, self.path("pareto.png"), self.order).name
        text = pareto_reading(points, tau)
        if skipped:
            text += f" Not plotted (no pairs reached tau, or no state_bytes): {', '.join(skipped)}."
        return Section(title, image, text)

    # --- tables and failures -----------------------------------------------------------------------------
    def key_tables(self) -> list[tuple[str, list[str]]]:
        out = []
        if self.sweep:
            columns = [("fwd", "tokens_per_s", "fwd tok/s", fmt_rate), ("bwd", "tokens_per_s", "bwd tok/s", fmt_rate),
                       ("decode", "ms_median", "decode ms/step", fmt_ms)]
            cols = []
            for mode, column, name, fmt in columns:
                series = self.series(mode, column)
                if series:
                    longest = max(x for s in series.values() for x in s)
                    cols.append((f"{name} @T={longest}", series, longest, fmt))
            state = self.series(None, "state_bytes", ok_only=False)
            if state:
                longest = max(x for s in state.values() for x in s)
                cols.append((f"state @T={longest}", state, longest, human_bytes))
            labels = sorted({self.sweep_labels(r) for r in self.sweep})
            def cell(label: str, series: Series, x: int, fmt) -> str:
                points = series.get(label, {})
                if x in points:
                    return fmt(points[x])
                return f"{fmt(points[max(points)])} (T={max(points)})" if points else "-"

            rows = [[label, self.kinds.get(label, "")] + [cell(label, series, x, fmt) for _, series, x, fmt in cols]
                    for label in labels]
            out.append(("Sweep, at the longest length of each column, else at the layer's own longest (T=...); "
                        "- : no successful row:",
                        table(["layer", "kind"] + [c[0] for c in cols], rows)))
        if self.capacity:
            points = {p.label: p for p in self.pareto_points()[0]}
            rows = []
            for label, crows in self.capacity_rows_by_label().items():
                tau = series_tau(crows)[0]
                acc = {int(r["pairs"]): float(r["accuracy"]) for r in crows}
                last_ok, drop = first_drop(acc, tau)
                p = points.get(label)
                rows.append([label, f"{tau:g}", "-" if p is None else f"{p.capacity:.4g}",
                             "-" if p is None else human_bytes(p.state_bytes), str(last_ok or "-"), str(drop or "-")])
            out.append(("Capacity:", table(["series", "tau", "capacity@tau", "state bytes", "last pairs >= tau",
                                            "first pairs < tau"], rows)))
        return out

    def noisy(self) -> list[str]:
        """Successful sweep rows whose timing spread p80/p20 exceeds NOISY_SPREAD, widest first."""
        spread = [(r["ms_p80"] / r["ms_p20"], r) for r in self.sweep if r.get("status") == "ok"
                  and r.get("ms_p20") and r.get("ms_p80")]
        wide = sorted(((s, r) for s, r in spread if s > NOISY_SPREAD), key=lambda sr: -sr[0])
        return [f"{self.sweep_labels(r)} {r['mode']} T={r['seq']} ({s:.3g}x)" for s, r in wide]

    def failed(self) -> list[dict]:
        out = []
        for f in self.files:
            for r in f.rows:
                status = r.get("status")
                if status in (None, "ok"):
                    continue
                cell = (f"{r.get('mode')} T={r.get('seq')} B={r.get('batch')}" if f.kind == "sweep" else
                        f"R={r.get('world_size')} {r.get('strategy')} T={r.get('seq')}" if f.kind == "distributed"
                        else f"{r.get('method')} pairs={r.get('pairs')}")
                note = str(r.get("note") or "")
                out.append({"file": f.path.name, "layer": str(r.get("layer")), "cell": cell, "status": status,
                            "note": note if len(note) <= 100 else note[:97] + "..."})
        return out


def where_time_goes(report: Report, docs: list[dict], seq: int | None) -> Section:
    """One stacked bar per traced (layer, mode) at length `seq` (default: the longest traced) from breakdown
    documents (`ovqprof trace`): top-level phases plus `other`, ms per call, with a reading per bar."""
    title = "Where the time goes"
    if not docs:
        return Section(title, None, "Omitted: no breakdown files (`ovqprof trace --output DIR`, then "
                                    "`ovqprof report ... --traces DIR`).")
    seqs = sorted({d["header"]["seq"] for d in docs})
    chosen = seq if seq is not None else seqs[-1]
    picked = [d for d in docs if d["header"]["seq"] == chosen]
    if not picked:
        return Section(title, None, f"Omitted: no breakdown at T={chosen} (traced: {', '.join(map(str, seqs))}).")
    bars: dict[str, dict[str, float]] = {}
    readings = []
    for d in sorted(picked, key=lambda d: (d["header"]["layer"], MODES.index(d["header"]["mode"]))):
        h = d["header"]
        parts = _bar_parts(d["rows"])
        bars[f"{h['layer']} {h['mode']}\n{h['total_ms']:.3g} ms"] = parts
        ranked = sorted(parts.items(), key=lambda kv: -kv[1])[:2]
        share = ", ".join(f"{pct:.0f}% in {name}" for name, pct in ranked)
        readings.append(f"{h['layer']} {h['mode']} spends {share} of {h['total_ms']:.3g} ms ({h['clock']} time)")
    image = plots.stacked_bars(bars, report.path("breakdown.png"), ylabel="% of the traced call",
                               title=f"Where the time goes at T={chosen}").name
    when = f"{chosen // 1024}k" if chosen % 1024 == 0 else str(chosen)
    reading = f"At {when}: " + "; ".join(readings) + ". Traced calls are separate from the timed ones."
    return Section(title, image, reading)


def _bar_parts(rows: list[dict]) -> dict[str, float]:
    """% of the call per segment of a breakdown's bar: top-level phases and `other`, a phase with sub-phases
    replaced by them (and `<phase> (rest)` for its time outside them); a layer without phases shows its three
    largest operators."""
    top = [r for r in rows if r["kind"] in ("phase", "other") and not r["parent"]]
    if not top:
        return {r["name"]: r["pct"] for r in [r for r in rows if r["kind"] == "op"][:3]}
    parts: dict[str, float] = {}
    for r in top:
        children = [c for c in rows if c["kind"] == "phase" and c["parent"] == r["name"]]
        if not children:
            parts[r["name"]] = r["pct"]
            continue
        for c in children:
            parts[c["name"]] = c["pct"]
        rest = r["pct"] - sum(c["pct"] for c in children)
        if rest > 0.5:
            parts[f"{r['name']} (rest)"] = rest
    return parts


def load_breakdowns(trace_dir: Path | None) -> list[dict]:
    """The breakdown documents in a trace directory (none when it is None)."""
    from ovqprof.trace import read_breakdown

    if trace_dir is None:
        return []
    if not trace_dir.is_dir():
        raise UsageError(f"--traces {trace_dir} is not a directory. Allowed: a directory written by "
                         "`ovqprof trace --output DIR` or `ovqprof sweep --trace DIR`")
    files = sorted(trace_dir.glob("*.breakdown.json"))
    if not files:
        raise UsageError(f"--traces {trace_dir} holds no *.breakdown.json files. Allowed: a directory written "
                         "by `ovqprof trace --output DIR` or `ovqprof sweep --trace DIR`")
    try:
        return [read_breakdown(f) for f in files]
    except ValueError as exc:
        raise UsageError(f"--traces: {exc}") from None


def write_report(paths: list[Path], out_dir: Path, generated: str | None = None, traces: Path | None = None,
                 trace_seq: int | None = None) -> Path:
    """Write out_dir/report.md and its plots; returns the report's path. Plots of earlier runs that this
    run does not draw are removed so the folder matches report.md. `traces`: a directory of breakdowns for
    the "Where the time goes" section, at length `trace_seq` (default: the longest traced)."""
    files = load_result_files(paths)
    docs = load_breakdowns(traces)
    check_output_dir(out_dir, "to hold report.md and its PNG plots")
    report = Report(files, out_dir)
    sections = [report.throughput(), report.decode(), report.memory(), report.state(), report.recall(),
                report.pareto(), where_time_goes(report, docs, trace_seq),
                *distributed_sections(report.distributed, report)]
    for name in PLOT_FILES:
        if name not in report.written and (out_dir / name).exists():
            (out_dir / name).unlink()
    generated = generated or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = render(files, generated, report.key_tables(), sections, report.failed(), report.noisy(), NOISY_SPREAD)
    path = out_dir / "report.md"
    path.write_text(text)
    return path
