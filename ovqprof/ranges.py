"""Sizes and sequence-length ranges as typed on the command line or in a spec's `sweep.seq`.

Forms (whitespace around tokens is ignored):
    256, 2k, 1.5k           one size; k/K multiplies by 1024 and the result must be a whole number >= 1
    1k..64k                 powers of two from the start: 1024, 2048, ..., 65536 (step x2 by default)
    512..4k:x2              geometric: start, start*f, start*f^2, ... <= end (integer factor f >= 2)
    1k..8k:+1k              arithmetic: start, start+s, ... <= end (step s >= 1, same size syntax)
    1k,3k,8k                comma list; each item may itself be a range
The result is always a sorted list of distinct ints.
"""

from __future__ import annotations

import re
from fractions import Fraction

from ovqprof.errors import UsageError

SIZE_FORMS = "a positive whole number, optionally with suffix k (x1024): 256, 2k, 1.5k"
SEQ_RANGE_FORMS = (
    "a size (256, 2k, 1.5k), a range 1k..64k (doubling), 512..4k:x2 (integer factor >= 2), "
    "1k..8k:+1k (step >= 1), or a comma list of these (1k,3k,8k)"
)
MAX_VALUES = 4096
# Longer digit strings are not sequence lengths; the cap also keeps int() clear of its 4300-digit limit.
_MAX_DIGITS = 18

# ASCII digits only: Python's int() would otherwise accept other scripts' digits.
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([kK]?)", re.ASCII)


class RangeError(UsageError):
    """A malformed size or range. `text` is what was given, `reason` what is wrong with it, `allowed` the
    accepted forms; spec loading reuses these to point at the offending YAML line."""

    def __init__(self, kind: str, text: str, reason: str, allowed: str):
        self.text = text
        self.reason = reason
        self.allowed = allowed
        super().__init__(f"invalid {kind} {text!r}: {reason}. Allowed: {allowed}.")


def _size(token: str, whole: str, kind: str, allowed: str, label: str = "") -> int:
    """Parse one size token (already stripped); errors name the whole input `whole` and the token's
    role `label` (start, end, step) when the token is only part of it."""
    match = _SIZE_RE.fullmatch(token)
    if not match:
        if not token:
            reason = f"{label or 'size'} is missing"
        elif token == whole.strip():
            reason = "not a size"
        else:
            reason = f"{label} {token!r} is not a size".lstrip()
        raise RangeError(kind, whole, reason, allowed)
    number, suffix = match.groups()
    if len(number.replace(".", "")) > _MAX_DIGITS:
        raise RangeError(kind, whole, f"{label} {token!r} has too many digits".lstrip(), allowed)
    value = Fraction(number) * (1024 if suffix else 1)
    if value.denominator != 1:
        raise RangeError(kind, whole, f"{label} {token!r} is not a whole number ({float(value):g})".lstrip(),
                         allowed)
    if value < 1:
        raise RangeError(kind, whole, f"{label} {token!r} is less than 1".lstrip(), allowed)
    return int(value)


def parse_size(text: str) -> int:
    """Parse one size such as `256`, `2k` or `1.5k` (= 1536); raises RangeError (a UsageError)."""
    if not isinstance(text, str):
        raise RangeError("size", str(text), "not a string", SIZE_FORMS)
    return _size(text.strip(), text, "size", SIZE_FORMS)


def _count_and_check(whole: str, item: str, count: int) -> None:
    if count > MAX_VALUES:
        raise RangeError("sequence range", whole, f"{item!r} has {count} values, more than {MAX_VALUES}",
                         SEQ_RANGE_FORMS)


def _parse_item(item: str, whole: str) -> list[int]:
    """One comma-separated item: a size or a start..end[:step] range."""
    def size(tok: str, label: str) -> int:
        return _size(tok.strip(), whole, "sequence range", SEQ_RANGE_FORMS, label)

    if ".." not in item:
        return [size(item, "" if item == whole.strip() else "item")]
    start_text, _, rest = item.partition("..")
    end_text, colon, step_text = rest.partition(":")
    if ".." in end_text:
        raise RangeError("sequence range", whole, f"{item!r} has more than one '..'", SEQ_RANGE_FORMS)
    if not start_text.strip():
        raise RangeError("sequence range", whole, f"{item!r} has no start before '..'", SEQ_RANGE_FORMS)
    if not end_text.strip():
        raise RangeError("sequence range", whole, f"{item!r} has no end after '..'", SEQ_RANGE_FORMS)
    start, end = size(start_text, "start"), size(end_text, "end")
    if start > end:
        raise RangeError("sequence range", whole, f"start {start} is greater than end {end}", SEQ_RANGE_FORMS)
    step_text = step_text.strip()
    if colon and not step_text:
        raise RangeError("sequence range", whole, f"{item!r} has an empty step after ':'", SEQ_RANGE_FORMS)
    if not colon or step_text[0] in "xX*":
        factor = 2
        if colon:
            factor_text = step_text[1:].strip()
            if not re.fullmatch(r"[0-9]{1,6}", factor_text, re.ASCII):
                raise RangeError("sequence range", whole, f"factor {factor_text!r} is not an integer",
                                 SEQ_RANGE_FORMS)
            factor = int(factor_text)
            if factor < 2:
                raise RangeError("sequence range", whole, f"factor {factor} is less than 2", SEQ_RANGE_FORMS)
        values = [start]
        # Start and end are bounded by _MAX_DIGITS, so this loop runs at most ~70 times.
        while values[-1] * factor <= end:
            values.append(values[-1] * factor)
        return values
    if step_text[0] == "+":
        step = size(step_text[1:], "step")
        count = (end - start) // step + 1
        _count_and_check(whole, item, count)  # before building, so 1..1e15:+1 cannot exhaust memory
        return list(range(start, end + 1, step))
    raise RangeError("sequence range", whole, f"step {step_text!r} is neither x<factor> nor +<step>",
                     SEQ_RANGE_FORMS)


def parse_seq_range(text: str) -> list[int]:
    """Parse a sequence-length range (see the module docstring) into a sorted list of distinct ints.

    Raises RangeError (a UsageError) naming the input and the accepted forms.
    """
    if not isinstance(text, str):
        raise RangeError("sequence range", str(text), "not a string", SEQ_RANGE_FORMS)
    if not text.strip():
        raise RangeError("sequence range", text, "empty", SEQ_RANGE_FORMS)
    values: set[int] = set()
    for item in text.split(","):
        if not item.strip():
            raise RangeError("sequence range", text, "empty item between commas", SEQ_RANGE_FORMS)
        values.update(_parse_item(item.strip(), text))
        _count_and_check(text, text, len(values))
    return sorted(values)


def parse_seq_value(value: object) -> list[int]:
    """Sequence lengths from YAML: an int, a range string, or a list of ints and range strings."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RangeError("sequence range", "[]", "the list is empty", SEQ_RANGE_FORMS)
    values: set[int] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            # YAML reads `1.5k` as a string but `1.5` as a float; neither a float nor a bool is a length.
            raise RangeError("sequence range", repr(item), f"a {type(item).__name__} is not a length",
                             SEQ_RANGE_FORMS)
        if isinstance(item, int):
            if item < 1:
                raise RangeError("sequence range", str(item), "lengths must be >= 1", SEQ_RANGE_FORMS)
            values.add(item)
        else:
            values.update(parse_seq_range(item))
        _count_and_check(str(value), str(value), len(values))
    return sorted(values)
