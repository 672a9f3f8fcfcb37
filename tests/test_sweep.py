"""The sweep runner: failures become rows and the sweep goes on; the gate marks wrong decode paths."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from ovqprof.cell import CellSettings
from ovqprof.spec import load_spec_text
from ovqprof.sweep import plan_cells, run_sweep

SETTINGS = CellSettings(device="cpu", warmup_ms=1, rep_ms=5, check_seq=16)


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.path.parent))


def _spec(layers_yaml: str, seq: str = "[32, 64]", modes: str = "[fwd, bwd, decode]"):
    text = f"""
defaults: {{d_model: 16, heads: 2, head_dim: 8, dtype: float32, device: cpu}}
layers:
{layers_yaml}
sweep: {{seq: {seq}, modes: {modes}, batch: 1, warmup_ms: 1, rep_ms: 5, check_seq: 16}}
"""
    return load_spec_text(text, file="test.yaml")


def _run(spec, **kwargs) -> list[dict]:
    rows: list[dict] = []
    run_sweep(plan_cells(spec), SETTINGS, rows.append, **kwargs)
    return rows


def _by_cell(rows):
    return {(r["layer"], r["mode"], r["seq"]): r for r in rows}


def test_rows_for_real_layers_have_every_figure():
    spec = _spec("  - {name: mha, type: softmax_attention}\n  - {name: lin, type: linear_attention}")
    rows = _run(spec)
    assert [(r["layer"], r["mode"], r["seq"]) for r in rows] == [
        (name, mode, seq) for name in ("mha", "lin") for mode in ("fwd", "bwd", "decode") for seq in (32, 64)]
    for row in rows:
        assert row["status"] == "ok", row["note"]
        assert row["check"] == "pass"
        assert row["ms_p20"] <= row["ms_median"] <= row["ms_p80"]
        assert row["tokens_per_s"] > 0 and row["flops"] > 0 and row["bytes"] > 0
        assert row["state_bytes"] > 0
        assert row["mem_torch_alloc_bytes"] is None  # CPU: unknown, not 0
        assert row["kind"] in ("softmax", "linear") and row["impl"]
    cells = _by_cell(rows)
    # decode processes batch tokens per call, fwd batch * seq
    assert cells[("mha", "fwd", 64)]["tokens_per_s"] == pytest.approx(64 / (cells[("mha", "fwd", 64)]["ms_median"] / 1e3))
    assert cells[("mha", "decode", 64)]["state_bytes"] == 2 * cells[("mha", "decode", 32)]["state_bytes"]
    assert cells[("lin", "decode", 64)]["state_bytes"] == cells[("lin", "decode", 32)]["state_bytes"]


def test_out_of_memory_is_a_row_status_and_later_cells_run():
    spec = _spec("  - {name: toy, type: 'failing_layers:ToyLayer', fail: oom, fail_at_seq: 64}\n"
                 "  - {name: after, type: softmax_attention}", modes="[fwd, bwd]")
    cells = _by_cell(_run(spec))
    assert cells[("toy", "fwd", 32)]["status"] == "ok"
    assert cells[("toy", "fwd", 64)]["status"] == "oom"
    assert cells[("toy", "bwd", 64)]["status"] == "oom"
    assert "OutOfMemoryError" in cells[("toy", "fwd", 64)]["note"]
    assert cells[("toy", "fwd", 64)]["ms_median"] is None
    assert all(cells[("after", m, s)]["status"] == "ok" for m in ("fwd", "bwd") for s in (32, 64))


def test_an_exception_is_an_error_row_with_its_message():
    spec = _spec("  - {name: toy, type: 'failing_layers:ToyLayer', fail: error, fail_at_seq: 64}",
                 modes="[fwd]")
    rows = _run(spec)
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert rows[1]["note"].startswith("ValueError: deliberate failure at seq 64")


def test_a_decode_path_that_disagrees_with_forward_is_marked():
    spec = _spec("  - {name: toy, type: 'failing_layers:ToyLayer', fail: wrong_decode}", modes="[fwd, decode]")
    rows = _run(spec)
    assert {r["status"] for r in rows} == {"check_failed"}
    assert all(r["check"] == "fail" and r["ms_median"] is not None for r in rows)
    assert "decode vs forward rel RMS error" in rows[0]["note"]


def test_a_plain_module_runs_fwd_and_skips_decode_with_a_reason():
    spec = _spec("  - {name: plain, type: 'failing_layers:PlainModule', scale: 2.0}")
    cells = _by_cell(_run(spec))
    assert cells[("plain", "fwd", 32)]["status"] == "ok"
    assert cells[("plain", "fwd", 32)]["flops"] is None  # no cost model: unknown, not 0
    assert "no cost model" in cells[("plain", "fwd", 32)]["note"]
    assert cells[("plain", "decode", 32)]["status"] == "skipped"
    assert "no decode path" in cells[("plain", "decode", 32)]["note"]


@pytest.mark.slow
def test_isolated_worker_turns_a_segfault_and_a_hang_into_rows():
    spec = _spec("  - {name: crash, type: 'failing_layers:ToyLayer', fail: segfault, fail_at_seq: 64}\n"
                 "  - {name: hang, type: 'failing_layers:ToyLayer', fail: hang, fail_at_seq: 64}",
                 modes="[fwd]")
    cells = _by_cell(_run(spec, isolate=True, cell_timeout_s=20))
    assert cells[("crash", "fwd", 32)]["status"] == "ok"
    assert cells[("crash", "fwd", 64)]["status"] == "error"
    assert "SIGSEGV" in cells[("crash", "fwd", 64)]["note"]
    assert cells[("hang", "fwd", 32)]["status"] == "ok"
    assert cells[("hang", "fwd", 64)]["status"] == "timeout"


@pytest.mark.slow
def test_a_worker_killed_with_sigkill_becomes_an_error_row_and_the_sweep_goes_on():
    spec = _spec("  - {name: hang, type: 'failing_layers:ToyLayer', fail: hang, fail_at_seq: 64}\n"
                 "  - {name: after, type: softmax_attention}", modes="[fwd]", seq="[64]")

    def kill_first_worker():
        deadline = time.time() + 60
        while time.time() < deadline:
            workers = mp.active_children()
            if workers:
                time.sleep(2.0)  # let it reach the hang
                os.kill(workers[0].pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    rows = _run(spec, isolate=True)
    killer.join()
    assert [(r["layer"], r["status"]) for r in rows] == [("hang", "error"), ("after", "ok")]
    assert "killed by SIGKILL" in rows[0]["note"]
