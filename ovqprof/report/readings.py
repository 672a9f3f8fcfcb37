"""The numbers behind each plot's reading, and the sentences that say them: who wins where and where the
ranking changes, state bytes relative to the KV cache, where OVQ's dictionary saturates, the Pareto front.

Every function here is pure (series or rows in, numbers or text out) so tests can check the readings against
numbers they compute themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ovqprof.output import human_bytes
from ovqprof.report.series import Series

DEFAULT_TAU = 0.9
MAX_CHANGES_LISTED = 6


# --- formatting ------------------------------------------------------------------------------------------
def fmt_rate(value: float) -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix} tok/s"
    return f"{value:.3g} tok/s"


def fmt_ms(value: float) -> str:
    return f"{value:.3g} ms"


def fmt_ratio(value: float) -> str:
    return f"{value:.3g}x"


def join_words(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# --- who wins where --------------------------------------------------------------------------------------
@dataclass
class Ranking:
    """`winners`: {x: best label} at every x where at least two series were measured; `changes`:
    (previous x, x, previous leader, new leader) wherever the leader differs from the one before."""

    winners: dict[int, str]
    changes: list[tuple[int, int, str, str]]


def best_at(series: Series, x: int, higher_is_better: bool) -> list[tuple[str, float]]:
    """[(label, value)] of the series measured at x, best first (ties by label, so the order is stable)."""
    values = [(label, points[x]) for label, points in series.items() if x in points]
    return sorted(values, key=lambda lv: (-lv[1] if higher_is_better else lv[1], lv[0]))


def rank_by_length(series: Series, higher_is_better: bool) -> Ranking:
    xs = sorted({x for points in series.values() for x in points})
    winners = {}
    for x in xs:
        ranked = best_at(series, x, higher_is_better)
        if len(ranked) >= 2:
            winners[x] = ranked[0][0]
    changes = []
    items = list(winners.items())
    for (x0, w0), (x1, w1) in zip(items, items[1:], strict=False):
        if w0 != w1:
            changes.append((x0, x1, w0, w1))
    return Ranking(winners, changes)


def overtake_length(series: Series, first: str, second: str, higher_is_better: bool) -> int | None:
    """The shortest length from which `second` beats `first` at every length measured for both."""
    common = sorted(set(series[first]) & set(series[second]))
    better = [(series[second][x] > series[first][x]) if higher_is_better else (series[second][x] < series[first][x])
              for x in common]
    for i, x in enumerate(common):
        if all(better[i:]):
            return x
    return None


def crossing_estimate(first: dict[int, float], second: dict[int, float], cross: int) -> float | None:
    """Where two lines cross between the measured length before `cross` and `cross`, interpolating
    log(value ratio) linearly in log(T); None when there is no measured length before `cross`."""
    import math

    before = [x for x in sorted(set(first) & set(second)) if x < cross]
    if not before:
        return None
    x0 = before[-1]
    g0 = math.log(second[x0] / first[x0])
    g1 = math.log(second[cross] / first[cross])
    if g0 == g1:
        return None
    t = g0 / (g0 - g1)
    return math.exp(math.log(x0) + t * (math.log(cross) - math.log(x0)))


def ranking_reading(what: str, series: Series, higher_is_better: bool, fmt, best_word: str) -> str:
    """One paragraph: the best series at the shortest and longest compared lengths (with its margin over the
    next), where the lead changes, and from which length the long-length winner beats the short-length one."""
    if not series:
        return f"{what}: no rows."
    if len(series) == 1:
        (label, points), = series.items()
        return (f"{what}: only {label} was measured ({fmt(points[min(points)])} at T={min(points)}, "
                f"{fmt(points[max(points)])} at T={max(points)}); nothing to compare.")
    ranking = rank_by_length(series, higher_is_better)
    if not ranking.winners:
        return f"{what}: no length was measured for two layers; nothing to compare."
    xs = list(ranking.winners)

    def at(x: int) -> str:
        (w, v), (n, nv) = best_at(series, x, higher_is_better)[:2]
        margin = v / nv if higher_is_better else nv / v
        return f"at T={x} {w} is {best_word} ({fmt(v)}, {fmt_ratio(margin)} better than {n}, the next)"

    text = f"{what}: {at(xs[0])}"
    if len(xs) > 1:
        text += f"; {at(xs[-1])}"
    text += "."
    if not ranking.changes:
        return text + (f" The lead does not change over T={xs[0]}..{xs[-1]}." if len(xs) > 1 else "")
    listed = [f"T={x1} ({new} takes the lead from {old})" for _, x1, old, new in ranking.changes]
    more = len(listed) - MAX_CHANGES_LISTED
    listed = listed[:MAX_CHANGES_LISTED] + ([f"{more} more"] if more > 0 else [])
    text += f" The lead changes at {join_words(listed)}."
    short_winner, long_winner = ranking.winners[xs[0]], ranking.winners[xs[-1]]
    if short_winner != long_winner:
        cross = overtake_length(series, short_winner, long_winner, higher_is_better)
        if cross is not None:
            text += f" Crossover: {long_winner} beats {short_winner} from T={cross} on"
            estimate = crossing_estimate(series[short_winner], series[long_winner], cross)
            text += (f" (the lines cross near T={estimate:.0f} by log-log interpolation)." if estimate else
                     " (at every length measured).")
    return text


# --- memory ----------------------------------------------------------------------------------------------
def state_is_constant(points: dict[int, float]) -> bool:
    return len(points) >= 2 and len(set(points.values())) == 1


def kv_reference(state: Series, kinds: dict[str, str]) -> str | None:
    """The KV cache to compare with: the softmax series whose state is largest at its longest length
    (full multi-head attention rather than GQA, MQA or a sliding window)."""
    softmax = [label for label in state if kinds.get(label) == "softmax" and not state_is_constant(state[label])]
    if not softmax:
        return None
    return max(softmax, key=lambda label: (state[label][max(state[label])], label))


def kv_ratios(state: Series, reference: str) -> dict[str, dict[int, float]]:
    """{label: {seq: state bytes / reference state bytes}} at the lengths both have."""
    ref = state[reference]
    return {label: {x: points[x] / ref[x] for x in sorted(points) if x in ref and ref[x]}
            for label, points in state.items() if label != reference}


def state_reading(state: Series, kinds: dict[str, str]) -> str:
    """Which layers hold a constant state and which grow, and each one's ratio to the KV cache."""
    if not state:
        return "State bytes: no rows with state_bytes."
    constant = [f"{label} ({human_bytes(points[min(points)])})" for label, points in state.items()
                if state_is_constant(points)]
    growing = [f"{label} ({human_bytes(points[min(points)])} at T={min(points)} to "
               f"{human_bytes(points[max(points)])} at T={max(points)})" for label, points in state.items()
               if len(points) >= 2 and not state_is_constant(points)]
    text = ""
    if constant:
        text += f"Constant state: {join_words(constant)}. "
    if growing:
        text += f"Growing with context: {join_words(growing)}. "
    reference = kv_reference(state, kinds)
    if reference is None:
        return text + "No growing softmax (KV cache) layer in the inputs, so no ratio to the KV cache."
    text += f"Relative to the KV cache of {reference} (table below for every length):"
    for label, ratios in kv_ratios(state, reference).items():
        if not ratios:
            continue
        xs = list(ratios)
        span = (f"{fmt_ratio(ratios[xs[0]])} at T={xs[0]} to {fmt_ratio(ratios[xs[-1]])} at T={xs[-1]}"
                if len(xs) > 1 else f"{fmt_ratio(ratios[xs[0]])} at T={xs[0]}")
        below = [x for x in xs if ratios[x] < 1]
        if below and all(ratios[x] < 1 for x in xs if x >= below[0]):
            where = "smaller at every length measured" if below[0] == xs[0] else f"smaller from T={below[0]} on"
        elif below:
            where = "smaller at some lengths only"
        else:
            where = "never smaller here"
        text += f" {label} {span}, {where};"
    return text.rstrip(";") + "."


