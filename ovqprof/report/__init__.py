"""Design-review reports: sweep and capacity result files in, report.md with PNG plots out."""

from ovqprof.report.build import write_report

__all__ = ["write_report"]
