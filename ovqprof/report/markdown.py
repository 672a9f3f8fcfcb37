"""Assemble report.md: sources (device, versions, dates, files), key-number tables, one section per plot
(image link and reading, or one sentence saying why it is omitted), and the rows that did not succeed.

Plain GitHub Markdown: relative image links, pipe tables, no HTML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ovqprof.report.load import ResultFile

HEADER_KEYS = ("device", "driver", "cuda", "torch", "triton", "python", "ovqprof", "git_revision", "date",
               "profile", "argv")
MAX_FAILED_LISTED = 25


@dataclass
class Section:
    """A plot's section: `image` (a file name in the report folder) is None when the plot is omitted, and
    `reading` then says why in one sentence."""

    title: str
    image: str | None
    reading: str
    tables: list[list[str]] = field(default_factory=list)


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    return (["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)] +
            ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def sources_lines(files: list[ResultFile], generated: str) -> list[str]:
    devices = sorted({str(f.header.get("device") or r.get("device")) for f in files for r in f.rows[:1]} |
                     {str(f.header["device"]) for f in files if f.header.get("device")})
    lines = ["## Sources", "", f"- report generated: {generated}", f"- devices: {', '.join(devices)}"]
    for f in files:
        lines.append(f"- `{f.path}`: {f.kind} results, {len(f.rows)} rows ({f.fmt})")
        if not f.header:
            row_devices = sorted({str(r.get("device")) for r in f.rows if r.get("device")})
            lines.append(f"  - no machine header (CSV); devices named in the rows: {', '.join(row_devices) or '-'}")
        for key in HEADER_KEYS:
            if f.header.get(key) is not None:
                lines.append(f"  - {key}: `{f.header[key]}`" if key == "argv" else f"  - {key}: {f.header[key]}")
    return lines


def noisy_lines(noisy: list[str], spread: float) -> list[str]:
    if not noisy:
        return []
    shown = noisy[:MAX_FAILED_LISTED] + ([f"{len(noisy) - MAX_FAILED_LISTED} more"] if len(noisy) > MAX_FAILED_LISTED
                                         else [])
    return ["", f"Noisy timings: {len(noisy)} successful rows have a spread ms_p80 / ms_p20 above {spread:g} "
            f"(kept in the plots; their medians may be off, re-run them on an idle machine): {', '.join(shown)}."]


def failed_lines(failed: list[dict]) -> list[str]:
    lines = ["## Rows that failed, ran out of memory or were skipped", ""]
    if not failed:
        return lines + ["Every row has status ok."]
    counts: dict[str, int] = {}
    for row in failed:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.append(f"{len(failed)} rows are left out of the plots: " +
                 ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".")
    lines.append("")
    shown = failed[:MAX_FAILED_LISTED]
    lines += table(["file", "layer", "cell", "status", "note"],
                   [[r["file"], r["layer"], r["cell"], r["status"], r["note"]] for r in shown])
    if len(failed) > len(shown):
        lines += ["", f"... and {len(failed) - len(shown)} more."]
    return lines


def render(files: list[ResultFile], generated: str, key_tables: list[tuple[str, list[str]]],
           sections: list[Section], failed: list[dict], noisy: list[str], noisy_spread: float = 2.0) -> str:
    lines = ["# ovqprof report", ""]
    lines += sources_lines(files, generated) + [""]
    lines += ["## Key numbers", ""]
    for caption, rows in key_tables:
        lines += [caption, "", *rows, ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.image is not None:
            lines += [f"![{s.title}]({s.image})", ""]
        lines += [s.reading, ""]
        for t in s.tables:
            lines += [*t, ""]
    lines += failed_lines(failed) + noisy_lines(noisy, noisy_spread)
    return "\n".join(lines).rstrip() + "\n"