def memory_reading(panels: dict[str, Series], column: str, isolated: bool | None, plotted: bool = True) -> str:
    """Per mode: the lowest and highest peak at the longest length; and what the column means."""
    text = f"Plotted column: {column}." if plotted else f"Column: {column}."
    for mode, peak in panels.items():
        x = max(x for points in peak.values() for x in points)
        at_x = sorted((points[x], label) for label, points in peak.items() if x in points)
        if len(at_x) >= 2:
            (lo, lo_label), (hi, hi_label) = at_x[0], at_x[-1]
            text += (f" {mode}: at T={x} {lo_label} peaks lowest ({human_bytes(lo)}) and {hi_label} highest "
                     f"({human_bytes(hi)}, {fmt_ratio(hi / lo)} the lowest).")
    if column == "mem_rss_peak_bytes":
        text += (" RSS is the peak resident memory of the whole measuring process (weights, PyTorch and the "
                 "interpreter included), not the layer's own working set")
        if isolated is False:
            text += ("; this sweep ran without --isolate, so it is the running peak of one process and grows "
                     "with the order in which cells ran, not only with the layer")
        text += ". On CPU, compare layers by the analytic state bytes below."
    return text


# --- capacity ----------------------------------------------------------------------------------------------
def first_drop(points: dict[int, float], tau: float) -> tuple[int | None, int | None]:
    """(largest pairs before the first drop with accuracy >= tau, first pairs with accuracy < tau)."""
    last_ok = None
    for pairs in sorted(points):
        if points[pairs] < tau:
            return last_ok, pairs
        last_ok = pairs
    return last_ok, None


