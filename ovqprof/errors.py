"""User-facing errors: one paragraph, exit code 2, no traceback (unless --debug)."""

from __future__ import annotations

EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: what was finished is kept (ovqprof.run.interruptible)


class OvqprofError(Exception):
    """An error whose message is written for the user; the CLI prints it and exits with `exit_code`."""

    exit_code = 2


class UsageError(OvqprofError):
    """Bad command-line input (a malformed range, an unknown layer name, an unwritable output)."""


class SpecError(OvqprofError):
    """A problem in a YAML spec, located by file, line and field.

    The message reads: "<file>, line <n>, field <field>: <problem> (got <value>). Allowed: <allowed>."
    Any part that is unknown is left out.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        value: object = None,
        allowed: str | None = None,
        show_value: bool = True,
    ):
        self.problem = problem
        self.file = file
        self.line = line
        self.field = field
        self.value = value
        self.allowed = allowed
        where = ", ".join(
            part
            for part in (
                file,
                f"line {line}" if line is not None else None,
                f"field {field}" if field else None,
            )
            if part
        )
        text = f"{where}: {problem}" if where else problem
        if show_value and value is not None:
            text += f" (got {value!r})"
        if allowed:
            text += f". Allowed: {allowed}"
        if not text.endswith("."):
            text += "."
        super().__init__(text)


class IncompatibleBaselineError(OvqprofError):
    """A baseline measured on another device, or with incompatible versions: refused, not guessed (exit 3)."""

    exit_code = 3


class InfrastructureError(OvqprofError):
    """The run itself could not be carried out: the device is unusable, workers cannot start, results cannot
    be written (exit 4)."""

    exit_code = 4


class FailedCellsError(OvqprofError):
    """Some cells failed where every cell must succeed, e.g. while recording a baseline (exit 1)."""

    exit_code = 1
