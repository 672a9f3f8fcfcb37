"""PNG plots for the report, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display).

Each function takes series ({label: {x: y}}) and a path, writes one PNG at DPI and returns the path. Colours
and markers follow the label, so a layer looks the same in every plot of a report.
"""

from __future__ import annotations

import textwrap
import zlib
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ovqprof.report.readings import ParetoPoint, pareto_front
from ovqprof.report.series import Series

DPI = 100
PANEL_SIZE = (5.2, 4.0)  # inches per panel
LEGEND_COLUMNS = 5
# Twenty distinct colours (matplotlib's tab10, then darker tab20b/c tones): one per layer family.
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
           "#31a354", "#756bb1", "#636363", "#e6550d")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


LINESTYLES = ("-", "--", "-.", ":")
HIGHLIGHT_FAMILY = "ovq"  # OVQ variants are what a report is read for: drawn thicker, on top
# More lines than this in one panel cannot be told apart, even with unique styles: the rest go to more panels.
MAX_SERIES_PER_PANEL = 8
COINCIDE_REL = 0.01  # lines closer than this everywhere are drawn over each other: named in a note instead
NOTE_WIDTH = 60  # characters per line of that note, under a panel's title


class Palette(list):
    """The report's labels in order (a list, as `style` expects) with each label's family (`kind`), so a
    family shares a colour and its members differ by marker and line style."""

    def __init__(self, labels: list[str], families: dict[str, str]):
        super().__init__(labels)
        self.families = families
        names = sorted({families.get(label, "") for label in labels})
        self.family_index = {name: i for i, name in enumerate(names)}
        self.member_index = {}
        for label in labels:
            members = [other for other in labels if families.get(other, "") == families.get(label, "")]
            self.member_index[label] = members.index(label)


