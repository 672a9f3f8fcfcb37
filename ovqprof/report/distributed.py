"""The report's distributed-decode section: decode latency and bytes sent per rank against context, one line
per (strategy, world size), OVQ-attention's single-device step on the latency plot, and a reading at the
longest context of each world size (tree against ring: times and bytes)."""

from __future__ import annotations

from ovqprof.output import human_bytes
from ovqprof.report import plots
from ovqprof.report.markdown import Section, table
from ovqprof.report.readings import fmt_ms
from ovqprof.report.series import Series

OVQ_LABEL = "ovq (1 device)"
PLOT_FILES = ("distributed-latency.png", "distributed-bytes.png")


def _label(row: dict) -> str:
    return f"{row['strategy']} R={row['world_size']}"


def distributed_series(rows: list[dict], column: str) -> Series:
    """{"tree R=2": {seq: value}} of the ok rows (a later row for the same cell wins)."""
    out: Series = {}
    for r in rows:
        if r.get("status") == "ok" and r.get(column) is not None:
            out.setdefault(_label(r), {})[int(r["seq"])] = float(r[column])
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def _ovq_series(rows: list[dict]) -> Series:
    points = {int(r["seq"]): float(r["ovq_ms"]) for r in rows if r.get("ovq_ms") is not None}
    return {OVQ_LABEL: dict(sorted(points.items()))} if points else {}


def reading(rows: list[dict]) -> tuple[str, list[str]]:
    """A sentence per world size at its longest context with ok rows, and a table of every strategy there."""
    sentences, lines = [], []
    for world_size in sorted({int(r["world_size"]) for r in rows}):
        ok = [r for r in rows if int(r["world_size"]) == world_size and r.get("status") == "ok"]
        if not ok:
            continue
        longest = max(int(r["seq"]) for r in ok)
        at = {r["strategy"]: r for r in ok if int(r["seq"]) == longest}
        for r in at.values():
            lines.append([str(world_size), str(longest), r["strategy"], fmt_ms(r["ms_median"]),
                          human_bytes(r["bytes_sent"]), human_bytes(r.get("mem_peak_bytes")),
                          "-" if r.get("ovq_ms") is None else fmt_ms(r["ovq_ms"])])
        if world_size > 1 and "tree" in at and "ring" in at:
            tree, ring = at["tree"], at["ring"]
            speed = ring["ms_median"] / tree["ms_median"]
            sent = ring["bytes_sent"] / tree["bytes_sent"] if tree["bytes_sent"] else float("inf")
            sentences.append(f"At R={world_size}, T={longest}: tree takes {fmt_ms(tree['ms_median'])} per step, ring "
                             f"{fmt_ms(ring['ms_median'])} ({speed:.3g}x {'faster' if speed >= 1 else 'slower'}), "
                             f"sending {sent:.3g}x fewer bytes per rank.")
    return " ".join(sentences) or "No world size has both tree and ring rows.", lines


def distributed_sections(rows: list[dict], report) -> list[Section]:
    """The latency and bytes sections (`report.path(name)` records each written plot)."""
    title_ms, title_bytes = "Distributed decode latency vs context", "Bytes sent per rank vs context"
    if not rows:
        return []
    latency = distributed_series(rows, "ms_median")
    if not latency:
        return [Section(title_ms, None, "Omitted: no successful distributed row.")]
    families = {label: label.split(" ")[0] for label in latency} | {OVQ_LABEL: "ovq"}
    order = plots.Palette(sorted(families), families)
    image = plots.lines_by_panel({"": {**latency, **_ovq_series(rows)}}, report.path(PLOT_FILES[0]), order,
                                 xlabel="context length T", ylabel="ms per step (slowest rank)",
                                 title="Decode step, KV cache sharded over R ranks").name
    text, lines = reading(rows)
    section = Section(title_ms, image, text + " OVQ's line is its whole decode step on one device (constant state).")
    section.tables.append(table(["R", "T", "strategy", "ms/step", "sent/rank", "peak mem", "ovq ms"], lines))
    sent = {k: v for k, v in distributed_series(rows, "bytes_sent").items() if any(y > 0 for y in v.values())}
    if not sent:
        return [section, Section(title_bytes, None, "Omitted: no row with R > 1 sent any bytes.")]
    image = plots.lines_by_panel({"": sent}, report.path(PLOT_FILES[1]), order, xlabel="context length T",
                                 ylabel="bytes sent per rank per step", title="Communication", ybytes=True).name
    return [section, Section(title_bytes, image, "Counted from the collectives' tensor sizes (ring-algorithm "
                                                 "convention); tree's stay flat in T, ring's and all-gather's grow "
                                                 "with the cache.")]
