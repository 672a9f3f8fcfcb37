"""`ovqprof check` and `ovqprof baseline`: the noise-aware rule on synthetic result files, refusals (exit 3),
corrupt baselines (exit 2), infrastructure failures (exit 4), and an end-to-end CPU run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ovqprof import __version__
from ovqprof.check import Thresholds, compare_cell, run_check
from ovqprof.cli import app
from ovqprof.output import json_document
from ovqprof.rows import cell_key, empty_row
from ovqprof.run import Run

runner = CliRunner()

HEADER = {
    "device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "driver": "570.86.15", "cuda": "12.8",
    "torch": "2.11.0+cu128", "triton": "3.6.0", "python": "3.11.7", "ovqprof": __version__,
    "git_revision": "abc", "date": "2026-11-01T00:00:00+00:00", "profile": "profiles/default.yaml",
    "cpu_threads": 16, "triton_interpret": False,
    "layers": [{"name": "mha", "type": "softmax_attention", "d_model": 1024, "heads": 16, "head_dim": 64,
                "dtype": "bfloat16", "options": {}}],
}


def _row(ms: float, *, layer="mha", mode="fwd", seq=1024, batch=1, band=0.02, status="ok", **extra) -> dict:
    """A result row with median `ms` and a p20..p80 band of `band` (a fraction of `ms`) around it."""
    timed = status in ("ok", "check_failed")
    return empty_row(layer=layer, kind="softmax_attention", impl="sdpa-flash", device="cuda:0", dtype="bfloat16",
                     mode=mode, seq=seq, batch=batch, status=status, check="pass",
                     ms_median=ms if timed else None, ms_p20=ms * (1 - band / 2) if timed else None,
                     ms_p80=ms * (1 + band / 2) if timed else None, timer="do_bench" if timed else None, **extra)


def _write(path: Path, rows: list[dict], **header) -> Path:
    path.write_text(json_document({**HEADER, **header}, rows))
    return path


def _check(tmp_path, base_rows, cur_rows, *args, base_header=None, cur_header=None):
    base = _write(tmp_path / "base.json", base_rows, **(base_header or {}))
    cur = _write(tmp_path / "cur.json", cur_rows, **(cur_header or {}))
    result = runner.invoke(app, ["check", "--baseline", str(base), "--current", str(cur), *args])
    assert "Traceback" not in result.output
    return result


def _verdicts(result) -> dict[tuple, str]:
    doc = json.loads(result.stdout)
    return {(c["layer"], c["mode"], c["seq"], c["batch"]): c["verdict"] for c in doc["cells"]}


# --- the rule ----------------------------------------------------------------------------------------------
def test_a_20_percent_slowdown_fails(tmp_path):
    result = _check(tmp_path, [_row(1.0), _row(2.0, seq=2048)], [_row(1.2), _row(2.0, seq=2048)])
    assert result.exit_code == 1, result.output
    line = next(li for li in result.stdout.splitlines() if "regressed" in li)
    assert "mha" in line and "1024" in line and "+20.0%" in line
    assert "FAIL: 1 regressed, 1 unchanged" in result.stdout


def test_a_3_percent_slowdown_passes(tmp_path):
    result = _check(tmp_path, [_row(1.0)], [_row(1.03)], "--format", "json")
    assert result.exit_code == 0, result.output
    assert _verdicts(result) == {("mha", "fwd", 1024, 1): "unchanged"}


def test_a_change_inside_the_runs_spread_passes(tmp_path):
    # 30% slower, beyond the 10% threshold, but the runs' own p20..p80 bands are 50% wide.
    result = _check(tmp_path, [_row(1.0, band=0.5)], [_row(1.3, band=0.5)])
    assert result.exit_code == 0, result.output
    assert "unchanged" in result.stdout and "within the runs' spread" in result.stdout


def test_a_speed_up_is_reported_and_passes(tmp_path):
    result = _check(tmp_path, [_row(1.0)], [_row(0.5)])
    assert result.exit_code == 0, result.output
    assert "improved" in result.stdout and "-50.0%" in result.stdout
    assert "PASS: 1 improved" in result.stdout


def test_a_tiny_kernel_under_the_absolute_floor_passes(tmp_path):
    # 2 us -> 3 us is +50%, far outside the spread, but under the 5 us floor.
    result = _check(tmp_path, [_row(0.002, band=0.01)], [_row(0.003, band=0.01)])
    assert result.exit_code == 0, result.output
    assert "floor" in result.stdout
    result = _check(tmp_path, [_row(0.002, band=0.01)], [_row(0.003, band=0.01)], "--min-delta-ms", "0")
    assert result.exit_code == 1, result.output


def test_a_missing_cell_is_reported_and_fails_only_with_the_option(tmp_path):
    base = [_row(1.0), _row(2.0, mode="decode")]
    result = _check(tmp_path, base, [_row(1.0)])
    assert result.exit_code == 0, result.output
    assert "missing" in result.stdout and "not in the current run" in result.stdout
    result = _check(tmp_path, base, [_row(1.0)], "--fail-on-missing")
    assert result.exit_code == 1, result.output
    assert "FAIL: 1 missing, 1 unchanged" in result.stdout


def test_a_cell_that_now_fails_is_a_failure_and_new_cells_are_listed(tmp_path):
    base = [_row(1.0), _row(1.0, mode="bwd")]
    cur = [_row(1.0), _row(1.0, mode="bwd", status="error", note="RuntimeError: boom"), _row(1.0, seq=4096)]
    result = _check(tmp_path, base, cur, "--format", "json")
    assert result.exit_code == 1, result.output
    assert _verdicts(result) == {("mha", "fwd", 1024, 1): "unchanged", ("mha", "bwd", 1024, 1): "failed",
                                 ("mha", "fwd", 4096, 1): "new"}


def test_a_cell_that_was_not_ok_in_the_baseline_is_not_compared(tmp_path):
    result = _check(tmp_path, [_row(1.0, status="oom")], [_row(5.0)], "--format", "json")
    assert result.exit_code == 0, result.output
    assert _verdicts(result) == {("mha", "fwd", 1024, 1): "not compared"}


def test_per_layer_and_per_mode_thresholds(tmp_path):
    base = [_row(1.0), _row(1.0, mode="decode"), _row(1.0, layer="gqa")]
    cur = [_row(1.2), _row(1.2, mode="decode"), _row(1.2, layer="gqa")]
    layers = [HEADER["layers"][0], {**HEADER["layers"][0], "name": "gqa"}]
    result = _check(tmp_path, base, cur, "--format", "json", "--layer-threshold", "mha=25%",
                    "--layer-threshold", "mha:decode=15%", "--mode-threshold", "fwd=30",
                    base_header={"layers": layers}, cur_header={"layers": layers})
    assert _verdicts(result) == {("mha", "fwd", 1024, 1): "unchanged",   # layer beats mode
                                 ("mha", "decode", 1024, 1): "regressed",  # layer:mode beats layer
                                 ("gqa", "fwd", 1024, 1): "unchanged"}     # mode beats the default
    assert result.exit_code == 1


def test_thresholds_choose_the_most_specific_entry():
    t = Thresholds.parse("10%", ["a=20%", "a:bwd=30%"], ["bwd=40%", "decode=50%"], 0.005)
    assert t.for_cell("a", "fwd") == pytest.approx(0.2)
    assert t.for_cell("a", "bwd") == pytest.approx(0.3)
    assert t.for_cell("b", "bwd") == pytest.approx(0.4)
    assert t.for_cell("b", "fwd") == pytest.approx(0.1)


@pytest.mark.parametrize("args", [["--threshold", "ten"], ["--layer-threshold", "mha"],
                                  ["--mode-threshold", "sideways=5%"], ["--layer-threshold", "mha:up=5%"],
                                  ["--min-delta-ms", "-1"], ["--format", "xml"]])
def test_bad_check_options_are_exit_2(tmp_path, args):
    result = _check(tmp_path, [_row(1.0)], [_row(1.0)], *args)
    assert result.exit_code == 2, result.output
    assert "Allowed:" in result.stderr


def test_check_needs_something_to_compare(tmp_path):
    base = _write(tmp_path / "base.json", [_row(1.0)])
    result = runner.invoke(app, ["check", "--baseline", str(base)])
    assert result.exit_code == 2 and "nothing to compare" in result.stderr


# --- refusals: another device, other versions, other layers ------------------------------------------------
@pytest.mark.parametrize(("cur_header", "fragment"), [
    ({"device": "NVIDIA A100-SXM4-80GB"}, "'NVIDIA H100 80GB HBM3'"),
    ({"device_type": "cpu", "device": "CPU: Intel(R) Xeon(R) Processor"}, "CPU: Intel"),
    ({"triton_interpret": True}, "Triton interpreter"),
    ({"torch": "2.12.0+cu128"}, "torch 2.11.0+cu128 -> 2.12.0+cu128"),
    ({"triton": "3.7.0"}, "triton 3.6.0 -> 3.7.0"),
    ({"driver": "580.1"}, "driver 570.86.15 -> 580.1"),
])
def test_a_baseline_from_another_device_or_versions_is_refused_with_exit_3(tmp_path, cur_header, fragment):
    result = _check(tmp_path, [_row(1.0)], [_row(1.0)], cur_header=cur_header)
    assert result.exit_code == 3, result.output
    message = " ".join(result.stderr.split())
    assert fragment in message and "Allowed:" in message
    assert result.stdout == ""  # refused, not compared


def test_version_changes_can_be_allowed_and_patch_changes_are_notes(tmp_path):
    result = _check(tmp_path, [_row(1.0)], [_row(1.0)], "--allow-version-change", cur_header={"torch": "2.12.0"})
    assert result.exit_code == 0, result.output
    assert "version change allowed: torch 2.11.0+cu128 -> 2.12.0" in result.stdout
    result = _check(tmp_path, [_row(1.0)], [_row(1.0)], cur_header={"torch": "2.11.1+cu128", "driver": "570.99"})
    assert result.exit_code == 0, result.output
    assert "note: torch 2.11.0+cu128 -> 2.11.1+cu128" in result.stdout


def test_a_layer_configured_differently_is_exit_2(tmp_path):
    other = [{**HEADER["layers"][0], "d_model": 2048}]
    result = _check(tmp_path, [_row(1.0)], [_row(1.0)], cur_header={"layers": other})
    assert result.exit_code == 2, result.output
    assert "configured differently" in result.stderr and "d_model: 1024 -> 2048" in result.stderr


def test_cells_at_another_dtype_are_exit_2(tmp_path):
    result = _check(tmp_path, [_row(1.0)], [{**_row(1.0), "dtype": "float16"}])
    assert result.exit_code == 2, result.output
    assert "another dtype" in result.stderr


# --- corrupt baselines -------------------------------------------------------------------------------------
def _corrupt(tmp_path: Path, kind: str) -> Path:
    good = json_document(HEADER, [_row(1.0), _row(2.0, seq=2048)])
    path = tmp_path / "base.json"
    if kind == "truncated":
        path.write_text(good[: len(good) // 2])
    elif kind == "empty":
        path.write_text("")
    elif kind == "not json":
        path.write_text("this is not a result file\n")
    elif kind == "no header":
        path.write_text(json.dumps({"rows": [_row(1.0)]}))
    elif kind == "header without device":
        path.write_text(json_document({k: v for k, v in HEADER.items() if k != "device"}, [_row(1.0)]))
    elif kind == "other columns":
        path.write_text(json_document(HEADER, [{"layer": "mha", "ms": 1.0}]))
    elif kind == "ok row without a median":
        path.write_text(json_document(HEADER, [{**_row(1.0), "ms_median": None}]))
    elif kind == "duplicate cell":
        path.write_text(json_document(HEADER, [_row(1.0), _row(1.1)]))
    elif kind == "csv":
        path = tmp_path / "base.csv"
        path.write_text("layer,mode\nmha,fwd\n")
    elif kind == "absent":
        path = tmp_path / "nope.json"
    return path


CORRUPT = {"truncated": "cannot be parsed", "empty": "cannot be parsed", "not json": "cannot be parsed",
           "no header": "no machine header", "header without device": "lacks device",
           "other columns": "not an ovqprof result file", "ok row without a median": "positive ms_median",
           "duplicate cell": "appears twice", "csv": "only a JSON result file", "absent": "does not exist"}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_a_corrupt_or_truncated_baseline_is_a_clear_error_with_exit_2(tmp_path, kind):
    base = _corrupt(tmp_path, kind)
    cur = _write(tmp_path / "cur.json", [_row(1.0)])
    result = runner.invoke(app, ["check", "--baseline", str(base), "--current", str(cur)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert CORRUPT[kind] in message and f"--baseline {base}" in message, message
    assert "ovqprof baseline" in message  # says how to make a good one
    assert "Traceback" not in result.output


# --- re-measurement ----------------------------------------------------------------------------------------
def test_a_flagged_cell_whose_re_measurement_disagrees_is_noisy_and_a_confirmed_one_regressed():
    base = [_row(1.0), _row(1.0, seq=2048)]
    cur = [_row(1.5), _row(1.5, seq=2048)]
    asked: list[list[tuple]] = []

    def remeasure(keys):
        asked.append(keys)
        # the first cell was a noisy outlier, the second is really slower
        return [_row(1.01), _row(1.5, seq=2048)]

    report, rows = run_check(base, cur, Thresholds(), remeasure=remeasure)
    assert asked == [[("mha", "fwd", 1024, 1), ("mha", "fwd", 2048, 1)]]
    assert [r.verdict for r in report.results] == ["noisy", "regressed"]
    assert report.results[0].note.startswith("regressed in 1 of 2 runs (1.5 ms, 1.01 ms); run-to-run spread 49%")
    assert "re-measured: regressed in all 2 runs (1.5 ms, 1.5 ms)" in report.results[1].note
    assert report.exit_code == 1
    assert [r["ms_median"] for r in rows] == [1.01, 1.5]  # the lower middle of (1.5, 1.01); the re-measurement


def test_repeats_measure_flagged_cells_in_turn_and_drop_a_cell_once_it_disagrees():
    base = [_row(1.0), _row(1.0, seq=2048), _row(1.0, seq=4096)]
    cur = [_row(1.5), _row(1.5, seq=2048), _row(1.0, seq=4096)]
    a, b = ("mha", "fwd", 1024, 1), ("mha", "fwd", 2048, 1)
    times = {a: [1.6, 1.4, 1.7], b: [1.6, 1.02]}  # a regresses in every run; b disagrees in its second
    asked: list[list[tuple]] = []

    def remeasure(keys):
        asked.append(keys)
        return [_row(times[k].pop(0), seq=k[2]) for k in keys]

    report, rows = run_check(base, cur, Thresholds(), remeasure=remeasure, repeats=3)
    assert asked == [[a, b], [a, b], [a]]  # round-robin; b is not measured again once it disagreed
    assert [r.verdict for r in report.results] == ["regressed", "noisy", "unchanged"]
    assert "regressed in all 4 runs (1.5 ms, 1.6 ms, 1.4 ms, 1.7 ms)" in report.results[0].note
    assert report.results[0].current["ms_median"] == 1.6  # the median of the re-measurements
    assert report.results[1].note.startswith("regressed in 2 of 3 runs (1.5 ms, 1.6 ms, 1.02 ms)")
    assert [r["ms_median"] for r in rows] == [1.6, 1.5, 1.0]
    assert report.exit_code == 1


def test_noisy_cells_pass_unless_fail_on_noisy():
    def remeasure(keys):
        return [_row(1.0)]

    for fail_on_noisy, code in ((False, 0), (True, 1)):
        report, _ = run_check([_row(1.0)], [_row(2.0)], Thresholds(), remeasure=remeasure, repeats=2,
                              fail_on_noisy=fail_on_noisy)
        assert [r.verdict for r in report.results] == ["noisy"] and report.exit_code == code
        assert ("not gated" in report.summary()) is not fail_on_noisy


def test_a_failure_that_does_not_recur_is_noisy():
    def remeasure(keys):
        return [_row(1.0)]

    report, _ = run_check([_row(1.0)], [_row(1.0, status="error")], Thresholds(), remeasure=remeasure)
    assert report.results[0].verdict == "noisy"
    assert report.results[0].note.startswith("failed in 1 of 2 runs (error, 1 ms)")


def test_without_a_profile_flagged_cells_are_not_re_measured():
    report, _ = run_check([_row(1.0)], [_row(2.0)], Thresholds())
    assert report.exit_code == 1
    assert any("not re-measured" in n for n in report.notes)


def test_an_impl_change_is_noted():
    result = compare_cell(("mha", "fwd", 1024, 1), _row(1.0), {**_row(1.0), "impl": "sdpa-math"}, Thresholds())
    assert result.verdict == "unchanged" and "impl sdpa-flash -> sdpa-math" in result.note


@pytest.mark.parametrize("fmt", ["md", "json"])
def test_report_formats(tmp_path, fmt):
    result = _check(tmp_path, [_row(1.0)], [_row(1.5)], "--format", fmt)
    assert result.exit_code == 1
    if fmt == "json":
        doc = json.loads(result.stdout)
        assert doc["result"] == "fail" and doc["counts"]["regressed"] == 1
        assert doc["cells"][0]["change"] == pytest.approx(0.5)
    else:
        assert result.stdout.startswith("# ovqprof check") and "**FAIL: 1 regressed**" in result.stdout
        assert "| mha | fwd | 1024 | 1 | regressed |" in result.stdout


# --- baseline ----------------------------------------------------------------------------------------------
def test_baseline_from_a_result_file_keeps_the_header_and_says_when(tmp_path):
    src = _write(tmp_path / "rows.json", [_row(1.0), _row(1.0, status="oom", seq=65536)])
    out = tmp_path / "base.json"
    result = runner.invoke(app, ["baseline", "--from", str(src), "--output", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["header"]["device"] == HEADER["device"] and doc["header"]["baseline"]["source"] == str(src)
    assert len(doc["rows"]) == 2
    assert "wrote baseline" in result.stderr and "1 ok, 1 oom" in result.stderr


def test_baseline_refuses_failed_cells_unless_allowed(tmp_path):
    src = _write(tmp_path / "rows.json", [_row(1.0), _row(1.0, status="error", mode="bwd")])
    out = tmp_path / "base.json"
    result = runner.invoke(app, ["baseline", "--from", str(src), "--output", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert "1 cell(s) failed (mha bwd seq=1024 batch=1 (error))" in " ".join(result.stderr.split())
    result = runner.invoke(app, ["baseline", "--from", str(src), "--output", str(out), "--allow-failed"])
    assert result.exit_code == 0 and out.exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--from", "rows.json", "--profile", "quick"], "--profile would change nothing"),
    (["--output", "/nonexistent-dir/base.json", "--profile", "quick"], "does not exist"),
    (["--output", "base.csv", "--profile", "quick"], "Allowed: a path ending in .json"),
])
def test_bad_baseline_options_are_exit_2(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "rows.json", [_row(1.0)])
    result = runner.invoke(app, ["baseline", *args])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.stderr.split())


# --- end to end on this machine's CPU ----------------------------------------------------------------------
TINY = """\
name: tiny
defaults:
  d_model: 64
  heads: 2
  head_dim: 32
  device: cpu
