"""Row writers: every format is valid after every row (an interrupted sweep keeps what finished)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from ovqprof.errors import UsageError
from ovqprof.output import RowWriter, check_output_writable, peak_memory
from ovqprof.rows import COLUMNS, cell_key, empty_row

HEADER = {"device": "CPU: test", "torch": "2.x", "date": "2026-11-22"}


def _row(seq: int, status: str = "ok") -> dict:
    return empty_row(layer="mha", kind="softmax", impl="sdpa", device="cpu", dtype="float32", mode="fwd",
                     seq=seq, batch=1, status=status, ms_median=1.5 * seq / 256, ms_p20=1.0, ms_p80=2.0,
                     mem_rss_peak_bytes=123_456_789, state_bytes=seq * 1024, note=None)


def test_csv_file_is_complete_after_each_row(tmp_path):
    path = tmp_path / "rows.csv"
    writer = RowWriter("csv", path, HEADER)
    writer.open()
    for i, seq in enumerate((256, 512, 1024), start=1):
        writer.write(_row(seq))
        # Read while the writer is still open: what an interrupted sweep leaves behind.
        rows = list(csv.DictReader(path.open()))
        assert len(rows) == i
        assert tuple(rows[0].keys()) == COLUMNS
        assert int(rows[-1]["seq"]) == seq
    writer.close()
    rows = list(csv.DictReader(path.open()))
    assert rows[1]["mem_torch_alloc_bytes"] == ""  # unknown is empty (null), never 0
    assert float(rows[2]["ms_median"]) == pytest.approx(6.0)


def test_json_file_is_valid_after_each_row_and_has_header(tmp_path):
    path = tmp_path / "rows.json"
    with RowWriter("json", path, HEADER) as writer:
        assert json.loads(path.read_text())["rows"] == []
        for i, seq in enumerate((256, 512), start=1):
            writer.write(_row(seq, status="oom" if i == 2 else "ok"))
            doc = json.loads(path.read_text())
            assert doc["header"]["device"] == "CPU: test"
            assert len(doc["rows"]) == i
    doc = json.loads(path.read_text())
    assert doc["rows"][1]["status"] == "oom"
    assert doc["rows"][0]["mem_nvml_device_bytes"] is None
    assert not list(tmp_path.glob("*.tmp"))


def test_json_on_stdout_is_one_document():
    out = io.StringIO()
    with RowWriter("json", None, HEADER, stdout=out) as writer:
        writer.write(_row(256))
    doc = json.loads(out.getvalue())
    assert [cell_key(r) for r in doc["rows"]] == [("mha", "fwd", 256, 1)]


def test_markdown_table_rows_appear_as_they_finish(tmp_path):
    path = tmp_path / "rows.md"
    with RowWriter("md", path, HEADER) as writer:
        writer.write(_row(256))
        text = path.read_text()
        assert "- device: CPU: test" in text
        table = [line for line in text.splitlines() if line.startswith("|")]
        assert len(table) == 3  # header, separator, one row
        assert "117.7 MiB (rss)" in table[2]


def test_table_to_file_and_terminal(tmp_path):
    path = tmp_path / "rows.txt"
    with RowWriter("table", path, HEADER) as writer:
        writer.write(_row(512))
        assert "512" in path.read_text()
    out = io.StringIO()
    with RowWriter("table", None, HEADER, stdout=out) as writer:
        writer.write(_row(2048, status="error"))
    assert "2048" in out.getvalue() and "error" in out.getvalue()


def test_unknown_format_is_a_usage_error():
    with pytest.raises(UsageError, match="Allowed: table, csv, json, md"):
        RowWriter("xml", None, HEADER)


def test_unwritable_output_is_reported_before_the_sweep(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        check_output_writable(tmp_path / "missing" / "rows.csv")
    with pytest.raises(UsageError, match="is a directory"):
        check_output_writable(tmp_path)


def test_peak_memory_prefers_the_torch_allocator_and_names_its_source():
    row = _row(256)
    assert peak_memory(row) == (123_456_789, "rss")
    row["mem_torch_alloc_bytes"] = 42
    assert peak_memory(row) == (42, "torch")
    row.update(mem_torch_alloc_bytes=None, mem_rss_peak_bytes=None)
    assert peak_memory(row) == (None, "")


def test_empty_row_rejects_unknown_columns():
    with pytest.raises(KeyError):
        empty_row(speed=1)
