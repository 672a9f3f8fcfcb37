"""`--devices`: cells measured concurrently on worker slots, one file, rows naming their device; validation of
the flag. CPU runs use `--devices cpu,cpu` (two workers sharing the cores) on tiny shapes."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ovqprof.cell import CellSettings
from ovqprof.cli import app
from ovqprof.devices import WorkerSlot, devices_option, parse_devices
from ovqprof.errors import UsageError
from ovqprof.progress import CellProgress
from ovqprof.report.series import SweepLabels
from ovqprof.rows import NOTE_SHARED_CORES, cell_key, empty_row
from ovqprof.spec import load_spec, load_spec_text
from ovqprof.sweep import plan_cells, run_sweep

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

# 3 layers x 2 modes x 2 lengths = 12 tiny cells: a few seconds each in a fresh worker on 2 shared cores.
TINY_SPEC = """
defaults: {d_model: 16, heads: 2, head_dim: 8, dtype: float32, device: cpu}
layers:
  - {name: mha, type: softmax_attention}
  - {name: gqa, type: softmax_attention, kv_heads: 1}
  - {name: lin, type: linear_attention}
sweep: {seq: [32, 64], modes: [fwd, decode], batch: 1, warmup_ms: 1, rep_ms: 3, check_seq: 16}
"""


@pytest.fixture
def tiny_spec(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SPEC)
    return path


def _keys(rows: list[dict]) -> list[tuple]:
    return [cell_key(r) for r in rows]


# --- validation -------------------------------------------------------------------------------------------


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two visible GPUs, as torch reports it (no GPU is touched: validation only asks)."""
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: names[torch.device(d).index or 0])
    return names


def test_gpu_slots_are_the_listed_devices(two_gpus):
    assert parse_devices("cuda:0,cuda:1") == [WorkerSlot("cuda:0", "cuda:0"), WorkerSlot("cuda:1", "cuda:1")]
    assert parse_devices(" cuda , cuda:1 ")[0] == WorkerSlot("cuda:0", "cuda:0")  # bare cuda is cuda:0


@pytest.mark.parametrize(("text", "problem"), [
    ("cuda:3", "cuda:3 does not exist (2 GPU(s) visible)"),
    ("cuda:0,cuda:3", "cuda:3 does not exist (2 GPU(s) visible)"),
    ("cpu,cuda:0", "cpu and cuda mixed"),
    ("cuda:0,cuda:0", "cuda:0 given twice"),
    ("cuda:0,cuda", "cuda:0 given twice"),
    ("gpu0,cuda:1", "gpu0 is not cpu or cuda:N"),
    ("cuda:0,,cuda:1", "an empty device name"),
    ("auto,cpu", "auto is not cpu or cuda:N"),
])
def test_a_bad_devices_value_is_a_usage_error_naming_the_flag(two_gpus, text, problem):
    with pytest.raises(UsageError) as info:
        parse_devices(text)
    message = str(info.value)
    assert message.startswith(f"--devices {text!r}: ") and problem in message
    assert "Allowed: a comma list of distinct visible GPUs" in message