layers:
  - name: mha
    type: softmax_attention
sweep:
  seq: 128..256
  modes: [fwd]
  warmup_ms: 5
  rep_ms: 25
  check_seq: 16
"""


def _halved(src: Path, dst: Path, factor: float = 2.0) -> Path:
    doc = json.loads(src.read_text())
    for row in doc["rows"]:
        for col in ("ms_median", "ms_p20", "ms_p80"):
            row[col] /= factor
    dst.write_text(json.dumps(doc))
    return dst


def test_end_to_end_a_tiny_profile_passes_then_a_2x_faster_baseline_fails(tmp_path, one_thread):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    result = runner.invoke(app, ["baseline", "--profile", str(spec), "--no-roofline", "--output", str(base)])
    assert result.exit_code == 0, result.output
    assert json.loads(base.read_text())["header"]["baseline"]["source"] == f"sweep of {spec}"

    # The second sweep, by check itself; generous enough that no CPU noise can fail it.
    result = runner.invoke(app, ["check", "--baseline", str(base), "--profile", str(spec), "--threshold", "300%",
                                 "--output", str(cur), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert set(_verdicts(result)) == {("mha", "fwd", 128, 1), ("mha", "fwd", 256, 1)}
    assert "measuring 2 cell(s)" in result.stderr
    assert {cell_key(r) for r in json.loads(cur.read_text())["rows"]} == set(_verdicts(result))

    # A baseline twice as fast as that second run: both cells regressed by exactly +100%.
    fast = _halved(cur, tmp_path / "fast.json")
    result = runner.invoke(app, ["check", "--baseline", str(fast), "--current", str(cur), "--threshold", "25%"])
    assert result.exit_code == 1, result.output
    assert "FAIL: 2 regressed" in result.stdout and result.stdout.count("+100.0%") == 2

    # Measured anew with the profile (a 10x faster baseline leaves no room for noise): re-measured, still fails.
    fast = _halved(cur, tmp_path / "fast10.json", 10.0)
    result = runner.invoke(app, ["check", "--baseline", str(fast), "--profile", str(spec), "--threshold", "25%"])
    assert result.exit_code == 1, result.output
    assert result.stdout.count("re-measured: regressed in all 4 runs") == 2  # 3 repeats by default on a CPU


def test_a_measurement_that_cannot_run_is_exit_4(tmp_path, monkeypatch):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    base = tmp_path / "base.json"
    assert runner.invoke(app, ["baseline", "-p", str(spec), "--no-roofline", "-o", str(base)]).exit_code == 0

    def no_workers(self, cells, on_start=None, on_row=None):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(Run, "measure", no_workers)
    result = runner.invoke(app, ["check", "--baseline", str(base), "--profile", str(spec)])
    assert result.exit_code == 4, result.output
    assert "cannot run the measurement (Too many open files)" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_that_is_not_there_is_exit_4(tmp_path):
    base = _write(tmp_path / "base.json", [_row(1.0)])
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    result = runner.invoke(app, ["check", "--baseline", str(base), "--profile", str(spec), "--device", "cuda"])
    assert result.exit_code == 4, result.output
    assert "cannot measure on device 'cuda'" in result.stderr


# --- layers compared by their resolved options (issue 18) --------------------------------------------------
OVQ_LAYER = {"name": "ovq", "type": "ovq", "d_model": 64, "heads": 2, "head_dim": 32, "dtype": "float32",
             "options": {}}


def test_a_spec_that_spells_out_a_default_is_the_same_workload(tmp_path):
    # The baseline's spec left dict_size at its default (1024); the current one writes it out.
    spelled = [{**OVQ_LAYER, "options": {"dict_size": 1024}}]
    rows = [_row(1.0, layer="ovq")]
    result = _check(tmp_path, rows, rows, base_header={"layers": [OVQ_LAYER]}, cur_header={"layers": spelled})
    assert result.exit_code == 0, result.output
    assert "configured differently" not in result.stderr


def test_a_default_changed_to_another_value_is_still_refused(tmp_path):
    other = [{**OVQ_LAYER, "options": {"dict_size": 512}}]
    rows = [_row(1.0, layer="ovq")]
    result = _check(tmp_path, rows, rows, base_header={"layers": [OVQ_LAYER]}, cur_header={"layers": other})
    assert result.exit_code == 2, result.output
    assert "configured differently" in result.stderr and "options.dict_size: 1024 -> 512" in result.stderr


def test_a_profile_spelling_out_the_baselines_defaults_measures(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    base = tmp_path / "base.json"
    assert runner.invoke(app, ["baseline", "-p", str(spec), "--no-roofline", "--repeats", "1", "-o",
                               str(base)]).exit_code == 0
    layers = json.loads(base.read_text())["header"]["layers"]
    assert layers[0]["options"] == {} and layers[0]["resolved_options"]["window"] is None
    spelled = tmp_path / "spelled.yaml"
    spelled.write_text(TINY.replace("    type: softmax_attention\n", "    type: softmax_attention\n    window: null\n"))
    result = runner.invoke(app, ["check", "--baseline", str(base), "--profile", str(spelled),
                                 "--threshold", "1000%"])
    assert "configured differently" not in result.stderr, result.output
    assert result.exit_code == 0, result.output