def series_tau(rows: list[dict]) -> tuple[float, bool]:
    """(tau, given): the rows' tau column, or DEFAULT_TAU when no row carries one."""
    taus = [float(r["tau"]) for r in rows if r.get("tau") is not None]
    return (taus[0], True) if taus else (DEFAULT_TAU, False)


def dict_size_of(layer: str, rows: list[dict], headers: list[dict]) -> int | None:
    """An OVQ layer's dictionary size: a `dict_size` column, the layer's resolved options in a file header
    (so a size left at its default is found too; `ovqprof.run.resolved_options`), or `dict_size=N` in a
    note."""
    from ovqprof.run import resolved_options

    for row in rows:
        if row.get("dict_size") is not None:
            return int(row["dict_size"])
    for header in headers:
        for spec in header.get("layers") or []:
            if isinstance(spec, dict) and spec.get("name") == layer:
                size = resolved_options(spec).get("dict_size", spec.get("dict_size"))
                if size is not None:
                    return int(size)
    for row in rows:
        match = re.search(r"dict_size\s*[=:]\s*(\d+)", str(row.get("note") or ""))
        if match:
            return int(match.group(1))
    return None


def is_ovq(row: dict) -> bool:
    return "ovq" in (str(row.get("kind") or "").lower(), str(row.get("type") or "").lower())


def saturation_reading(label: str, points: dict[int, float], tau: float, dict_size: int | None) -> str:
    last_ok, drop = first_drop(points, tau)
    size = f" (dict_size {dict_size})" if dict_size else ""
    if drop is None:
        return (f"{label}{size} stays at accuracy >= tau={tau:g} up to the largest pairs tested "
                f"({max(points)}): its dictionary does not saturate in this range.")
    rel = f", {drop / dict_size:.3g}x its dict_size" if dict_size else ""
    text = f"{label}{size} saturates: accuracy first drops below tau={tau:g} at {drop} pairs ({points[drop]:.3g}{rel})"
    if last_ok is None:
        return text + ", the smallest pairs tested."
    return text + f"; the last pairs with accuracy >= tau was {last_ok} ({points[last_ok]:.3g})."


def recall_reading(acc: Series, tau: float) -> str:
    parts = []
    for label, points in acc.items():
        last_ok, drop = first_drop(points, tau)
        if drop is None:
            parts.append(f"{label} >= {tau:g} up to {max(points)} pairs")
        elif last_ok is None:
            parts.append(f"{label} below {tau:g} already at {drop} pairs")
        else:
            parts.append(f"{label} >= {tau:g} up to {last_ok} pairs (first below at {drop})")
    best = max(acc, key=lambda label: (first_drop(acc[label], tau)[0] or 0, label))
    return (f"Accuracy vs pairs at tau={tau:g}: {join_words(parts)}. Most pairs held above tau: {best}.")


# --- Pareto ---------------------------------------------------------------------------------------------
@dataclass
class ParetoPoint:
    label: str
    state_bytes: float
    capacity: float


def pareto_front(points: list[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point dominates (as little or less state with as much or more capacity, one of
    them strictly), sorted by state bytes."""
    front = []
    for p in points:
        dominated = any(q.state_bytes <= p.state_bytes and q.capacity >= p.capacity and
                        (q.state_bytes < p.state_bytes or q.capacity > p.capacity) for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p.state_bytes, p.label))


def pareto_reading(points: list[ParetoPoint], tau: float) -> str:
    front = pareto_front(points)
    on = join_words([f"{p.label} ({p.capacity:.4g} pairs in {human_bytes(p.state_bytes)})" for p in front])
    text = f"Pareto front of capacity@tau={tau:g} vs state bytes: {on}."
    off = []
    for p in points:
        if p in front:
            continue
        by = min((q for q in front if q.state_bytes <= p.state_bytes and q.capacity >= p.capacity),
                 key=lambda q: q.state_bytes)
        off.append(f"{p.label} (dominated by {by.label})")
    if off:
        text += f" Off the front: {join_words(off)}."
    best = max(points, key=lambda p: (p.capacity / p.state_bytes, p.label))
    text += f" Most pairs per byte of state: {best.label} ({best.capacity / best.state_bytes * 1024:.3g} pairs/KiB)."
    return text
