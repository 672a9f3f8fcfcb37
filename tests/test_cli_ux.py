"""What a new user meets (issue 21): -h and --version, help without importing torch, one error style for usage
mistakes through the console script, and `ovqprof capacity --resume` after an interrupt."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from importlib.metadata import version

import pytest
from typer.testing import CliRunner

import ovqprof.capacity.probe as probe_module
from ovqprof import cli
from ovqprof.cli import app
from ovqprof.errors import UsageError
from ovqprof.output import RowWriter
from ovqprof.rows import empty_row

runner = CliRunner()


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console script's entry point with `args`; (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ovqprof", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_short_help_and_version(monkeypatch, capsys):
    assert runner.invoke(app, ["-h"]).exit_code == 0
    result = runner.invoke(app, ["sweep", "-h"])
    assert result.exit_code == 0 and "--seq" in result.stdout
    code, out, _ = _main(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"ovqprof {version('ovqprof')}"


def test_help_has_no_doubled_percent_signs():
    result = runner.invoke(app, ["sweep", "--help"], env={"COLUMNS": "200"})
    assert "%%" not in result.stdout and "% of roofline" in result.stdout


def test_the_cli_parses_without_importing_torch():
    code = "import sys, ovqprof.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(("args", "fragment"), [
    (("sweep", "--bogus"), "No such option: --bogus"),
    (("report", "-o", "x"), "Missing argument 'RESULT...'"),
    (("nosuchcommand",), "No such command"),
])
def test_usage_mistakes_are_one_paragraph_with_exit_2(monkeypatch, capsys, args, fragment):
    code, out, err = _main(monkeypatch, capsys, *args)
    assert code == 2 and fragment in err and err.startswith("error:")
    assert "╭" not in err and "{" not in err and "Traceback" not in err


def test_console_script_keeps_command_exit_codes(monkeypatch, capsys):
    code, _, err = _main(monkeypatch, capsys, "sweep", "--profile", "nope")
    assert code == 2 and "no spec file or profile named 'nope'" in err
    code, out, _ = _main(monkeypatch, capsys)
    assert code == 0 and "Usage" in out


# --- capacity --resume -----------------------------------------------------------------------------------
def _layers_in(path) -> list[str]:
    with open(path, newline="") as f:
        return [r["layer"] for r in csv.DictReader(f)]


def test_capacity_resume_after_an_interrupt_keeps_rows_and_finishes_the_rest(tmp_path, monkeypatch):
    out = tmp_path / "cap.csv"
    args = ["capacity", "--profile", "capacity-quick", "--layers", "softmax,ovq_full_64,linear_identity",
            "--pairs", "16,32", "--seeds", "0"]
    real = probe_module.probe_layer

    def interrupt_at_the_second(spec, *a, **k):
        if spec.name == "ovq_full_64":
            raise KeyboardInterrupt
        return real(spec, *a, **k)

    monkeypatch.setattr(probe_module, "probe_layer", interrupt_at_the_second)
    result = runner.invoke(app, [*args, "-f", "csv", "-o", str(out)])
    assert result.exit_code == 130, result.output
    assert "Resume with: ovqprof" in result.output and "--resume" in result.output
    assert _layers_in(out) == ["softmax"] * 2 + ["linear_identity"] * 2  # spec order: ovq_full_64 comes last
    monkeypatch.setattr(probe_module, "probe_layer", real)
    result = runner.invoke(app, [*args, "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert _layers_in(out) == ["softmax"] * 2 + ["linear_identity"] * 2 + ["ovq_full_64"] * 2


def test_capacity_resume_drops_a_layer_cut_short_and_probes_it_again(tmp_path, monkeypatch):
    out = tmp_path / "cap.json"
    args = ["capacity", "--profile", "capacity-quick", "--layers", "softmax,ovq_full_64", "--pairs", "16,32,64",
            "--seeds", "0"]
    real_row = probe_module._probe_row
    calls = {"n": 0}

    def interrupt_mid_layer(layer, n, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # the second pairs value of the second layer
            raise KeyboardInterrupt
        return real_row(layer, n, *a, **k)

    monkeypatch.setattr(probe_module, "_probe_row", interrupt_mid_layer)
    assert runner.invoke(app, [*args, "-f", "json", "-o", str(out)]).exit_code == 130
    monkeypatch.setattr(probe_module, "_probe_row", real_row)
    result = runner.invoke(app, [*args, "--resume", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layer"], r["pairs"]) for r in rows] == [("softmax", 16), ("softmax", 32), ("softmax", 64),
                                                       ("ovq_full_64", 16), ("ovq_full_64", 32),
                                                       ("ovq_full_64", 64)]
    assert all(r["capacity"] is not None for r in rows)


def test_capacity_resume_refuses_a_file_of_the_other_method(tmp_path):
    out = tmp_path / "cap.csv"
    args = ["capacity", "--profile", "capacity-quick", "--layers", "softmax", "--pairs", "16", "--seeds", "0"]
    assert runner.invoke(app, [*args, "-f", "csv", "-o", str(out)]).exit_code == 0
    result = runner.invoke(app, [*args[:5], "--method", "mqar", "--resume", str(out)])
    assert result.exit_code == 2 and "holds probe rows, not mqar" in result.output


# --- import paths relative to the spec ---------------------------------------------------------------------
MIXER = '''
import torch
from torch import nn


class MyMixer(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
'''


def _spec_beside(folder, module: str = "mypkg_issue21") -> str:
    pkg = folder / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mixers.py").write_text(MIXER)
    spec = folder / "spec.yaml"
    spec.write_text(f"name: mine\ndefaults: {{d_model: 16, heads: 2, head_dim: 8, dtype: float32, device: cpu}}\n"
                    f"layers:\n  - name: mine\n    type: {module}.mixers:MyMixer\n"
                    "sweep: {seq: [32], modes: [fwd], batch: [1], warmup_ms: 1, rep_ms: 1}\n")
    return str(spec)


def test_a_custom_layer_beside_the_spec_imports_from_any_working_directory(tmp_path, monkeypatch):
    spec = _spec_beside(tmp_path / "project", "mypkg_beside")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # as for the console script: the working directory is not on sys.path (python -m would put "" there)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    result = runner.invoke(app, ["sweep", "--profile", spec, "--no-roofline", "-f", "csv"])
    assert result.exit_code == 0, result.output
    assert "mine" in result.stdout and ",ok," in result.stdout


def test_a_custom_layer_in_the_working_directory_imports_too(tmp_path, monkeypatch):
    spec = _spec_beside(tmp_path / "cwd", "mypkg_cwd")
    moved = tmp_path / "specs"
    moved.mkdir()
    target = moved / "spec.yaml"
    target.write_text(open(spec).read())
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    result = runner.invoke(app, ["sweep", "--profile", str(target), "--no-roofline", "-f", "csv"])
    assert result.exit_code == 0, result.output


def test_a_missing_module_names_both_places_tried(tmp_path, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\ndefaults: {d_model: 16, heads: 2, head_dim: 8, dtype: float32, device: cpu}\n"
                    "layers:\n  - name: x\n    type: nowhere_pkg_21.mixers:MyMixer\nsweep: {seq: [32]}\n")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["sweep", "--profile", str(spec)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "cannot import module 'nowhere_pkg_21.mixers'" in text and str(tmp_path) in text
    assert "beside the spec file, in the working directory or on PYTHONPATH" in text


# --- tables that fit ---------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _rows(n: int = 3) -> list[dict]:
    rows = []
    for i in range(n):
        row = empty_row(layer=f"ovq_public_{i}", device="cpu", dtype="float32", mode="decode", seq=16384 * 4,
                        batch=1, status="ok")
        row.update(impl="torch-chunked", ms_median=0.16412345, ms_p20=0.162, ms_p80=0.174, tokens_per_s=6090.0,
                   tflops=0.00447, gbps=8.97, pct_roofline=20.5, mem_rss_peak_bytes=455 * 2**20,
                   state_bytes=642 * 2**10, note="a note long enough to need wrapping " * 3)
        rows.append(row)
    return rows


def _table(width: int, monkeypatch, columns=None) -> str:
    monkeypatch.setenv("COLUMNS", str(width))
    out = _Terminal()
    with RowWriter("table", None, {"device": "cpu"}, stdout=out, columns=columns) as writer:
        for row in _rows():
            writer.write(row)
    return re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())  # the terminal's colour codes take no columns


@pytest.mark.parametrize("width", [80, 120, 160])
def test_terminal_tables_fit_and_never_split_a_number(width, monkeypatch):
    text = _table(width, monkeypatch)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "65536" in text and "0.164" in text  # whole numbers, not "6553" over "6"
    if width < 160:
        assert "hidden to fit" in text and "p20" in text.split("hidden to fit")[1]


def test_wide_terminals_show_every_column_and_wrap_only_the_note(monkeypatch):
    text = _table(250, monkeypatch)
    assert "hidden to fit" not in text and "TFLOP/s" in text and "%roof" in text
    note_lines = [line for line in text.splitlines() if "wrapping" in line]
    assert len(note_lines) >= 3  # the whole note, wrapped, for each row


def test_columns_option_chooses_the_table(monkeypatch):
    text = _table(100, monkeypatch, columns=["layer", "mode", "seq", "ms"])
    header = [line for line in text.splitlines() if "layer" in line and "mode" in line][0]
    assert "p20" not in header and "note" not in header and "hidden to fit" not in text
    with pytest.raises(UsageError, match="unknown column"):
        RowWriter("table", None, {}, columns=["layer", "nope"])
    result = runner.invoke(app, ["sweep", "--profile", "quick", "--columns", "layer,bogus"])
    assert result.exit_code == 2 and "Allowed: a comma list of layer, impl" in result.output


def test_piped_tables_keep_every_column_and_the_whole_note(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = io.StringIO()
    with RowWriter("table", None, {"device": "cpu"}, stdout=out) as writer:
        for row in _rows(1):
            writer.write(row)
    text = out.getvalue()
    assert "TFLOP/s" in text and ("a note long enough to need wrapping " * 3).strip() in text


# --- progress -----------------------------------------------------------------------------------------------
def test_sweep_prints_the_header_once_then_one_line_per_cell_when_stderr_is_not_a_terminal():
    result = runner.invoke(app, ["sweep", "--profile", "quick", "--layers", "mha,linear", "--seq", "128,256",
                                 "--modes", "fwd", "--no-roofline", "-f", "json"])
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert err.count("- device:") == 1 and err.index("- device:") < err.index("[1/4]")
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] + "]" for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert "mha fwd T=128 B=1: ok" in lines[0] and " ms; elapsed" in lines[0] and "ETA" in lines[0]
    assert "ETA" not in lines[-1]
    json.loads(result.stdout)  # progress never reaches stdout


def test_quiet_silences_header_and_progress():
    result = runner.invoke(app, ["sweep", "--profile", "quick", "--layers", "mha", "--seq", "128", "--modes",
                                 "fwd", "--no-roofline", "-f", "csv", "--quiet"])
    assert result.exit_code == 0 and "[1/1]" not in result.stderr and "- device:" not in result.stderr
    result = runner.invoke(app, ["capacity", "--profile", "capacity-quick", "--layers", "softmax", "--pairs", "16",
                                 "--seeds", "0", "-q"])
    assert result.exit_code == 0 and "[1/1]" not in result.stderr


def test_capacity_probe_lines_carry_accuracy():
    result = runner.invoke(app, ["capacity", "--profile", "capacity-quick", "--layers", "softmax", "--pairs",
                                 "16,32", "--seeds", "0", "-f", "csv"])
    assert result.exit_code == 0, result.output
    assert "[1/2] probe softmax pairs=16: ok acc 1.000" in result.stderr and "- device:" in result.stderr


def test_mqar_progress_lines_report_loss_and_accuracy(capsys, monkeypatch):
    from ovqprof.capacity.mqar import _Bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with _Bar(True) as bar:
        step = bar.run("mqar softmax seq=256 pairs=16 lr=0.01", 8)
        for i in range(8):
            step(i, 2.0 - i * 0.1, i / 8)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and err[-1].startswith("mqar softmax seq=256 pairs=16 lr=0.01: step 8/8 loss 1.300 acc 0.88")


def test_eta_comes_from_the_budget_before_the_first_cell_and_from_finished_cells_after():
    from ovqprof.progress import CellProgress

    p = CellProgress(4, stream=io.StringIO(), budget_s=0.5)
    assert p.eta_s() == pytest.approx(2.0)
    p.t0 -= 3.0  # three seconds for the first cell
    p.done("a")
    assert p.eta_s() == pytest.approx(9.0, rel=0.05)


# --- % of roofline ------------------------------------------------------------------------------------------
def _rates_with(pct_of_peak: float, spread: float) -> tuple[dict, list[str]]:
    from ovqprof.cell import _rates
    from ovqprof.layers.base import Cost
    from ovqprof.measure.peaks import Peaks
    from ovqprof.measure.timing import Timing

    peaks = Peaks("float32", matmul_flops_per_s=1e11, copy_bytes_per_s=1e10, matmul_size=1536, copy_bytes=1,
                  matmul_spread=spread, copy_spread=spread, rounds=3)
    # 1e9 FLOP (compute-bound): at the peak it takes 10 ms
    row: dict = {}
    notes = _rates(row, Cost(1e9, 1e3), Timing(10.0 * 100 / pct_of_peak, 1, 1, "wall"), 1, peaks)
    return row, notes


def test_percent_of_roofline_within_the_peaks_spread_is_kept():
    row, notes = _rates_with(105.0, 0.10)
    assert row["pct_roofline"] == pytest.approx(105.0) and not notes


def test_percent_of_roofline_beyond_the_peaks_spread_is_clipped_and_said():
    row, notes = _rates_with(147.0, 0.05)
    assert row["pct_roofline"] == 100.0
    assert notes == ["% of roofline measured 147 (peak spread 5%): clipped to 100"]


def test_peaks_are_a_median_of_rounds_with_their_spread_in_the_header():
    import torch

    from ovqprof.measure.peaks import measure_peaks
    from ovqprof.output import run_header_lines

    p = measure_peaks(torch.device("cpu"), torch.float32, rounds=3)
    assert p.rounds == 3 and 0 <= p.matmul_spread < 5 and p.matmul_flops_per_s > 0
    lines = run_header_lines({"device": "cpu", "peaks": {"float32": p.as_dict()}})
    assert any(line.startswith("- peaks (float32, median of 3 rounds") for line in lines)


# --- plots ----------------------------------------------------------------------------------------------------
def test_plot_styles_are_unique_per_series_coloured_by_family_and_highlight_ovq():
    from ovqprof.report.plots import Palette, style

    families = {"mha": "softmax", "gqa": "softmax", "mqa": "softmax", "swa": "softmax", "ovq": "ovq",
                "ovq_public": "ovq", "ovq_full": "ovq", "linear": "linear", "gla": "gla", "mla": "mla",
                "ccgqa": "cca", "cca": "cca", "mamba2": "mamba2", "delta_net": "delta_net",
                "gated_delta_net": "gated_delta_net", "retnet": "retnet", "transformer_vq": "transformer_vq",
                "mka": "mka", "fast_mka": "mka", "bov": "bank_of_values"}
    order = Palette(sorted(families), families)
    styles = {label: style(label, order) for label in order}
    keys = {(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}
    assert len(keys) == len(styles)  # no two series look alike (issue: mha and ccgqa were both green)
    assert styles["mha"]["color"] == styles["gqa"]["color"] != styles["ccgqa"]["color"]
    assert all(styles[o]["linewidth"] > styles["mha"]["linewidth"] for o in ("ovq", "ovq_public", "ovq_full"))


def test_plot_panels_hold_at_most_eight_series_whole_families_and_ovq_in_each():
    from ovqprof.report.plots import MAX_SERIES_PER_PANEL, Palette, split_by_family

    families = {"ovq": "ovq", "ovq_public": "ovq", "mha": "softmax", "gqa": "softmax", "mqa": "softmax",
                "swa": "softmax", "linear": "linear", "gla": "gla", "ccgqa": "cca", "cca": "cca",
                "mamba2": "mamba2", "delta_net": "delta_net", "retnet": "retnet", "mka": "mka", "fast_mka": "mka"}
    order = Palette(list(families), families)
    series = {label: {256: float(i + 1), 512: float(i + 2)} for i, label in enumerate(families)}
    parts = split_by_family(series, order)
    assert len(parts) > 1 and all(len(part) <= MAX_SERIES_PER_PANEL for part in parts)
    assert all({"ovq", "ovq_public"} <= set(part) for part in parts)  # the reference in every panel
    assert set().union(*parts) == set(series)  # no series dropped
    others = [label for part in parts for label in part if families[label] != "ovq"]
    assert sorted(others) == sorted(set(others))  # and none drawn twice
    for family in ("softmax", "cca", "mka"):  # a family that fits stays in one panel
        assert sum(any(families[label] == family for label in part) for part in parts) == 1
    few = dict(list(series.items())[:5])
    assert split_by_family(few, order) == [few]


def test_coinciding_lines_are_named():
    from ovqprof.report.plots import coinciding

    series = {"a": {256: 1.0, 512: 2.0}, "b": {256: 1.0, 512: 2.001}, "c": {256: 1.0, 512: 3.0},
              "d": {256: 1.0}, "e": {256: 1.0, 512: 3.0}}
    assert coinciding(series) == [["a", "b"], ["c", "e"]]
    assert coinciding({"a": {1: 1.0}, "b": {1: 1.5}}) == []
