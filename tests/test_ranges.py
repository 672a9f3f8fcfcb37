"""Sizes and sequence ranges: exact expansions, located errors, and properties over arbitrary text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ovqprof.errors import UsageError
from ovqprof.ranges import MAX_VALUES, parse_seq_range, parse_seq_value, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("256", 256), ("2k", 2048), ("2K", 2048), ("1.5k", 1536), (" 64 ", 64), ("0.5k", 512), ("1", 1),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-1", "1.5", "1.3k", "k", "2kk", "2m", "1e3", "abc", "٣"])
def test_parse_size_errors(text):
    with pytest.raises(UsageError) as info:
        parse_size(text)
    message = str(info.value)
    assert repr(text) in message and "Allowed:" in message and "1.5k" in message
    assert "\n" not in message


@pytest.mark.parametrize(("text", "expected"), [
    ("256", [256]),
    ("1k..64k", [1024, 2048, 4096, 8192, 16384, 32768, 65536]),
    ("512..4k:x2", [512, 1024, 2048, 4096]),
    ("1k..8k:+1k", [1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192]),
    ("1k,3k,8k", [1024, 3072, 8192]),
    ("8k, 1k ,3k", [1024, 3072, 8192]),
    (" 256 .. 2k : x 2 ", [256, 512, 1024, 2048]),
    ("1..10:x3", [1, 3, 9]),
    ("3..20", [3, 6, 12]),  # doubling from the start; the end bounds but need not be hit
    ("100..130:+10", [100, 110, 120, 130]),
    ("1k..2k:+1.5k", [1024]),
    ("1k..4k,2k..8k", [1024, 2048, 4096, 8192]),  # overlapping items are merged
    ("1k..1k", [1024]),
    ("1..4096:+1", list(range(1, 4097))),
])
def test_parse_seq_range(text, expected):
    assert parse_seq_range(text) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "empty"),
    ("   ", "empty"),
    ("abc", "not a size"),
    ("8k..1k", "start 8192 is greater than end 1024"),
    ("0..8", "start '0' is less than 1"),
    ("-1k..8k", "start '-1k' is not a size"),
    ("1k..8k:x1", "factor 1 is less than 2"),
    ("1k..8k:x1.5", "factor '1.5' is not an integer"),
    ("1k..8k:+0", "step '0' is less than 1"),
    ("1k..8k:-1k", "neither x<factor> nor +<step>"),
    ("1k..8k:", "empty step"),
    ("1k..", "no end"),
    ("..1k", "no start"),
    ("1k..2k..4k", "more than one '..'"),
    ("1k,,2k", "empty item"),
    ("1k,", "empty item"),
    ("1.3k", "not a whole number"),
    ("1k..8kb", "end '8kb' is not a size"),
    ("1..5000:+1", "more than 4096"),
    ("1..10000000000:+1", "more than 4096"),
    ("1k,x", "item 'x' is not a size"),
    ("9" * 40, "too many digits"),
])
def test_parse_seq_range_errors(text, fragment):
    with pytest.raises(UsageError) as info:
        parse_seq_range(text)
    message = str(info.value)
    assert repr(text) in message, message
    assert fragment in message, message
    assert "Allowed:" in message and "512..4k:x2" in message and "1k..8k:+1k" in message
    assert "\n" not in message


def test_too_many_values_across_items():
    with pytest.raises(UsageError, match="more than 4096"):
        parse_seq_range("1..3000:+1,3001..6000:+1")


@pytest.mark.parametrize(("value", "expected"), [
    (1024, [1024]),
    ("1k..4k", [1024, 2048, 4096]),
    ([4096, "1k", "512..1k"], [512, 1024, 4096]),
    ([7, 7, 3], [3, 7]),
])
def test_parse_seq_value(value, expected):
    assert parse_seq_value(value) == expected


@pytest.mark.parametrize("value", [0, -5, True, 1.5, None, [], [1, None], {"a": 1}, ["1k", "x"]])
def test_parse_seq_value_errors(value):
    with pytest.raises(UsageError):
        parse_seq_value(value)


def _check_result(values: list[int]) -> None:
    assert isinstance(values, list) and values
    assert all(type(v) is int and v >= 1 for v in values)
    assert values == sorted(set(values)) and len(values) <= MAX_VALUES


@settings(max_examples=500)
@given(st.text())
def test_any_text_parses_or_raises_usage_error(text):
    try:
        values = parse_seq_range(text)
    except UsageError as err:
        assert "\n" not in str(err)
    else:
        _check_result(values)


@settings(max_examples=500)
@given(st.text(alphabet="0123456789kK.,:x+-* ", max_size=24))
def test_range_alphabet_parses_or_raises_usage_error(text):
    # Text made of the grammar's own characters reaches far deeper into the parser than st.text().
    try:
        values = parse_seq_range(text)
    except UsageError:
        pass
    else:
        _check_result(values)


def _size_text(value: int, use_k: bool) -> str:
    return f"{value // 1024}k" if use_k and value % 1024 == 0 else str(value)


@given(st.integers(1, 10**6), st.integers(0, 10**7), st.integers(2, 10), st.booleans(), st.booleans())
def test_geometric_ranges_respect_endpoints(start, extra, factor, use_k, explicit):
    end = start + extra
    step = f":x{factor}" if explicit or factor != 2 else ""
    values = parse_seq_range(f"{_size_text(start, use_k)}..{_size_text(end, use_k)}{step}")
    _check_result(values)
    assert values[0] == start and values[-1] <= end < values[-1] * factor
    assert all(b == a * factor for a, b in zip(values[:-1], values[1:], strict=True))


@given(st.integers(1, 10**6), st.integers(0, 4095), st.integers(1, 5000), st.booleans())
def test_arithmetic_ranges_respect_endpoints(start, count, step, use_k):
    end = start + count * step + step // 2  # an end between two steps: the last value stays below it
    values = parse_seq_range(f"{_size_text(start, use_k)}..{_size_text(end, use_k)}:+{_size_text(step, use_k)}")
    _check_result(values)
    assert values[0] == start and values[-1] <= end < values[-1] + step
    assert len(values) == count + 1
