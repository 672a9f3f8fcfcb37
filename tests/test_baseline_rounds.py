"""A baseline recorded in rounds (`ovqprof baseline --repeats N`): the row kept per cell, the round medians in
the header, and `check` judging a slow-down against the slowest round and a speed-up against the fastest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ovqprof.baseline import measure_rounds, read_run_medians, record
from ovqprof.check import Thresholds, compare_cell
from ovqprof.cli import app
from tests.test_check import HEADER, TINY, _row, _write

runner = CliRunner()
KEY = ("mha", "fwd", 1024, 1)


# --- measure_rounds ----------------------------------------------------------------------------------------
def _fake_measure(times: dict[int, list[float]], statuses: dict[tuple, str] | None = None):
    """measure(cells) -> rows: cell seq -> its median in each successive round; `statuses` (seq, round) ->
    a status other than ok for that round."""
    calls = []

    def measure(cells):
        r = len(calls)
        calls.append(list(cells))
        rows = []
        for seq in cells:
            status = (statuses or {}).get((seq, r), "ok")
            rows.append(_row(times[seq][r], seq=seq, status=status))
        return rows

    return measure, calls


def test_every_cell_is_measured_once_per_round_and_keeps_its_median_round():
    measure, calls = _fake_measure({256: [3.0, 1.0, 2.0], 512: [5.0, 7.0, 6.0]})
    rows, medians = measure_rounds(measure, [256, 512], 3)
    assert calls == [[256, 512]] * 3  # the whole list each round, not one cell three times in a row
    assert [r["ms_median"] for r in rows] == [2.0, 6.0]
    assert medians == {("mha", "fwd", 256, 1): [3.0, 1.0, 2.0], ("mha", "fwd", 512, 1): [5.0, 7.0, 6.0]}


def test_a_cell_that_failed_in_one_round_keeps_the_failing_row():
    measure, _ = _fake_measure({256: [1.0, 1.0, 1.0]}, {(256, 1): "error"})
    rows, medians = measure_rounds(measure, [256], 3)
    assert rows[0]["status"] == "error"
    assert medians[("mha", "fwd", 256, 1)] == [1.0, 1.0]  # the ok rounds only


def test_rounds_below_one_are_refused():
    from ovqprof.errors import UsageError

    with pytest.raises(UsageError, match="--repeats 0"):
        measure_rounds(lambda cells: [], [256], 0)


def test_record_writes_the_round_medians_and_they_read_back(tmp_path):
    path = tmp_path / "base.json"
    rows = [_row(1.0)]
    summary = record(path, HEADER, rows, source="test", run_medians={KEY: [1.0, 1.3, 0.9]})
    assert "3 rounds per cell" in summary
    header = json.loads(path.read_text())["header"]
    assert header["baseline"]["rounds"] == 3
    assert read_run_medians(header) == {KEY: [1.0, 1.3, 0.9]}
    record(path, HEADER, rows, source="test")  # one round: nothing extra in the header
    header = json.loads(path.read_text())["header"]
    assert header["baseline"]["rounds"] == 1 and read_run_medians(header) == {}


def test_malformed_round_entries_are_ignored():
    header = {"baseline": {"run_medians_ms": [{"layer": "mha"}, {"layer": "mha", "mode": "fwd", "seq": 1024,
                                                                    "batch": 1, "ms": ["x"]}, 7]}}
    assert read_run_medians(header) == {}
    assert read_run_medians({"baseline": "text"}) == {}


# --- the rule with rounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("current, runs, verdict", [
    (1.15, None, "regressed"),         # one round: +15% beyond 10%
    (1.15, [1.0, 1.12, 0.98], "unchanged"),  # within 10% of the slowest round
    (1.40, [1.0, 1.12, 0.98], "regressed"),  # beyond 10% of the slowest round
    (0.85, None, "improved"),
    (0.85, [1.0, 0.90, 1.05], "unchanged"),  # the fastest round is within 10%
    (0.70, [1.0, 0.90, 1.05], "improved"),
])
def test_a_change_counts_only_beyond_the_rounds_on_its_side(current, runs, verdict):
    result = compare_cell(KEY, _row(1.0), _row(current), Thresholds(), runs)
    assert result.verdict == verdict, result.note
    if verdict == "unchanged":
        assert "rounds" in result.note


def test_check_passes_a_cell_inside_the_baselines_rounds_and_fails_it_without_them(tmp_path):
    base_rows, cur_rows = [_row(1.0)], [_row(1.15)]
    cur = _write(tmp_path / "cur.json", cur_rows)
    one = tmp_path / "one.json"
    record(one, HEADER, base_rows, source="test")
    rounds = tmp_path / "rounds.json"
    record(rounds, HEADER, base_rows, source="test", run_medians={KEY: [0.97, 1.0, 1.12]})
    failing = runner.invoke(app, ["check", "--baseline", str(one), "--current", str(cur)])
    assert failing.exit_code == 1 and "1 regressed" in failing.stdout
    passing = runner.invoke(app, ["check", "--baseline", str(rounds), "--current", str(cur)])
    assert passing.exit_code == 0, passing.output
    assert "slowest of 3 rounds" in passing.stdout


def test_baseline_from_a_baseline_keeps_its_rounds(tmp_path):
    src = tmp_path / "src.json"
    record(src, HEADER, [_row(1.0)], source="test", run_medians={KEY: [0.97, 1.0, 1.12]})
    dst = tmp_path / "dst.json"
    result = runner.invoke(app, ["baseline", "--from", str(src), "--output", str(dst)])
    assert result.exit_code == 0, result.output
    assert read_run_medians(json.loads(dst.read_text())["header"]) == {KEY: [0.97, 1.0, 1.12]}


def test_baseline_repeats_measures_each_cell_that_many_rounds(tmp_path, one_thread):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    base = tmp_path / "base.json"
    result = runner.invoke(app, ["baseline", "-p", str(spec), "--no-roofline", "--repeats", "2", "-o", str(base)])
    assert result.exit_code == 0, result.output
    doc = json.loads(base.read_text())
    medians = read_run_medians(doc["header"])
    assert doc["header"]["baseline"]["rounds"] == 2 and set(medians) == {("mha", "fwd", 128, 1),
                                                                           ("mha", "fwd", 256, 1)}
    for row in doc["rows"]:  # the kept row is one of the rounds (the lower middle one of two: the faster)
        assert row["ms_median"] == min(medians[(row["layer"], row["mode"], row["seq"], row["batch"])])
    bad = runner.invoke(app, ["baseline", "-p", str(spec), "--repeats", "0", "-o", str(base)])
    assert bad.exit_code == 2 and "--repeats 0" in bad.output


# --- the committed CPU example the README points at ----------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parent.parent / "profiles" / "baselines" / "quick-mha-linear-cpu-example.json"


def test_committed_cpu_example_baseline_is_a_three_round_baseline_that_checks_clean():
    data = json.loads(EXAMPLE.read_text())
    header, rows = data["header"], data["rows"]
    assert header["baseline"]["rounds"] == 3 and header["device_type"] == "cpu"
    medians = read_run_medians(header)
    cells = {(r["layer"], r["mode"], r["seq"], r["batch"]) for r in rows if r["status"] == "ok"}
    assert len(cells) == 18 and set(medians) == cells
    assert all(len(medians[c]) == 3 for c in cells)
    for r in rows:  # the row kept is the cell's median round
        runs = sorted(medians[(r["layer"], r["mode"], r["seq"], r["batch"])])
        assert r["ms_median"] == pytest.approx(runs[1])
    # compared with itself (on any CPU: the device and versions are allowed to differ here) nothing moves
    result = runner.invoke(app, ["check", "--baseline", str(EXAMPLE), "--current", str(EXAMPLE),
                                 "--allow-version-change"])
    assert result.exit_code == 0, result.output
    assert "PASS: 18 unchanged" in result.output
