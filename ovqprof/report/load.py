"""Read sweep, capacity and distributed result files (CSV or JSON, any mix) into typed rows.

A JSON file is {"header": {...}, "rows": [...]}; a CSV file has a header line of column names and no machine
header. Which kind a file holds is told by its columns: sweep rows have `mode` and `ms_median`, capacity rows
have `method`, `pairs` and `accuracy`, distributed rows `world_size`, `strategy` and `bytes_sent`. Input files are only read, never changed.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ovqprof.distributed.rows import FLOAT_COLUMNS as DISTRIBUTED_FLOATS
from ovqprof.distributed.rows import INT_COLUMNS as DISTRIBUTED_INTS
from ovqprof.distributed.rows import MARKERS as DISTRIBUTED_MARKERS
from ovqprof.errors import UsageError
from ovqprof.rows import FLOAT_COLUMNS as SWEEP_FLOATS
from ovqprof.rows import INT_COLUMNS as SWEEP_INTS

SWEEP_MARKERS = frozenset({"layer", "mode", "seq", "ms_median", "status"})
CAPACITY_MARKERS = frozenset({"method", "layer", "pairs", "accuracy"})

CAPACITY_INTS = frozenset({"d_model", "seq", "pairs", "dk", "dv", "state_bytes", "dict_size"})
CAPACITY_FLOATS = frozenset({"accuracy", "cosine", "rel_error", "capacity", "tau", "lr", "wall_s"})
# Capacity columns whose type the capacity command decides (a count or a name): numbers when they parse.
CAPACITY_MAYBE_NUMBERS = frozenset({"keys", "gap"})

ALLOWED = ("Allowed: a .csv or .json file written by `ovqprof sweep --output`, `ovqprof capacity --output` or "
           "`ovqprof distributed --output` (sweep rows have the columns mode and ms_median, capacity rows method, "
           "pairs and accuracy, distributed rows world_size, strategy and bytes_sent).")


@dataclass
class ResultFile:
    """One input file: `kind` is "sweep" or "capacity"; `header` is {} for CSV files."""

    path: Path
    kind: str
    fmt: str
    header: dict
    rows: list[dict] = field(default_factory=list)


def _number(value: object, as_int: bool) -> int | float:
    number = float(value)  # type: ignore[arg-type]
    if as_int:
        if not number.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(number)
    return number


def _maybe_number(value: object) -> object:
    if isinstance(value, (int, float)):
        return value
    try:
        return _number(value, as_int=True)
    except (TypeError, ValueError):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return value


def _typed(row: dict, kind: str) -> dict:
    ints, floats = {"sweep": (SWEEP_INTS, SWEEP_FLOATS), "distributed": (DISTRIBUTED_INTS, DISTRIBUTED_FLOATS)
                    }.get(kind, (CAPACITY_INTS, CAPACITY_FLOATS))
    out = {}
    for col, value in row.items():
        try:
            if value in ("", None):
                out[col] = None
            elif col in ints:
                out[col] = _number(value, as_int=True)
            elif col in floats:
                out[col] = _number(value, as_int=False)
            elif kind == "capacity" and col in CAPACITY_MAYBE_NUMBERS:
                out[col] = _maybe_number(value)
            else:
                out[col] = value
        except (TypeError, ValueError):
            raise ValueError(f"column {col} holds {value!r}, not a number") from None
    return out


def _kind_of(columns: set[str]) -> str | None:
    if DISTRIBUTED_MARKERS <= columns:
        return "distributed"
    if SWEEP_MARKERS <= columns:
        return "sweep"
    if CAPACITY_MARKERS <= columns:
        return "capacity"
    return None


def _parse(path: Path, text: str) -> tuple[str, dict, list[dict]]:
    """(format, header, raw rows) by content: JSON when the text starts with '{', CSV otherwise."""
    if text.lstrip().startswith("{"):
        doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            raise UsageError(f"{path} is JSON but not a result file: it has no \"rows\" list. {ALLOWED}")
        if any(not isinstance(r, dict) for r in doc["rows"]):
            raise UsageError(f"{path}: every entry of \"rows\" must be an object of columns. {ALLOWED}")
        header = doc.get("header") if isinstance(doc.get("header"), dict) else {}
        return "json", header, doc["rows"]
    reader = csv.DictReader(io.StringIO(text))
    rows = [r for r in reader if any(v not in ("", None) for v in r.values())]
    if not reader.fieldnames:
        raise UsageError(f"{path} has no CSV header line. {ALLOWED}")
    return "csv", {"_columns": list(reader.fieldnames)}, rows


def load_result_file(path: Path) -> ResultFile:
    """Read and type one result file; UsageError (exit 2) naming the file when it cannot be used."""
    if not path.exists():
        raise UsageError(f"{path} does not exist. {ALLOWED}")
    if path.is_dir():
        raise UsageError(f"{path} is a directory. {ALLOWED}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"{path} cannot be read ({why}). {ALLOWED}") from exc
    if not text.strip():
        raise UsageError(f"{path} is empty. {ALLOWED}")
    try:
        fmt, header, raw = _parse(path, text)
    except (ValueError, csv.Error) as exc:
        raise UsageError(f"{path} cannot be parsed ({exc}). {ALLOWED}") from exc
    columns = set(header.pop("_columns", [])) if fmt == "csv" else set().union(*(r.keys() for r in raw))
    if not raw:
        raise UsageError(f"{path} holds no result rows. {ALLOWED}")
    kind = _kind_of(columns)
    if kind is None:
        # the CLI prints messages through rich: a column such as "[tool]" would be read as markup
        shown = ", ".join(c.replace("[", "\\[") for c in sorted(columns)[:12]) + (", ..." if len(columns) > 12 else "")
        raise UsageError(f"{path} is neither sweep, capacity nor distributed results (its columns: {shown}). {ALLOWED}")
    if fmt == "csv" and any(None in r for r in raw):  # more cells than columns: a foreign or broken line
        raise UsageError(f"{path}: a CSV line has more cells than the header has columns. {ALLOWED}")
    markers = {"sweep": SWEEP_MARKERS, "distributed": DISTRIBUTED_MARKERS}.get(kind, CAPACITY_MARKERS)
    for i, row in enumerate(raw, start=1):
        missing = sorted(markers - set(row))
        if missing:
            raise UsageError(f"{path}, row {i}: the columns {', '.join(missing)} are missing. {ALLOWED}")
    try:
        rows = [_typed(r, kind) for r in raw]
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}. {ALLOWED}") from exc
    return ResultFile(path=path, kind=kind, fmt=fmt, header=header, rows=rows)


def load_result_files(paths: list[Path]) -> list[ResultFile]:
    if not paths:
        raise UsageError(f"no result files given. {ALLOWED}")
    return [load_result_file(Path(p)) for p in paths]
