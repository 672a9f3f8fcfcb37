"""`ovqprof trace`, `sweep --trace` and the report's "Where the time goes" (issue 20): traces that parse, the
layers' phase names, breakdowns that add up, operator-only breakdowns, bad input, and no cost to timed runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ovqprof.cell import Cell
from ovqprof.cli import app
from ovqprof.phases import PREFIX, phase, tracing
from ovqprof.rows import empty_row
from ovqprof.spec import load_spec
from ovqprof.trace import PHASE_TOLERANCE, trace_cell, trace_events

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
runner = CliRunner()
PHASES = {
    ("ovq", "fwd"): {"projections", "core", "read", "assign and spawn", "merge", "output projection"},
    ("ovq", "decode"): {"projections", "read", "state update", "output projection"},
    ("mha", "fwd"): {"projections", "core", "output projection"},
    ("mha", "decode"): {"projections", "state update", "read", "output projection"},
    ("linear", "fwd"): {"projections", "core", "output projection"},
}


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """One `ovqprof trace` run over three layers in fwd and decode at T=256, and its files."""
    out = tmp_path_factory.mktemp("traces")
    result = runner.invoke(app, ["trace", "--profile", "quick", "--layers", "ovq,mha,gla", "--modes",
                                 "fwd,decode", "--seq", "256", "--reps", "2", "--output", str(out), "-f", "json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def _doc(docs, layer, mode):
    (doc,) = [d for d in docs if (d["header"]["layer"], d["header"]["mode"]) == (layer, mode)]
    return doc


def test_every_cell_writes_a_gzip_chrome_trace_that_parses(traced):
    out, docs = traced
    assert len(docs) == 6
    for d in docs:
        path = out / d["header"]["trace_file"]
        assert path.name == f"{d['header']['layer']}-{d['header']['mode']}-256.json.gz"
        events = trace_events(path)
        assert any(e.get("name") == PREFIX + "cell" for e in events)
        assert all("ts" in e for e in events if e.get("ph") == "X")
        assert (out / path.name.replace(".json.gz", ".breakdown.json")).is_file()


@pytest.mark.parametrize(("layer", "mode"), sorted(k for k in PHASES if k[0] != "linear"))
def test_phase_names_of_each_layer_appear_in_breakdown_and_trace(traced, layer, mode):
    out, docs = traced
    doc = _doc(docs, layer, mode)
    names = {r["name"] for r in doc["rows"] if r["kind"] == "phase"}
    assert PHASES[(layer, mode)] <= names, names
    events = {e.get("name") for e in trace_events(out / doc["header"]["trace_file"])}
    assert {PREFIX + n for n in PHASES[(layer, mode)]} <= events


def test_ovq_core_phases_nest_under_core(traced):
    _, docs = traced
    rows = {r["name"]: r for r in _doc(docs, "ovq", "fwd")["rows"] if r["kind"] == "phase"}
    assert rows["read"]["parent"] == rows["merge"]["parent"] == "core" and rows["core"]["parent"] == ""
    assert rows["read"]["calls"] == 4  # T = 256 in chunks of 64
    assert rows["read"]["ms"] + rows["assign and spawn"]["ms"] + rows["merge"]["ms"] <= rows["core"]["ms"] * 1.01


@pytest.mark.parametrize(("layer", "mode"), [("ovq", "fwd"), ("ovq", "decode"), ("mha", "fwd"),
                                             ("mha", "decode")])
def test_top_level_phases_and_other_add_up_to_the_traced_total(traced, layer, mode):
    _, docs = traced
    doc = _doc(docs, layer, mode)
    total = doc["header"]["total_ms"]
    top = [r for r in doc["rows"] if r["kind"] in ("phase", "other") and not r["parent"]]
    phases = sum(r["ms"] for r in top if r["kind"] == "phase")
    assert phases <= total * (1 + PHASE_TOLERANCE)
    assert sum(r["ms"] for r in top) == pytest.approx(total, rel=PHASE_TOLERANCE)
    assert sum(r["pct"] for r in top) == pytest.approx(100.0, abs=100 * PHASE_TOLERANCE)
    assert not doc["header"]["note"]


def test_a_layer_without_phase_marks_still_gets_an_operator_breakdown(traced):
    _, docs = traced
    doc = _doc(docs, "gla", "fwd")
    kinds = {r["kind"] for r in doc["rows"]}
    assert kinds == {"op"} and "operators only" in doc["header"]["note"]
    ops = [r for r in doc["rows"] if r["kind"] == "op"]
    assert len(ops) >= 3 and all(r["ms"] >= 0 and r["calls"] > 0 for r in ops)
    assert ops == sorted(ops, key=lambda r: -r["ms"])  # top operators by self time
    assert sum(r["ms"] for r in ops) <= doc["header"]["total_ms"] * (1 + PHASE_TOLERANCE)


def test_table_csv_and_md_formats(tmp_path):
    for fmt, marker in (("table", "kind"), ("csv", "layer,mode,seq,batch,kind"), ("md", "| layer")):
        result = runner.invoke(app, ["trace", "--profile", "quick", "--layers", "linear", "--seq", "128",
                                     "--reps", "1", "-o", str(tmp_path), "-f", fmt])
        assert result.exit_code == 0, result.output
        assert marker in result.stdout and "projections" in result.stdout


def test_bwd_traces_the_backward_as_its_own_phase(tmp_path):
    spec = load_spec(ROOT / "profiles" / "quick.yaml")
    (layer,) = [s for s in spec.layers if s.name == "mha"]
    b = trace_cell(Cell(layer, "bwd", 128, 1), "cpu", tmp_path, reps=1)
    names = [r.name for r in b.rows if r.kind == "phase"]
    assert {"projections", "core", "output projection", "backward"} <= set(names)


# --- bad input ------------------------------------------------------------------------------------------
def test_unknown_layer_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["trace", "--profile", "quick", "--layers", "nope", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "unknown layer name(s) ['nope']" in result.output
    assert "Traceback" not in result.output


def test_an_output_that_is_a_file_is_a_usage_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    result = runner.invoke(app, ["trace", "--profile", "quick", "--layers", "mha", "-o", str(target)])
    assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output


def test_a_mode_the_layer_cannot_run_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    spec = tmp_path / "plain.yaml"
    spec.write_text("name: plain\ndefaults: {d_model: 16, heads: 2, head_dim: 8, dtype: float32, device: cpu}\n"
                    "layers:\n  - name: plain\n    type: custom_layers:PlainMixer\n"
                    "sweep: {seq: [32], modes: [fwd], batch: [1]}\n")
    result = runner.invoke(app, ["trace", "--profile", str(spec), "--modes", "decode", "-o", str(tmp_path / "t")])
    assert result.exit_code == 2, result.output
    assert "cannot trace plain decode at T=32" in result.output and "no decode path" in result.output


# --- timed runs are not traced ----------------------------------------------------------------------------
def test_phases_are_no_ops_outside_a_trace():
    with torch.profiler.profile() as prof:
        with phase("core"):
            torch.ones(3).sum()
    assert not any(e.name.startswith(PREFIX) for e in prof.events())
    with tracing(), torch.profiler.profile() as prof:
        with phase("core"):
            torch.ones(3).sum()
    assert any(e.name == PREFIX + "core" for e in prof.events())


def test_sweep_trace_writes_a_trace_per_ok_cell_and_keeps_the_rows(tmp_path):
    rows_file, trace_dir = tmp_path / "rows.json", tmp_path / "traces"
    result = runner.invoke(app, ["sweep", "--profile", "quick", "--layers", "mha,linear", "--seq", "128",
                                 "--modes", "fwd", "--no-roofline", "-f", "json", "-o", str(rows_file),
                                 "--trace", str(trace_dir)])
    assert result.exit_code == 0, result.output
    rows = json.loads(rows_file.read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert sorted(p.name for p in trace_dir.glob("*.json.gz")) == ["linear-fwd-128.json.gz", "mha-fwd-128.json.gz"]


# --- report -----------------------------------------------------------------------------------------------
def _sweep_file(tmp_path: Path) -> Path:
    """A result file with one successful sweep row (the report needs some rows besides the traces)."""
    row = empty_row(layer="mha", device="cpu", dtype="float32", mode="fwd", seq=256, batch=1, status="ok")
    row.update(ms_median=1.0, ms_p20=0.9, ms_p80=1.1, tokens_per_s=256e3, kind="softmax")
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"header": {"device": "test"}, "rows": [row]}))
    return path


def test_report_where_the_time_goes_section(traced, tmp_path):
    out, docs = traced
    sweep = _sweep_file(tmp_path)
    result = runner.invoke(app, ["report", str(sweep), "-o", str(tmp_path / "r"), "--traces", str(out)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "## Where the time goes" in text and "![Where the time goes](breakdown.png)" in text
    # OVQ's bar splits its core into read, assign and spawn, merge: the largest of its segments leads
    rows = _doc(docs, "ovq", "fwd")["rows"]
    pct = {r["name"]: r["pct"] for r in rows if r["kind"] == "phase" and r["name"] != "core"}
    best = max(pct, key=pct.get)
    assert f"ovq fwd spends {pct[best]:.0f}% in {best}" in text
    mha = {r["name"]: r["pct"] for r in _doc(docs, "mha", "fwd")["rows"] if r["kind"] in ("phase", "other")}
    lead = max(mha, key=mha.get)
    assert f"mha fwd spends {mha[lead]:.0f}% in {lead}" in text
    assert (tmp_path / "r" / "breakdown.png").read_bytes()[:4] == b"\x89PNG"


def test_report_traces_must_hold_breakdowns(tmp_path):
    sweep = _sweep_file(tmp_path)
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["report", str(sweep), "-o", str(tmp_path / "r"), "--traces",
                                 str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no *.breakdown.json" in result.output