def style(label: str, order: list[str]) -> dict:
    """Colour, marker, line style and width of a label. With a Palette: colour by family, marker and line style
    by member (unique per label), OVQ thicker and on top; with a plain list: by the label's place in it."""
    families = getattr(order, "families", None)
    if families is not None and label in order:
        family = families.get(label, "")
        f, m = order.family_index[family], order.member_index[label]
        highlight = family == HIGHLIGHT_FAMILY
        return {"color": COLOURS[f % len(COLOURS)], "marker": MARKERS[m % len(MARKERS)],
                "linestyle": LINESTYLES[(m // len(MARKERS) + f // len(COLOURS)) % len(LINESTYLES)],
                "linewidth": 2.6 if highlight else 1.4, "zorder": 3 if highlight else 2}
    i = order.index(label) if label in order else zlib.crc32(label.encode())
    return {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[(i // len(COLOURS) + i) % len(MARKERS)]}


def _bytes_tick(value: float, _pos: object) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} B"


def _si(value: float) -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _plain_log_ticks(ax) -> None:
    """Log y labels as plain numbers (0.2, 4M) instead of 2x10^-1; minor ticks labelled (at 2, 3, 5 of
    each decade) only when the axis spans less than two decades, where majors alone are too few."""
    import math

    def minor(value: float, _pos: object) -> str:
        low, high = ax.get_ylim()
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return _si(value) if high / max(low, 1e-300) < 100 and mantissa in (2, 3, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: _si(v)))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _figure(panels: int, width: float = PANEL_SIZE[0], rows: int = 1) -> tuple[Figure, list]:
    """A figure of `rows` x `panels` axes, returned row by row."""
    fig = Figure(figsize=(max(width * panels, 7.0), PANEL_SIZE[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, panels, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def split_by_family(series: Series, order: list[str], limit: int = MAX_SERIES_PER_PANEL) -> list[Series]:
    """`series` in parts of at most `limit` lines: whole families together where they fit (a family larger
    than the room left is cut), OVQ's family in every part as the reference the report is read against."""
    families = getattr(order, "families", {})
    highlight = [label for label in series if families.get(label) == HIGHLIGHT_FAMILY]
    if len(series) <= limit or len(highlight) >= limit:
        return [series]
    rest: dict[str, list[str]] = {}
    for label in series:
        if label not in highlight:
            rest.setdefault(families.get(label, label), []).append(label)
    room = limit - len(highlight)
    parts: list[list[str]] = [[]]
    for members in rest.values():
        if parts[-1] and len(parts[-1]) + len(members) > room:
            parts.append([])
        for label in members:
            if len(parts[-1]) == room:
                parts.append([])
            parts[-1].append(label)
    return [{label: series[label] for label in highlight + part} for part in parts]


def coinciding(series: Series, rel: float = COINCIDE_REL) -> list[list[str]]:
    """Groups of labels whose lines lie on each other: the same x values and every y within `rel`."""
    groups: list[list[str]] = []
    for label, points in series.items():
        for group in groups:
            first = series[group[0]]
            if set(first) == set(points) and all(
                    abs(points[x] - first[x]) <= rel * max(abs(points[x]), abs(first[x])) for x in points):
                group.append(label)
                break
        else:
            groups.append([label])
    return [group for group in groups if len(group) > 1]


def _lines(ax, series: Series, order: list[str]) -> str:
    """Draws one line per series; returns the note naming lines that lie on each other ("" if none), which
    the caller puts under the panel's title (a note inside the axes would cover points)."""
    for label, points in series.items():
        xs = list(points)
        ax.plot(xs, [points[x] for x in xs], label=label, markersize=5, **{"linewidth": 1.6, **style(label, order)})
    same = coinciding(series)
    if not same:
        return ""
    return textwrap.fill("same line: " + "; ".join(" = ".join(g) for g in same), NOTE_WIDTH)


def _title(ax, title: str, note: str) -> None:
    ax.set_title(f"{title}\n{note}" if note else title, fontsize=10 if note else None)


def _shared_legend(fig: Figure, axes: list) -> None:
    """One legend under the panels (never over the lines), each label once."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", fontsize=8,
               ncols=min(LEGEND_COLUMNS, len(seen)), frameon=False)


def _finish(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def _seq_axis(ax, series: Series, log: bool = True) -> None:
    xs = sorted({x for points in series.values() for x in points})
    if log:
        ax.set_xscale("log", base=2)
    if xs and len(xs) <= 12:
        ax.set_xticks(xs, [f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x) for x in xs])
        ax.minorticks_off()


def _grid(panels: dict[str, Series], order: list[str]) -> tuple[Figure, list[tuple[object, str, Series]]]:
    """One column per key of `panels`, each split into rows of at most MAX_SERIES_PER_PANEL series
    (`split_by_family`). Returns the figure and (axes, panel name, series) per drawn panel; a column with
    fewer parts than the tallest leaves its lower axes hidden."""
    columns = {name: split_by_family(series, order) for name, series in panels.items()}
    rows = max((len(parts) for parts in columns.values()), default=1)
    fig, axes = _figure(len(panels), rows=rows)
    cells: dict[int, tuple[str, Series]] = {}
    for c, (name, parts) in enumerate(columns.items()):
        for r, part in enumerate(parts):
            numbered = f"{name} ({r + 1}/{len(parts)})".strip() if len(parts) > 1 else name
            cells[r * len(panels) + c] = (numbered, part)
    for i, ax in enumerate(axes):
        ax.set_visible(i in cells)
    return fig, [(axes[i], name, series) for i, (name, series) in sorted(cells.items())]


def lines_by_panel(panels: dict[str, Series], path: Path, order: list[str], *, xlabel: str, ylabel: str,
                   title: str, ylog: bool = True, ybytes: bool = False) -> Path:
    """One panel per key of `panels` (e.g. per mode), one line per series, log-log by default; a panel with
    more than MAX_SERIES_PER_PANEL series becomes a column of panels (`split_by_family`)."""
    fig, cells = _grid(panels, order)
    for ax, name, series in cells:
        values = [y for points in series.values() for y in points.values() if y > 0]
        # bytes on a log axis spanning less than 4x get too few ticks: plot them linear, in MiB, then
        linear_mib = ybytes and (not ylog or not values or max(values) < 4 * min(values))
        if linear_mib:
            series = {label: {x: y / 2**20 for x, y in points.items()} for label, points in series.items()}
        note = _lines(ax, series, order)
        _seq_axis(ax, series)
        if ylog and not linear_mib:
            ax.set_yscale("log", base=2 if ybytes else 10)
            if not ybytes:
                _plain_log_ticks(ax)
        if ybytes and not linear_mib:
            ax.yaxis.set_major_formatter(FuncFormatter(_bytes_tick))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ylabel}, MiB" if linear_mib else ylabel)
        _title(ax, f"{title}: {name}" if name else title, note)
        ax.grid(True, which="both", alpha=0.3)
    _shared_legend(fig, [ax for ax, _name, _series in cells])
    return _finish(fig, path)


def recall_plot(acc: Series, taus: list[float], path: Path, order: list[str]) -> Path:
    fig, cells = _grid({"": acc}, order)
    for ax, name, series in cells:
        note = _lines(ax, series, order)
        _seq_axis(ax, series)
        for tau in sorted(set(taus)):
            ax.axhline(tau, color="black", linestyle="--", linewidth=1, label=f"tau = {tau:g}")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("stored key-value pairs")
        ax.set_ylabel("recall accuracy")
        _title(ax, f"Recall vs pairs {name}".strip(), note)
        ax.grid(True, which="both", alpha=0.3)
    _shared_legend(fig, [ax for ax, _name, _series in cells])
    return _finish(fig, path)


def label_groups(points: list[ParetoPoint], ratio: float = 1.3) -> list[tuple[ParetoPoint, str]]:
    """One annotation per cluster of points that would print over each other: the same capacity and state
    bytes within `ratio` of the cluster's first point (log axes). Returns (anchor, "a, b, c") pairs."""
    groups: list[list[ParetoPoint]] = []
    for p in sorted(points, key=lambda p: (p.capacity, p.state_bytes)):
        g = groups[-1] if groups else None
        if g and g[0].capacity == p.capacity and p.state_bytes <= g[0].state_bytes * ratio:
            g.append(p)
        else:
            groups.append([p])
    return [(g[0], ", ".join(p.label for p in g)) for g in groups]


def pareto_plot(points: list[ParetoPoint], tau: float, path: Path, order: list[str]) -> Path:
    fig, (ax,) = _figure(1)
    front = pareto_front(points)
    for p in points:
        s = style(p.label, order)
        on = p in front
        ax.scatter([p.state_bytes], [p.capacity], s=80 if on else 40, color=s["color"], marker=s["marker"],
                   edgecolors="black" if on else "none", linewidths=1.5, zorder=3, label=p.label)
    for anchor, text in label_groups(points):
        ax.annotate(text, (anchor.state_bytes, anchor.capacity), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    if front:  # staircase: the most capacity reachable with at most this much state
        xs = [p.state_bytes for p in front]
        ys = [p.capacity for p in front]
        ax.step(xs, ys, where="post", color="black", linewidth=1, linestyle=":", label="Pareto front", zorder=2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(_bytes_tick))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: _si(v)))
    ax.margins(0.15)
    ax.set_xlabel("state bytes")
    ax.set_ylabel(f"capacity (pairs at accuracy >= {tau:g})")
    ax.set_title("Capacity vs state bytes (front: black edges)")
    ax.grid(True, which="both", alpha=0.3)
    _shared_legend(fig, [ax])
    return _finish(fig, path)


def stacked_bars(bars: dict[str, dict[str, float]], path: Path, *, ylabel: str, title: str) -> Path:
    """One stacked bar per key of `bars` ({bar: {segment: value}}), segments in first-seen order, each
    segment name one colour across bars."""
    segments = list(dict.fromkeys(name for parts in bars.values() for name in parts))
    fig, (ax,) = _figure(1, width=max(PANEL_SIZE[0], 1.1 * len(bars) + 2) + 2.0)  # + the legend's column
    labels = list(bars)
    bottoms = [0.0] * len(labels)
    for i, segment in enumerate(segments):
        heights = [bars[label].get(segment, 0.0) for label in labels]
        ax.bar(labels, heights, bottom=bottoms, label=segment, color=COLOURS[i % len(COLOURS)],
               hatch="//" if i >= len(COLOURS) else None)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
    return _finish(fig, path)
