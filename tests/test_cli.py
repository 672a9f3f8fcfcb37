"""The CLI end to end: sweeps, listing, env, clear errors with exit 2, and interruption keeping rows."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_spec import MALFORMED
from typer.testing import CliRunner

from ovqprof.cli import app
from ovqprof.registry import BUILTIN_LAYERS
from ovqprof.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))

def _quick_cells() -> int:
    """Cells of the quick profile at the RESUME_SEQ lengths (layers x modes x lengths x batches)."""
    from ovqprof.spec import load_spec, resolve_profile

    spec = load_spec(resolve_profile("quick"))
    sweep = spec.sweep
    batches = sweep.batch if isinstance(sweep.batch, (list, tuple)) else [sweep.batch]
    return len(spec.layers) * len(sweep.modes) * len(RESUME_SEQ) * len(batches)


RESUME_SEQ = (256, 512)  # the lengths of SWEEP_ARGS below
QUICK_CELLS = _quick_cells()

runner = CliRunner()


def _csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_sweep_quick_profile_subset_as_csv():
    result = runner.invoke(app, ["sweep", "--profile", "quick", "--seq", "256", "--modes", "fwd,decode",
                                 "--layers", "mha,linear", "--format", "csv", "--no-roofline"])
    assert result.exit_code == 0, result.output
    rows = _csv_rows(result.stdout)
    assert [(r["layer"], r["mode"]) for r in rows] == [
        ("mha", "fwd"), ("mha", "decode"), ("linear", "fwd"), ("linear", "decode")]
    assert all(r["status"] == "ok" and r["check"] == "pass" for r in rows)
    assert all(r["pct_roofline"] == "" for r in rows)  # --no-roofline: unknown, not 0


def test_sweep_json_output_file_has_machine_header(tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["sweep", "-p", "quick", "--seq", "256", "--modes", "fwd", "--layers", "gqa",
                                 "-f", "json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "python", "date", "peaks", "git_revision"):
        assert key in doc["header"]
    (row,) = doc["rows"]
    assert row["layer"] == "gqa" and row["status"] == "ok"
    assert 0 < row["pct_roofline"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default; a visible GPU selects default.yaml")
def test_no_profile_on_cpu_says_it_uses_quick(monkeypatch):
    result = runner.invoke(app, ["sweep", "--seq", "256", "--modes", "fwd", "--layers", "mha", "-f", "csv",
                                 "--no-roofline"])
    assert result.exit_code == 0, result.output
    assert "using quick.yaml (no GPU is visible)" in result.stderr


@pytest.mark.parametrize(("args", "fragment"), [
    (["--seq", "4k..1k"], "--seq"),
    (["--modes", "fwd,sideways"], "Allowed: a comma list of fwd, bwd, decode"),
    (["--layers", "nope"], "unknown layer name(s) ['nope']"),
    (["--batch", "0"], "--batch"),
    (["--format", "xml"], "Allowed: table, csv, json, md"),
    (["--device", "cuda"], "cannot be used"),
    (["--output", "/nonexistent-dir/out.csv"], "does not exist"),
    (["--profile", "no-such-profile"], "no-such-profile"),
])
def test_bad_command_line_is_exit_2_without_traceback(args, fragment):
    result = runner.invoke(app, ["sweep", "-p", "quick", *args] if "--profile" not in args else ["sweep", *args])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_malformed_spec_file_is_exit_2_naming_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: {d_model: 64, heads: 2, head_dim: 32}\nlayers:\n  - name: a\n"
                   "    type: softmax_attention\n    kv_heads: two\n")
    result = runner.invoke(app, ["sweep", "--profile", str(bad)])
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert str(bad) in message and "line 5" in message and "layers[0].kv_heads" in message
    assert "Traceback" not in result.output


def test_layers_lists_every_registered_type_with_options():
    result = runner.invoke(app, ["layers", "--format", "json"])
    assert result.exit_code == 0
    doc = {entry["type"]: entry for entry in json.loads(result.stdout)}
    assert set(doc) == set(BUILTIN_LAYERS)
    options = {o["name"]: o for o in doc["softmax_attention"]["options"]}
    assert options["kv_heads"]["default"] == "None" and "window" in options
    table = runner.invoke(app, ["layers"])
    assert table.exit_code == 0 and "feature_map" in table.stdout


def test_env_reports_versions_and_peaks():
    result = runner.invoke(app, ["env", "--format", "json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["torch"] and info["python"] and info["device_type"] == "cpu"
    assert info["nvml"] is False and info["nvml_note"]
    assert info["peaks"]["float32"]["matmul_flops_per_s"] > 1e8


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_profile_loads_and_uses_registered_types(profile):
    spec = load_spec(profile)
    assert spec.layers
    raw = yaml.safe_load(profile.read_text())
    assert all(entry["type"] in BUILTIN_LAYERS for entry in raw["layers"])


# Two lengths (RESUME_SEQ) keep the interrupted / resumed sweeps of the whole quick profile to a few minutes.
SWEEP_ARGS = ["sweep", "--profile", "quick", "--no-roofline", "--seq", ",".join(map(str, RESUME_SEQ))]


@pytest.mark.parametrize(("file", "line", "field", "fragments"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_every_malformed_spec_is_exit_2_with_its_message(file, line, field, fragments, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    result = runner.invoke(app, ["sweep", "--profile", str(ROOT / "tests" / "specs" / file)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    for fragment in [*fragments, *([f"field {field}"] if field else []), *([f"line {line}"] if line else [])]:
        assert " ".join(fragment.split()) in message, message
    assert "Traceback" not in result.output


def _run_until_rows(tmp_path: Path, min_rows: int, sig: signal.Signals, suffix: str = "csv"):
    out = tmp_path / f"rows.{suffix}"
    proc = subprocess.Popen([sys.executable, "-m", "ovqprof", *SWEEP_ARGS, "--format", suffix,
                             "--output", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if out.exists() and _count_rows(out) >= min_rows:
            break
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr, out


def _count_rows(path: Path) -> int:
    text = path.read_text()
    if path.suffix == ".csv":
        return max(0, text.count("\n") - 1)
    try:
        return len(json.loads(text)["rows"])
    except ValueError:
        return 0


def _quick_cells() -> set[tuple]:
    spec = load_spec(ROOT / "profiles" / "quick.yaml")
    return {(layer.name, mode, seq, 1) for layer in spec.layers for mode in spec.sweep.modes
            for seq in RESUME_SEQ}


def _resume(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ovqprof", *SWEEP_ARGS, "--resume", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "suffix"), [(signal.SIGKILL, "csv"), (signal.SIGINT, "json")],
                         ids=["SIGKILL-csv", "SIGINT-json"])
def test_resume_completes_exactly_the_missing_cells(tmp_path, sig, suffix):
    code, stderr, out = _run_until_rows(tmp_path, 5, sig, suffix)
    assert code == (-9 if sig == signal.SIGKILL else 130), stderr
    if sig == signal.SIGINT:
        expected = (f"Resume with: ovqprof sweep --profile quick --no-roofline --seq 256,512 --format {suffix} "
                    f"--resume {out}")
        assert expected in " ".join(stderr.split())
    kept = _count_rows(out)
    assert 5 <= kept < QUICK_CELLS
    proc = _resume(out)
    assert proc.returncode == 0, proc.stderr
    assert f"{kept} rows already there, {QUICK_CELLS - kept} cells to run" in proc.stderr
    if suffix == "csv":
        rows = _csv_rows(out.read_text())
    else:
        rows = json.loads(out.read_text())["rows"]
    keys = [(r["layer"], r["mode"], int(r["seq"]), int(r["batch"])) for r in rows]
    assert len(keys) == len(set(keys)) == QUICK_CELLS
    assert set(keys) == _quick_cells()


def test_resume_refuses_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "notes.csv"
    bad.write_text("a,b\n1,2\n")
    result = runner.invoke(app, [*SWEEP_ARGS, "--resume", str(bad)])
    assert result.exit_code == 2
    assert "is not an ovqprof result file" in result.stderr
    md = tmp_path / "rows.md"
    md.write_text("| x |\n")
    result = runner.invoke(app, [*SWEEP_ARGS, "--resume", str(md)])
    assert result.exit_code == 2 and "cannot resume a .md file" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_sweep_leaves_a_valid_csv_of_finished_rows(tmp_path, sig):
    code, stderr, out = _run_until_rows(tmp_path, 3, sig)
    assert code == 130, stderr
    assert "interrupted:" in stderr and "Traceback" not in stderr
    rows = _csv_rows(out.read_text())
    assert 3 <= len(rows) < QUICK_CELLS
    for row in rows:  # every kept row is complete
        assert row["status"] == "ok" and float(row["ms_median"]) > 0 and row["note"] is not None
    assert f"{len(rows)} of {QUICK_CELLS} rows finished and kept" in stderr


@pytest.mark.slow
def test_readme_sweep_prints_rows_for_every_layer_and_mode():
    proc = subprocess.run([sys.executable, "-m", "ovqprof", "sweep", "--seq", "256..1k", "--format", "csv"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = _csv_rows(proc.stdout)
    spec = load_spec(ROOT / "profiles" / "quick.yaml")
    expected = {(layer.name, mode, seq) for layer in spec.layers for mode in ("fwd", "bwd", "decode")
                for seq in (256, 512, 1024)}
    assert {(r["layer"], r["mode"], int(r["seq"])) for r in rows} == expected
    assert {r["status"] for r in rows} == {"ok"}


def test_debug_shows_the_underlying_exception(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [1, 2\n")
    result = runner.invoke(app, ["sweep", "--profile", str(bad), "--debug"])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "SpecError"


def test_a_write_failure_mid_sweep_is_one_paragraph_exit_4(tmp_path, monkeypatch):
    from ovqprof import output

    def disk_full(self, row):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output.RowWriter, "write", disk_full)
    result = runner.invoke(app, [*SWEEP_ARGS, "--seq", "256", "--modes", "fwd", "--layers", "mha", "-f", "csv",
                                 "-o", str(tmp_path / "r.csv")])
    assert result.exit_code == 4
    assert "No space left on device" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.output