def test_gpus_of_different_models_are_refused(two_gpus):
    two_gpus[1] = "NVIDIA A100-SXM4-40GB"
    with pytest.raises(UsageError, match="GPUs of different models .cuda:0 is NVIDIA H100 80GB HBM3, cuda:1 is "
                                         "NVIDIA A100-SXM4-40GB."):
        parse_devices("cuda:0,cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["sweep", "baseline"])
def test_cuda_on_a_cpu_only_machine_is_exit_2_in_one_paragraph(command, tiny_spec):
    result = runner.invoke(app, [command, "--profile", str(tiny_spec), "--devices", "cuda:0,cuda:1"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert message.startswith("error: --devices 'cuda:0,cuda:1': no CUDA GPU is visible"), message
    assert "Allowed:" in message and "Traceback" not in result.output


@pytest.mark.parametrize(("args", "fragment"), [
    (["--device", "cpu", "--devices", "cpu,cpu"], "--device 'cpu' and --devices 'cpu,cpu' both given"),
    (["--devices", "cpu,cpu", "--no-isolate"], "--no-isolate with several --devices"),
    (["--devices", "cpu,mps"], "--devices 'cpu,mps': mps is not cpu or cuda:N"),
])
def test_conflicting_device_flags_are_exit_2(tiny_spec, args, fragment):
    result = runner.invoke(app, ["sweep", "--profile", str(tiny_spec), *args])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_one_device_in_devices_is_the_device_flag():
    assert devices_option("cpu", None) == ("cpu", None)
    assert devices_option(None, "cuda:1") == ("cuda:1", None)
    device, slots = devices_option("cpu,cpu,cpu", None)
    assert device == "cpu"
    assert [s.label for s in slots] == ["cpu:0", "cpu:1", "cpu:2"]
    assert {s.device for s in slots} == {"cpu"} and {s.note for s in slots} == {NOTE_SHARED_CORES}


def test_a_single_device_sweep_with_devices_matches_device(tiny_spec, tmp_path):
    rows = {}
    for flag in ("--device", "--devices"):
        out = tmp_path / f"{flag.strip('-')}.json"
        result = runner.invoke(app, ["sweep", "--profile", str(tiny_spec), flag, "cpu", "--layers", "mha",
                                     "--modes", "fwd", "--no-roofline", "-q", "-f", "json", "-o", str(out)])
        assert result.exit_code == 0, result.output
        doc = json.loads(out.read_text())
        assert "devices" not in doc["header"] and doc["header"]["isolate"] is False  # today's CPU default
        rows[flag] = doc["rows"]
    assert [(r["layer"], r["seq"], r["device"]) for r in rows["--devices"]] == [("mha", 32, "cpu"), ("mha", 64, "cpu")]
    assert _keys(rows["--devices"]) == _keys(rows["--device"])


# --- progress and reports ---------------------------------------------------------------------------------


def test_progress_lines_name_the_device_of_the_row_that_finished():
    stream = io.StringIO()
    progress = CellProgress(2, stream=stream, workers=2)
    row = empty_row(layer="mha", mode="fwd", seq=64, batch=1, device="cpu:1", status="ok", ms_median=1.5)
    progress.start("gqa decode T=32 B=1 on cpu:0")  # another cell started since: the line must not take its name
    progress.row_finished(row)
    assert stream.getvalue().startswith("[1/2] mha fwd T=64 B=1 on cpu:1: ok 1.5 ms")


def test_a_report_draws_one_series_across_the_slots_of_a_run():
    rows = [empty_row(layer="mha", device=d, batch=1) for d in ("cuda:0", "cuda:1")]
    labels = SweepLabels(rows)
    assert {labels(r) for r in rows} == {"mha"} and {labels.group(r) for r in rows} == {""}
    mixed = SweepLabels([*rows, empty_row(layer="mha", device="cpu", batch=1)])
    assert mixed(rows[1]) == "mha (cuda)" and mixed.group(rows[1]) == "cuda"


# --- concurrent sweeps on cpu,cpu -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_cpu_workers_write_every_cell_to_one_file_naming_their_device(tiny_spec, tmp_path):
    out = tmp_path / "rows.json"
    result = runner.invoke(app, ["sweep", "--profile", str(tiny_spec), "--devices", "cpu,cpu", "--no-roofline",
                                 "-f", "json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    rows, header = doc["rows"], doc["header"]
    single = [c.key for c in plan_cells(load_spec(tiny_spec))]  # the cells a single-device sweep measures
    assert len(rows) == len(single) and set(_keys(rows)) == set(single)
    assert {r["device"] for r in rows} == {"cpu:0", "cpu:1"}
    assert all(r["status"] == "ok" and r["ms_median"] > 0 for r in rows), [r["note"] for r in rows]
    assert all(NOTE_SHARED_CORES in r["note"] for r in rows)
    assert header["devices"] == ["cpu:0", "cpu:1"] and header["isolate"] is True
    assert NOTE_SHARED_CORES in header["notes"]
    stderr = result.stderr
    assert "- devices: cpu:0, cpu:1" in stderr and f"- note: {NOTE_SHARED_CORES}" in stderr
    assert " on cpu:0: ok" in stderr and " on cpu:1: ok" in stderr


@pytest.fixture
def _tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))


@pytest.mark.slow
@pytest.mark.usefixtures("_tests_on_path")
def test_a_worker_killed_mid_cell_is_an_error_row_and_its_slot_goes_on():
    spec = load_spec_text("""
defaults: {d_model: 16, heads: 2, head_dim: 8, dtype: float32, device: cpu}
layers:
  - {name: victim, type: 'failing_layers:ToyLayer', fail: hang}
  - {name: sleeper, type: 'failing_layers:ToyLayer', fail: hang}
  - {name: after, type: softmax_attention}
sweep: {seq: [32], modes: [fwd, decode], batch: 1, warmup_ms: 1, rep_ms: 3, check_seq: 16}
""", file="test.yaml")
    cells = plan_cells(spec)  # victim fwd, victim decode, sleeper fwd, sleeper decode, after fwd, after decode
    cells = [cells[0], cells[2], cells[4], cells[5]]
    slots = parse_devices("cpu,cpu")
    started: list[tuple[str, str]] = []

    def kill_the_victim() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            workers = [p for p in mp.active_children() if p.name == "ovqprof-cell-victim"]
            if workers:
                time.sleep(2.0)  # let it reach the hang
                os.kill(workers[0].pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_victim)
    killer.start()
    rows: list[dict] = []
    # The sleeper holds the other slot until its timeout, so the cells after the victim must run on the
    # victim's slot, in a fresh worker.
    run_sweep(cells, CellSettings(device="cpu", warmup_ms=1, rep_ms=3, check_seq=16), rows.append,
              isolate=True, cell_timeout_s=20, slots=slots,
              on_start=lambda cell, label: started.append((cell.layer.name, label)))
    killer.join()
    by_layer = {(r["layer"], r["mode"]): r for r in rows}
    assert len(rows) == 4 and set(by_layer) == {c.key[:2] for c in cells}
    victim = by_layer[("victim", "fwd")]
    assert victim["status"] == "error" and "killed by SIGKILL" in victim["note"]
    assert by_layer[("sleeper", "fwd")]["status"] == "timeout"
    assert by_layer[("after", "fwd")]["status"] == "ok" and by_layer[("after", "decode")]["status"] == "ok"
    assert by_layer[("after", "fwd")]["device"] == victim["device"]
    assert {name for name, _ in started[:2]} == {"victim", "sleeper"}
    assert {label for _, label in started[:2]} == {"cpu:0", "cpu:1"}
    assert ("after", victim["device"]) in started


def _csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.mark.slow
def test_an_interrupted_two_worker_sweep_keeps_its_rows_and_resume_runs_only_the_missing_cells(tiny_spec, tmp_path):
    out = tmp_path / "rows.csv"
    args = [sys.executable, "-m", "ovqprof", "sweep", "--profile", str(tiny_spec), "--devices", "cpu,cpu",
            "--no-roofline", "-f", "csv"]
    proc = subprocess.Popen([*args, "-o", str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 3):  # header + 2 rows
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    t0 = time.time()
    _, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 30, "the running workers were not stopped promptly"
    assert proc.returncode == 130, stderr
    kept = _csv_rows(out)
    total = len(plan_cells(load_spec(tiny_spec)))
    assert 2 <= len(kept) < total
    assert all(r["status"] == "ok" and r["device"] in ("cpu:0", "cpu:1") for r in kept)  # no killed-cell rows
    message = " ".join(stderr.split())
    assert f"interrupted: {len(kept)} of {total} rows finished and kept in {out}" in message
    assert f"--devices cpu,cpu --no-roofline -f csv --resume {out}" in message

    resumed = subprocess.run([*args, "--resume", str(out)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(kept)} rows already there, {total - len(kept)} cells to run" in resumed.stderr
    rows = _csv_rows(out)
    keys = [(r["layer"], r["mode"], int(r["seq"]), int(r["batch"])) for r in rows]
    assert len(keys) == len(set(keys)) == total
    assert set(keys) == {c.key for c in plan_cells(load_spec(tiny_spec))}
    assert rows[: len(kept)] == kept  # appended after the rows already there


@pytest.mark.slow
def test_baseline_records_the_rows_of_every_worker(tiny_spec, tmp_path):
    out = tmp_path / "base.json"
    result = runner.invoke(app, ["baseline", "--profile", str(tiny_spec), "--layers", "mha,lin", "--modes", "fwd",
                                 "--devices", "cpu,cpu", "--no-roofline", "--output", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert sorted(_keys(doc["rows"])) == [("lin", "fwd", 32, 1), ("lin", "fwd", 64, 1), ("mha", "fwd", 32, 1),
                                          ("mha", "fwd", 64, 1)]
    assert {r["device"] for r in doc["rows"]} == {"cpu:0", "cpu:1"}
    assert doc["header"]["devices"] == ["cpu:0", "cpu:1"] and NOTE_SHARED_CORES in doc["header"]["notes"]
    assert f"- note: {NOTE_SHARED_CORES}" in result.stderr  # printed before the first cell
