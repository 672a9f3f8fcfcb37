"""Rows to plot series: {label: {x: y}}, one series per layer (and per batch, device or method where the
inputs hold more than one), so plots, readings and tables name lines the same way."""

from __future__ import annotations

from collections.abc import Callable

Series = dict[str, dict[int, float]]

OK = "ok"


class SweepLabels:
    """Labels of sweep series: the layer name, plus batch and device when the inputs mix several."""

    def __init__(self, rows: list[dict]):
        self.batches = {r.get("batch") for r in rows}
        self.devices = {_device_kind(r) for r in rows}

    def __call__(self, row: dict) -> str:
        label = str(row["layer"])
        if len(self.batches) > 1:
            label += f" B={row.get('batch')}"
        if len(self.devices) > 1:
            label += f" ({_device_kind(row)})"
        return label

    def group(self, row: dict) -> str:
        """The batch and device of a row ("" when the inputs hold one of each): layers are only ranked and
        compared within a group (ms per step at B=64 is no rival to B=1)."""
        parts = []
        if len(self.batches) > 1:
            parts.append(f"B={row.get('batch')}")
        if len(self.devices) > 1:
            parts.append(_device_kind(row))
        return ", ".join(parts)


def _device_kind(row: dict) -> str:
    """`cuda:1` -> `cuda`, `cpu:0` -> `cpu`: the slots of one `sweep --devices` run are one device model, so
    their rows make one series, not a series per worker."""
    return str(row.get("device")).split(":")[0]


def split_groups(series: Series, groups: dict[str, str]) -> dict[str, Series]:
    """{group: the series of that group}, groups in order of first appearance."""
    out: dict[str, Series] = {}
    for label, points in series.items():
        out.setdefault(groups.get(label, ""), {})[label] = points
    return out


def sweep_series(rows: list[dict], labels: SweepLabels, mode: str | None, value: Callable[[dict], float | None],
                 ok_only: bool = True) -> Series:
    """{label: {seq: value}} of the rows of one mode (any mode when None). A later row for the same cell
    replaces an earlier one (a re-run in a later file wins)."""
    out: Series = {}
    for row in rows:
        if mode is not None and row.get("mode") != mode:
            continue
        if ok_only and row.get("status") != OK:
            continue
        y = value(row)
        if y is None or row.get("seq") is None:
            continue
        out.setdefault(labels(row), {})[int(row["seq"])] = float(y)
    return {k: dict(sorted(v.items())) for k, v in out.items() if v}


def kind_of_label(rows: list[dict], labels: Callable[[dict], str]) -> dict[str, str]:
    """{label: kind} (the row's `kind`, else its `type`, else "")."""
    return {labels(r): str(r.get("kind") or r.get("type") or "") for r in rows}


class CapacityLabels:
    """Labels of capacity series: the layer name, plus method, keys, gap, seq, d_model, dtype and device
    where the inputs mix several (an MQAR sweep over seq gives one series per seq)."""

    VARYING = ("method", "keys", "gap", "seq", "d_model", "dtype", "device")

    def __init__(self, rows: list[dict]):
        self.varying = [col for col in self.VARYING if len({str(r.get(col)) for r in rows}) > 1]

    def __call__(self, row: dict) -> str:
        extra = [f"{col}={row.get(col)}" if col in ("gap", "seq", "d_model") else str(row.get(col))
                 for col in self.varying]
        return str(row["layer"]) + (f" ({', '.join(extra)})" if extra else "")


def capacity_ok(row: dict) -> bool:
    return row.get("status") in (None, OK) and row.get("accuracy") is not None and row.get("pairs") is not None


def accuracy_series(rows: list[dict], labels: CapacityLabels) -> Series:
    """{label: {pairs: accuracy}} of the usable capacity rows."""
    out: Series = {}
    for row in rows:
        if capacity_ok(row):
            out.setdefault(labels(row), {})[int(row["pairs"])] = float(row["accuracy"])
    return {k: dict(sorted(v.items())) for k, v in out.items()}
