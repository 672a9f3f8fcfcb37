"""`ovqprof report`: plots and readings from sweep and capacity results (CSV or JSON), checked against numbers
computed here from the rows; missing data omits a plot with a sentence; bad input exits 2 naming the file."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ovqprof.cli import app
from ovqprof.report.readings import ParetoPoint, first_drop, overtake_length, pareto_front, rank_by_length
from ovqprof.rows import COLUMNS, empty_row

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent

CAPACITY_COLUMNS = ("method", "layer", "type", "kind", "dtype", "device", "keys", "gap", "seeds", "d_model", "seq",
                    "pairs", "dk", "dv", "accuracy", "cosine", "rel_error", "capacity", "tau", "state_bytes", "lr",
                    "wall_s", "status", "note")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("throughput.png", "decode.png", "memory.png", "state.png", "recall.png", "pareto.png")


# --- helpers -------------------------------------------------------------------------------------------------
def write_json(path: Path, rows: list[dict], header: dict | None = None) -> Path:
    path.write_text(json.dumps({"header": header or {"device": "test"}, "rows": rows}))
    return path


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return path


def sweep_row(layer: str, kind: str, mode: str, seq: int, tokens_per_s: float, state_bytes: int,
              status: str = "ok") -> dict:
    return empty_row(layer=layer, kind=kind, impl="torch", device="cpu", dtype="float32", mode=mode, seq=seq,
                     batch=1, status=status, check="pass", ms_median=seq / tokens_per_s * 1e3, timer="wall",
                     tokens_per_s=tokens_per_s, mem_rss_peak_bytes=400 * 2**20 + seq * 1000,
                     state_bytes=state_bytes, note=None if status == "ok" else "out of memory")


def crossover_sweep() -> list[dict]:
    """A (softmax, KV cache growing) is faster up to T=512, B (constant state) from T=1024 on."""
    a = {256: 1000.0, 512: 900.0, 1024: 500.0, 2048: 400.0}
    b = {256: 500.0, 512: 600.0, 1024: 700.0, 2048: 800.0}
    rows = [sweep_row("A", "softmax", "fwd", t, v, 1024 * t) for t, v in a.items()]
    rows += [sweep_row("B", "ovq", "fwd", t, v, 65536) for t, v in b.items()]
    rows += [sweep_row("A", "softmax", "decode", t, 1e5 / t, 1024 * t) for t in a]
    rows += [sweep_row("B", "ovq", "decode", t, 300.0, 65536) for t in a]
    rows.append(sweep_row("A", "softmax", "fwd", 4096, 1.0, 1024 * 4096, status="oom"))
    return rows


def capacity_row(layer: str, kind: str, pairs: int, accuracy: float, state_bytes: int, note: str | None = None,
                 tau: float = 0.9) -> dict:
    return {"method": "probe", "layer": layer, "type": kind, "kind": kind, "dtype": "float32", "device": "cpu",
            "keys": "gaussian", "gap": 0, "seeds": "0,1", "d_model": None, "seq": None, "pairs": pairs,
            "dk": 64, "dv": 64, "accuracy": accuracy, "cosine": accuracy, "rel_error": 1 - accuracy,
            "capacity": None, "tau": tau, "state_bytes": state_bytes, "lr": None, "wall_s": 0.1,
            "status": "ok", "note": note}


OVQ_ACCURACY = {16: 1.0, 32: 1.0, 64: 0.95, 128: 0.92, 256: 0.6, 512: 0.2}


def capacity_rows() -> list[dict]:
    """mha holds everything (state grows with pairs); linear saturates at 32 pairs; ovq (dict_size 64)
    first drops below tau=0.9 at 256 pairs, 4x its dictionary."""
    rows = []
    for pairs, acc in OVQ_ACCURACY.items():
        rows.append(capacity_row("mha", "softmax", pairs, 1.0, pairs * 512))
        rows.append(capacity_row("linear", "linear", pairs, 0.95 if pairs <= 32 else 0.3, 65536))
        rows.append(capacity_row("ovq", "ovq", pairs, acc, 40000, note="dict_size=64"))
    return rows


def report_text(out: Path) -> str:
    return (out / "report.md").read_text()


def links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def after_sources(text: str) -> str:
    """The report from its key numbers on (the sources section names the input files and the date)."""
    return text[text.index("## Key numbers"):]


def invoke_report(paths: list[Path], out: Path):
    return runner.invoke(app, ["report", *map(str, paths), "--output", str(out)])


# --- a real CPU sweep ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_sweep(tmp_path_factory) -> Path:
    """A real sweep: three layers of the quick profile, fwd and decode at T=256 and 512, short timing."""
    folder = tmp_path_factory.mktemp("sweep")
    spec = yaml.safe_load((ROOT / "profiles" / "quick.yaml").read_text())
    spec["layers"] = [layer for layer in spec["layers"] if layer["name"] in ("mha", "linear", "ovq")]
    spec["sweep"].update(seq=[256, 512], modes=["fwd", "decode"], warmup_ms=2, rep_ms=10)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    path = folder / "sweep.json"
    result = runner.invoke(app, ["sweep", "--profile", str(folder / "tiny.yaml"), "--format", "json",
                                 "--output", str(path), "--no-roofline"])
    assert result.exit_code == 0, result.output
    return path


def fastest(rows: list[dict], mode: str, seq: int, column: str, higher: bool) -> str:
    candidates = [r for r in rows if r["mode"] == mode and r["seq"] == seq and r["status"] == "ok"]
    best = (max if higher else min)(candidates, key=lambda r: r[column])
    return best["layer"]


def test_report_from_real_sweep_and_capacity(cpu_sweep, tmp_path):
    capacity = write_json(tmp_path / "capacity.json", capacity_rows())
    out = tmp_path / "report"
    result = invoke_report([cpu_sweep, capacity], out)
    assert result.exit_code == 0, result.output
    text = report_text(out)
    linked = links(text)
    on_disk = sorted(p.name for p in out.glob("*.png"))
    # one process's running RSS peak (no --isolate) is not comparable between layers: not plotted
    assert sorted(linked) == on_disk == sorted(set(PLOTS) - {"memory.png"})
    assert "Not plotted: one process's running RSS peaks are not comparable between layers" in text
    for name in linked:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert 5_000 < len(data) < 400_000, (name, len(data))
    rows = json.loads(cpu_sweep.read_text())["rows"]
    for seq in (256, 512):  # the winners the readings name, computed here from the rows
        assert f"at T={seq} {fastest(rows, 'fwd', seq, 'tokens_per_s', True)} is fastest" in text
        assert f"at T={seq} {fastest(rows, 'decode', seq, 'ms_median', False)} is fastest" in text
    assert "Column: mem_rss_peak_bytes" in text  # CPU: RSS, and the report says so
    assert "Relative to the KV cache of mha" in text
    assert str(cpu_sweep) in text and str(capacity) in text  # sources
    assert "Every row has status ok." in text


def test_state_ratios_to_kv_cache_in_table(cpu_sweep, tmp_path):
    out = tmp_path / "r"
    assert invoke_report([cpu_sweep], out).exit_code == 0
    text = report_text(out)
    rows = json.loads(cpu_sweep.read_text())["rows"]
    state = {(r["layer"], r["seq"]): r["state_bytes"] for r in rows}
    expected = [f"{state['ovq', t] / state['mha', t]:.3g}" for t in (256, 512)]
    assert f"| ovq | {expected[0]} | {expected[1]} |" in text


# --- readings on synthetic rows ----------------------------------------------------------------------------------
def test_crossover_length_and_winners(tmp_path):
    out = tmp_path / "r"
    assert invoke_report([write_json(tmp_path / "s.json", crossover_sweep())], out).exit_code == 0
    text = report_text(out)
    assert "at T=256 A is fastest (1k tok/s, 2x better than B, the next)" in text
    assert "at T=2048 B is fastest (800 tok/s, 2x better than A, the next)" in text
    assert "The lead changes at T=1024 (B takes the lead from A)." in text
    assert "Crossover: B beats A from T=1024 on" in text
    # decode: A's ms per step grows with T (1e5/T tok/s), B's stays 1/300 s: B is faster from T=512 on
    assert "decode ms per step: at T=256 A is fastest" in text
    assert "Crossover: B beats A from T=512 on" in text
    # memory: B's constant 64 KiB against A's KV cache of 1 KiB per token
    assert "B 0.25x at T=256 to 0.0312x at T=2048, smaller at every length measured" in text
    # the oom row is left out of the plots and listed
    assert "1 rows are left out of the plots: 1 oom." in text
    assert "| s.json | A | fwd T=4096 B=1 | oom | out of memory |" in text


def test_ovq_saturation_point(tmp_path):
    out = tmp_path / "r"
    assert invoke_report([write_json(tmp_path / "c.json", capacity_rows())], out).exit_code == 0
    text = report_text(out)
    last_ok, drop = first_drop(OVQ_ACCURACY, 0.9)
    assert (last_ok, drop) == (128, 256)
    assert ("ovq (dict_size 64) saturates: accuracy first drops below tau=0.9 at 256 pairs (0.6, 4x its "
            "dict_size); the last pairs with accuracy >= tau was 128 (0.92).") in text
    assert "mha >= 0.9 up to 512 pairs" in text


def test_crossover_is_where_the_lead_holds_not_a_brief_lead():
    series = {"A": {256: 10.0, 512: 10.0, 1024: 10.0, 2048: 10.0},
              "B": {256: 5.0, 512: 12.0, 1024: 8.0, 2048: 12.0}}
    assert overtake_length(series, "A", "B", higher_is_better=True) == 2048
    assert overtake_length(series, "B", "A", higher_is_better=False) == 2048  # lower is better: same lengths
    assert rank_by_length(series, True).changes == [(256, 512, "A", "B"), (512, 1024, "B", "A"),
                                                    (1024, 2048, "A", "B")]


def test_first_drop_is_the_first_not_the_last():
    assert first_drop({16: 0.95, 32: 0.85, 64: 0.95, 128: 0.1}, 0.9) == (16, 32)
    assert first_drop({16: 0.5}, 0.9) == (None, 16)
    assert first_drop({16: 0.95, 32: 0.91}, 0.9) == (32, None)


PARETO = [ParetoPoint("a", 100, 10), ParetoPoint("b", 200, 50), ParetoPoint("c", 300, 40),
          ParetoPoint("d", 50, 5), ParetoPoint("e", 200, 20), ParetoPoint("f", 400, 50)]


def test_pareto_front_matches_a_sweep_by_state():
    # independent: walk by state ascending (capacity descending on ties), keep points beating the best so far
    best, expected = -1.0, []
    for p in sorted(PARETO, key=lambda p: (p.state_bytes, -p.capacity)):
        if p.capacity > best:
            expected.append(p.label)
            best = p.capacity
    assert [p.label for p in pareto_front(PARETO)] == expected == ["d", "a", "b"]


def test_pareto_reading_in_report(tmp_path):
    rows = [dict(capacity_row(p.label, "linear", 2**i, 1.0, int(p.state_bytes)), capacity=p.capacity)
            for p in PARETO for i in range(4, 6)]
    out = tmp_path / "r"
    assert invoke_report([write_json(tmp_path / "c.json", rows)], out).exit_code == 0
    text = report_text(out)
    assert "Pareto front of capacity@tau=0.9 vs state bytes: d (5 pairs in 50 B), a (10 pairs in 100 B) and b " \
           "(50 pairs in 200 B)." in text
    assert "Off the front: c (dominated by b), e (dominated by b) and f (dominated by b)." in text
    assert (tmp_path / "r" / "pareto.png").read_bytes()[:8] == PNG_MAGIC


# --- missing data, formats ---------------------------------------------------------------------------------------
def test_missing_capacity_rows_omit_their_plots(tmp_path):
    out = tmp_path / "r"
    (out).mkdir()
    (out / "recall.png").write_bytes(PNG_MAGIC)  # left over from an earlier report: removed
    assert invoke_report([write_json(tmp_path / "s.json", crossover_sweep())], out).exit_code == 0
    text = report_text(out)
    assert text.count("Omitted: no capacity rows in the inputs.") == 2
    assert not (out / "recall.png").exists() and not (out / "pareto.png").exists()
    assert "recall.png" not in text and "pareto.png" not in text
    assert sorted(p.name for p in out.glob("*.png")) == sorted(links(text))


def test_memory_is_plotted_only_from_isolated_rss_peaks(tmp_path):
    rows = crossover_sweep()
    for isolate, plotted in ((True, True), (False, False)):
        out = tmp_path / f"r{isolate}"
        path = write_json(tmp_path / f"s{isolate}.json", rows, {"device": "cpu", "isolate": isolate})
        assert invoke_report([path], out).exit_code == 0
        text = report_text(out)
        assert (out / "memory.png").exists() is plotted
        assert ("memory.png" in links(text)) is plotted
        assert ("Not plotted" in text) is not plotted
        # the reading is given either way
        assert ("Plotted column: mem_rss_peak_bytes" in text) is plotted
        assert ("Column: mem_rss_peak_bytes" in text) is not plotted


def test_missing_sweep_rows_and_modes_omit_their_plots(tmp_path):
    out = tmp_path / "r"
    assert invoke_report([write_json(tmp_path / "c.json", capacity_rows())], out).exit_code == 0
    text = report_text(out)
    assert text.count("Omitted: no sweep rows in the inputs.") == 4
    assert sorted(links(text)) == ["pareto.png", "recall.png"]
    fwd_only = [r for r in crossover_sweep() if r["mode"] == "fwd"]
    out2 = tmp_path / "r2"
    assert invoke_report([write_json(tmp_path / "s.json", fwd_only)], out2).exit_code == 0
    assert "Omitted: no successful decode rows in the inputs." in report_text(out2)
    assert not (out2 / "decode.png").exists()


def test_csv_and_json_inputs_give_the_same_report(cpu_sweep, tmp_path):
    sweep_rows = json.loads(cpu_sweep.read_text())["rows"] + crossover_sweep()
    cap = capacity_rows()
    json_out, csv_out = tmp_path / "j", tmp_path / "c"
    assert invoke_report([write_json(tmp_path / "s.json", sweep_rows), write_json(tmp_path / "k.json", cap)],
                         json_out).exit_code == 0
    assert invoke_report([write_csv(tmp_path / "s.csv", sweep_rows, COLUMNS),
                          write_csv(tmp_path / "k.csv", cap, CAPACITY_COLUMNS)], csv_out).exit_code == 0
    json_text, csv_text = report_text(json_out), report_text(csv_out)
    assert after_sources(json_text).replace("s.json", "s.csv") == after_sources(csv_text)
    assert "no machine header (CSV)" in csv_text


# --- errors -----------------------------------------------------------------------------------------------------
def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n1,2\n")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    norows = tmp_path / "norows.json"
    norows.write_text(json.dumps({"header": {}, "rows": []}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"rows": [')
    badnum = tmp_path / "badnum.csv"
    write_csv(badnum, [dict(capacity_rows()[0], pairs="many")], CAPACITY_COLUMNS)
    return {"missing": tmp_path / "missing.json", "foreign": foreign, "empty": empty, "norows": norows,
            "broken": broken, "badnum": badnum}


@pytest.mark.parametrize(("case", "fragment"), [
    ("missing", "does not exist"), ("foreign", "neither sweep, capacity nor distributed results"), ("empty", "is empty"),
    ("norows", "holds no result rows"), ("broken", "cannot be parsed"), ("badnum", "column pairs holds 'many'"),
])
def test_bad_input_files_exit_2_naming_the_file(tmp_path, case, fragment):
    good = write_json(tmp_path / "good.json", crossover_sweep())
    path = _bad_inputs(tmp_path)[case]
    result = invoke_report([good, path], tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and fragment in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "report.md").exists()


def test_output_path_that_is_a_file_exits_2(tmp_path):
    good = write_json(tmp_path / "good.json", crossover_sweep())
    target = tmp_path / "report.md"
    target.write_text("not a directory")
    result = invoke_report([good], target)
    assert result.exit_code == 2
    assert f"--output {target} is a file" in result.output and "Traceback" not in result.output


def test_layers_are_ranked_and_compared_within_one_batch(tmp_path):
    rows = crossover_sweep()
    big = [dict(r, batch=64, ms_median=r["ms_median"] * 100, state_bytes=r["state_bytes"] * 64)
           for r in rows if r["mode"] == "decode" and r["seq"] == 1024]
    out = tmp_path / "r"
    assert invoke_report([write_json(tmp_path / "s.json", rows + big)], out).exit_code == 0
    text = report_text(out)
    # B=64 is 100x slower per step: ranked on its own, never against B=1
    assert "decode ms per step (B=64): at T=1024 B B=64 is fastest" in text
    assert "decode ms per step (B=1): at T=256 A B=1 is fastest" in text
    assert "| state / A B=64 KV cache | T=1024 |" in text and "| B B=64 | 0.0625 |" in text


def test_noisy_timings_are_named(tmp_path):
    rows = crossover_sweep()
    rows[0].update(ms_p20=1.0, ms_p80=5.0)  # A fwd T=256
    rows[1].update(ms_p20=1.0, ms_p80=1.5)  # within the spread: not named
    out = tmp_path / "r"
    assert invoke_report([write_json(tmp_path / "s.json", rows)], out).exit_code == 0
    text = report_text(out)
    assert "Noisy timings: 1 successful rows have a spread ms_p80 / ms_p20 above 2" in text
    assert text.rstrip().endswith(": A fwd T=256 (5x).")


def test_pareto_labels_of_coinciding_points_are_merged():
    from ovqprof.report.plots import label_groups

    pts = [ParetoPoint("gla", 32768, 128), ParetoPoint("mamba2", 35840, 128), ParetoPoint("lin", 32768, 128),
           ParetoPoint("swa", 131072, 128), ParetoPoint("retnet", 32768, 32)]
    groups = {text: (a.state_bytes, a.capacity) for a, text in label_groups(pts)}
    assert groups == {"retnet": (32768, 32), "gla, lin, mamba2": (32768, 128), "swa": (131072, 128)}


def test_ovq_saturation_reads_a_default_dict_size_from_the_header(tmp_path):
    # The spec left dict_size at its default: no column, no note, header options {} (issue 18).
    rows = [{**r, "note": None} for r in capacity_rows()]
    header = {"layers": [{"name": "ovq", "type": "ovq", "d_model": 64, "heads": 1, "head_dim": 64,
                          "dtype": "float32", "options": {}}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"header": header, "rows": rows}))
    out = tmp_path / "r"
    assert invoke_report([path], out).exit_code == 0
    assert "ovq (dict_size 1024) saturates: accuracy first drops below tau=0.9 at 256 pairs" in report_text(out)
