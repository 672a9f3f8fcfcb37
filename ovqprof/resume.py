"""Read the rows of an earlier (possibly interrupted) result file, so `--resume FILE` can skip the cells
already there and append the rest."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ovqprof.errors import UsageError
from ovqprof.rows import COLUMNS, FLOAT_COLUMNS, INT_COLUMNS, cell_key

RESUMABLE_FORMATS = {".csv": "csv", ".json": "json"}


def resume_format(path: Path, option: str = "--resume") -> str:
    fmt = RESUMABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        verb = "resume" if option == "--resume" else "read"
        raise UsageError(f"{option} {path}: cannot {verb} a {path.suffix or 'suffix-less'} file. Allowed: a "
                         ".csv or .json file written by `ovqprof sweep --output`")
    return fmt


def _typed(row: dict, columns: tuple[str, ...] = COLUMNS, ints: frozenset = INT_COLUMNS,
           floats: frozenset = FLOAT_COLUMNS) -> dict:
    out = {}
    for col in columns:
        value = row.get(col)
        if value in ("", None):
            out[col] = None
        elif col in ints:
            out[col] = int(float(value))
        elif col in floats:
            out[col] = float(value)
        else:
            out[col] = value
    return out


def read_rows(path: Path, option: str = "--resume", columns: tuple[str, ...] = COLUMNS,
              ints: frozenset = INT_COLUMNS, floats: frozenset = FLOAT_COLUMNS) -> tuple[str, list[dict], dict | None]:
    """(format, rows, JSON header or None) of a result file with `columns` (default: the sweep's). A CSV line
    cut short by a killed writer is dropped from the file so appending continues on a clean line. `option`
    names the file in messages."""
    fmt = resume_format(path, option)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"{option} {path} cannot be read ({exc.strerror}). Allowed: an existing result file "
                         "written by `ovqprof sweep --output`") from exc
    not_ours = UsageError(f"{option} {path} is not an ovqprof result file (its columns differ). Allowed: a file "
                          "written by `ovqprof sweep --output` with --format csv or json")
    try:
        if fmt == "csv":
            if text and not text.endswith("\n"):
                text = text[: text.rfind("\n") + 1]
                path.write_text(text)
            reader = csv.DictReader(io.StringIO(text))
            if tuple(reader.fieldnames or ()) != columns:
                raise not_ours
            return fmt, [_typed(r, columns, ints, floats) for r in reader], None
        doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            raise not_ours
        rows = doc["rows"]
        if any(not isinstance(r, dict) or set(r) != set(columns) for r in rows):
            raise not_ours
        return fmt, [_typed(r, columns, ints, floats) for r in rows], doc.get("header")
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"{option} {path} cannot be parsed ({exc}). Allowed: a file written by "
                         "`ovqprof sweep --output` with --format csv or json") from exc


def done_cells(rows: list[dict]) -> set[tuple]:
    return {cell_key(r) for r in rows}


def resume_target(resume: Path | None, output: Path | None, format: str) -> tuple[Path | None, str]:
    """(output, format): --resume FILE appends to FILE in FILE's own format (an --output beside it must name
    the same file); without --resume, --output and --format as given."""
    if resume is None:
        return output, format
    check_resume_output(resume, output)
    return resume, resume_format(resume)


def check_resume_output(resume: Path, output: Path | None) -> None:
    """--resume FILE appends to FILE: an --output beside it must name the same file."""
    if output is not None and output.resolve() != resume.resolve():
        raise UsageError(f"--output {output} and --resume {resume} differ. Allowed: --resume FILE alone "
                         "(rows are appended to FILE)")


def sweep_resume(resume: Path | None, output: Path | None, format: str, machine: dict):
    """(output, format, rows already there): --resume FILE appends to FILE in its own format, and only when
    FILE was measured on this device."""
    if resume is None:
        return output, format, []
    check_resume_output(resume, output)
    format, existing, old_header = read_rows(resume)
    if old_header and old_header.get("device") != machine["device"]:
        raise UsageError(f"--resume {resume} was measured on {old_header.get('device')!r}, not on this "
                         "device; its rows cannot be mixed with new ones. Allowed: a result file from "
                         "this device, or a new --output file")
    return resume, format, existing


def cells_to_run(spec, resume: Path | None, existing: list[dict], log):
    """The spec's cells, less those already in the --resume file."""
    from ovqprof.sweep import plan_cells

    cells = plan_cells(spec)
    if resume is not None:
        done = done_cells(existing)
        cells = [c for c in cells if c.key not in done]
        log(f"resuming {resume}: {len(existing)} rows already there, {len(cells)} cells to run")
    return cells
