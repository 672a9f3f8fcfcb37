"""The associative-memory probe held to theory (the predictions in ovqprof/capacity/probe.py's docstring),
and `ovqprof capacity`.

Small dk keeps it fast: 64 for softmax (at dk 16-32 the chi-square spread of |k|^2, relative std sqrt(2/dk),
already costs softmax a few per cent of top-1 at 8 dk pairs), 32 elsewhere.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ovqprof.capacity import probe as probe_module
from ovqprof.capacity.probe import draw_pairs, run_probe
from ovqprof.capacity.rows import COLUMNS
from ovqprof.capacity.settings import ProbeSettings
from ovqprof.cli import app
from ovqprof.kernels.ovq.reference import centroid_keys, ovq_chunked, read
from ovqprof.layers.ovq import OVQAttention, OVQOptions
from ovqprof.spec import LayerSpec

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _probe(type_: str, pairs, dk: int, heads: int = 2, seeds=(0,), name: str = "x", **options) -> list[dict]:
    spec = LayerSpec(name=name, type=type_, d_model=dk * heads, heads=heads, head_dim=dk, dtype="float32",
                     options=options)
    rows: list[dict] = []
    run_probe([spec], ProbeSettings(pairs=pairs, seeds=seeds), torch.device("cpu"), rows.append)
    assert rows and all(r["status"] == "ok" for r in rows), rows
    return rows


# --- theory ----------------------------------------------------------------------------------------------
def test_softmax_retrieves_almost_perfectly_up_to_8_dk_pairs():
    dk = 64
    rows = _probe("softmax_attention", "64..512", dk)
    assert [r["pairs"] for r in rows] == [64, 128, 256, 512]
    assert all(r["accuracy"] >= 0.99 for r in rows), [r["accuracy"] for r in rows]
    assert rows[0]["capacity"] == 8 * dk


def test_plain_linear_memory_cosine_follows_crosstalk_theory():
    # S = sum v k^T, Gaussian keys: read = |k|^2 v + crosstalk of variance (N-1) dk per value dimension.
    dk = 32
    rows = _probe("linear_attention", "8..512", dk, seeds=(0, 1), feature_map="identity", normalize=False)
    assert [r["pairs"] for r in rows] == [8, 16, 32, 64, 128, 256, 512]  # dk/4 .. 16 dk
    for r in rows:
        expected = 1 / math.sqrt(1 + (r["pairs"] - 1) / dk)
        assert abs(r["cosine"] - expected) <= 0.05, (r["pairs"], r["cosine"], expected)


def test_gap_fillers_count_as_crosstalk_for_the_linear_memory():
    dk, n, gap = 32, 16, 240
    spec = LayerSpec(name="lin", type="linear_attention", d_model=64, heads=2, head_dim=dk, dtype="float32",
                     options={"feature_map": "identity", "normalize": False})
    rows: list[dict] = []
    run_probe([spec], ProbeSettings(pairs=[n], gap=gap, seeds=[0, 1]), torch.device("cpu"), rows.append)
    (row,) = rows
    assert row["gap"] == gap
    assert abs(row["cosine"] - 1 / math.sqrt(1 + (n + gap - 1) / dk)) <= 0.05
    assert row["cosine"] < 1 / math.sqrt(1 + (n - 1) / dk) - 0.2  # clearly worse than without the gap


def test_sliding_window_forgets_pairs_pushed_out_by_the_gap():
    spec = LayerSpec(name="swa", type="softmax_attention", d_model=64, heads=2, head_dim=32, dtype="float32",
                     options={"window": 32})
    rows: list[dict] = []
    for gap in (0, 32):
        run_probe([spec], ProbeSettings(pairs=[16], gap=gap), torch.device("cpu"), rows.append)
    kept, forgotten = rows
    assert kept["accuracy"] == 1.0 and kept["capacity"] == 16
    assert forgotten["accuracy"] < 0.3 and forgotten["capacity"] is None
    assert forgotten["state_bytes"] == 2 * kept["state_bytes"]  # 16 slots, then a full ring of W = 32


def test_elu_linear_attention_capacity_is_at_least_4x_below_softmax():
    dk = 32
    softmax = _probe("softmax_attention", "2..512", dk)[0]["capacity"]
    elu = _probe("linear_attention", "2..512", dk, feature_map="elu+1", normalize=True)[0]["capacity"]
    assert softmax is not None and softmax >= 8 * dk
    assert elu is None or 4 * elu <= softmax, (elu, softmax)


def test_ovq_full_growth_is_exact_up_to_its_dictionary_and_capacity_grows_with_it():
    dk, capacities = 32, []
    for dict_size in (16, 32, 64):
        rows = _probe("ovq", "8..256", dk, dict_size=dict_size, chunk_size=8, growth="full")
        for r in rows:
            if r["pairs"] <= dict_size:
                assert r["accuracy"] == 1.0 and r["cosine"] > 0.99, r
            else:
                assert r["accuracy"] < 0.9, r  # slots now hold running means of several keys
        capacities.append(rows[0]["capacity"])
    assert capacities == [16, 32, 64]


def test_ovq_full_growth_read_equals_softmax_over_the_unit_keys():
    # Every pair owns a slot of count 1 (or sits in the buffer): the read is softmax(beta q.k) V exactly.
    layer = OVQAttention(64, 2, 32, OVQOptions(dict_size=64, chunk_size=8, growth="full"))
    keys, values = draw_pairs(3, 2, 60, 0, 32, 32, "gaussian")  # 7 chunks written, 4 pairs buffered
    got = layer.probe_memory(keys, values, keys)
    unit = F.normalize(keys, dim=-1)
    want = torch.softmax(math.sqrt(32) * unit @ unit.transpose(-1, -2), dim=-1) @ values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    {}, dict(assign="chunk_start", init="spread_topm", normalize_centroids=False),  # the public variant
    dict(count_bias=False), dict(value_update="delta", assign="chunk_start")])
def test_ovq_probe_writes_as_the_prefill_path_does(options):
    layer = OVQAttention(64, 2, 32, OVQOptions(dict_size=24, chunk_size=8, **options))  # saturating growth
    keys, values = draw_pairs(1, 2, 100, 0, 32, 32, "clustered")
    unit = F.normalize(keys, dim=-1)
    beta = torch.full((2,), math.sqrt(32))
    _, state = ovq_chunked(unit, unit, values, beta, layer.config)
    n, j = state.active, state.buf_len

    def per_query(t: torch.Tensor) -> torch.Tensor:  # [1, H, ...] -> [100, H, ...]: one query per batch row
        return t.expand(100, *t.shape[1:])

    # One query per batch row (lq = 1) sees the whole buffer through read()'s causal local part.
    want = read(unit.permute(2, 1, 0, 3), per_query(state.buf_k[:, :, :j]), per_query(state.buf_v[:, :, :j]),
                beta, per_query(centroid_keys(state.keys[:, :, :n], layer.config)),
                per_query(state.values[:, :, :n]), per_query(state.counts[:, :, :n]),
                layer.config.count_bias).permute(2, 1, 0, 3)
    got = layer.probe_memory(keys, values, keys)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert 0 < j < 8 and n < 24


# --- determinism, failures -------------------------------------------------------------------------------
def _metrics(rows: list[dict]) -> list[tuple]:
    return [(r["pairs"], r["accuracy"], r["cosine"], r["rel_error"]) for r in rows]


@pytest.mark.parametrize("keys", ["gaussian", "clustered"])
def test_same_seed_same_results_other_seed_different(keys):
    spec = LayerSpec(name="lin", type="linear_attention", d_model=64, heads=2, head_dim=32, dtype="float32",
                     options={"feature_map": "identity", "normalize": False})

    def run(seed: int) -> list[dict]:
        rows: list[dict] = []
        run_probe([spec], ProbeSettings(pairs="16..64", keys=keys, seeds=[seed]), torch.device("cpu"), rows.append)
        return rows

    first, again, other = run(0), run(0), run(1)
    assert _metrics(first) == _metrics(again)
    assert all(a[2] != b[2] for a, b in zip(_metrics(first), _metrics(other), strict=True))


def test_clustered_keys_crowd_softmax_attention():
    gaussian = _probe("softmax_attention", [256], 32)[0]["accuracy"]
    spec = LayerSpec(name="sm", type="softmax_attention", d_model=64, heads=2, head_dim=32, dtype="float32")
    rows: list[dict] = []
    run_probe([spec], ProbeSettings(pairs=[256], keys="clustered"), torch.device("cpu"), rows.append)
    assert rows[0]["keys"] == "clustered" and rows[0]["accuracy"] < gaussian


def test_oom_is_a_row_and_capacity_uses_the_rows_that_ran(monkeypatch):
    real = probe_module.probe_once

    def fake(layer, keys, values, n, block_elements):
        if n == 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(layer, keys, values, n, block_elements)

    monkeypatch.setattr(probe_module, "probe_once", fake)
    spec = LayerSpec(name="sm", type="softmax_attention", d_model=64, heads=2, head_dim=32, dtype="float32")
    rows: list[dict] = []
    run_probe([spec], ProbeSettings(pairs="16..64"), torch.device("cpu"), rows.append)
    assert [r["status"] for r in rows] == ["ok", "ok", "oom"]
    assert rows[2]["accuracy"] is None and "out of memory" in rows[2]["note"]
    assert all(r["capacity"] == 32 for r in rows)


def test_query_blocks_do_not_change_the_result():
    spec = LayerSpec(name="sm", type="softmax_attention", d_model=64, heads=2, head_dim=32, dtype="float32")
    rows: list[dict] = []
    for block in (1 << 24, 300):  # 300 elements: blocks of 2 queries over 64 pairs x 2 heads
        run_probe([spec], ProbeSettings(pairs=[64], block_elements=block), torch.device("cpu"), rows.append)
    assert rows[0]["accuracy"] == rows[1]["accuracy"]
    assert rows[0]["cosine"] == pytest.approx(rows[1]["cosine"], rel=1e-6)


# --- CLI ----------------------------------------------------------------------------------------------------
QUICK = str(ROOT / "profiles" / "capacity-quick.yaml")


def test_cli_csv_rows_with_pairs_range_and_columns_in_order():
    result = runner.invoke(app, ["capacity", "--profile", QUICK, "--pairs", "16..64", "--seeds", "0",
                                 "--layers", "softmax,linear_identity", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == list(COLUMNS)
    assert [(r["layer"], r["pairs"]) for r in rows] == [
        ("softmax", "16"), ("softmax", "32"), ("softmax", "64"),
        ("linear_identity", "16"), ("linear_identity", "32"), ("linear_identity", "64")]
    assert {r["method"] for r in rows} == {"probe"} and {r["status"] for r in rows} == {"ok"}
    assert {r["capacity"] for r in rows if r["layer"] == "softmax"} == {"64"}
    assert all(r["seeds"] == "0" and r["dk"] == "64" and r["tau"] == "0.9" and r["lr"] == "" for r in rows)


def test_cli_json_file_has_machine_header_and_skips_layers_without_a_probe(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    spec = tmp_path / "mixed.yaml"
    spec.write_text("defaults: {d_model: 32, heads: 1, head_dim: 32}\n"
                    "layers:\n  - {name: tiny, type: 'custom_layers:TinyMixer'}\n"
                    "  - {name: lin, type: linear_attention, feature_map: identity, normalize: false}\n"
                    "capacity:\n  probe: {pairs: [8, 16], keys: clustered, gap: 4, seeds: [0, 1], dims: 16}\n")
    out = tmp_path / "cap.json"
    result = runner.invoke(app, ["capacity", "-p", str(spec), "-f", "json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    for key in ("device", "torch", "python", "git_revision", "date", "profile"):
        assert key in doc["header"]
    assert doc["header"]["settings"]["keys"] == "clustered"
    skipped, *probed = doc["rows"]
    assert skipped["layer"] == "tiny" and skipped["status"] == "skipped"
    assert "no associative-memory probe" in skipped["note"] and skipped["pairs"] is None
    assert [(r["pairs"], r["dk"], r["gap"], r["keys"], r["seeds"]) for r in probed] == [
        (8, 16, 4, "clustered", "0,1"), (16, 16, 4, "clustered", "0,1")]
    assert all(list(r) == list(COLUMNS) for r in doc["rows"])
    assert "1 skipped" in result.stderr


@pytest.mark.parametrize(("args", "fragments"), [
    (["--pairs", "4k..1k"], ["--pairs", "start 4096 is greater than end 1024", "Allowed"]),
    (["--pairs", "abc"], ["--pairs", "not a size"]),
    (["--keys", "uniform"], ["--keys", "gaussian, clustered"]),
    (["--seeds", "a,b"], ["--seeds", "comma list of integers"]),
    (["--gap", "-1"], ["--gap", ">= 0"]),
    (["--dims", "0"], ["--dims", ">= 1"]),
    (["--method", "train"], ["--method", "probe, mqar"]),
    (["--format", "xml"], ["--format", "table, csv, json, md"]),
    (["--layers", "nope"], ["--layers", "softmax"]),
    (["--method", "mqar", "--keys", "clustered"], ["--keys", "--method probe only"]),
])
def test_cli_bad_flags_exit_2_with_one_paragraph(args, fragments):
    result = runner.invoke(app, ["capacity", "--profile", QUICK, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_cli_bad_probe_field_in_yaml_names_file_line_and_field(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("defaults: {d_model: 32, heads: 1, head_dim: 32}\nlayers:\n  - {name: a, type: ovq}\n"
                    "capacity:\n  probe:\n    pairs: 16..64\n    tau: 1.5\n")
    result = runner.invoke(app, ["capacity", "--profile", str(spec)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{spec}, line 7, field capacity.probe.tau" in result.stderr
    assert "Allowed: a number in (0, 1]" in result.stderr


def test_cli_interrupt_keeps_finished_rows(tmp_path, monkeypatch):
    real = probe_module.probe_once

    def interrupted(layer, keys, values, n, block_elements):
        if n == 32:
            raise KeyboardInterrupt
        return real(layer, keys, values, n, block_elements)

    monkeypatch.setattr(probe_module, "probe_once", interrupted)
    out = tmp_path / "cap.csv"
    result = runner.invoke(app, ["capacity", "-p", QUICK, "--layers", "softmax", "--pairs", "16..64",
                                 "-f", "csv", "-o", str(out)])
    assert result.exit_code == 130, result.output
    (row,) = list(csv.DictReader(io.StringIO(out.read_text())))
    assert row["pairs"] == "16" and row["status"] == "ok" and row["capacity"] == ""
    assert "interrupted" in row["note"] and "1 rows finished and kept" in result.stderr


def test_cli_bad_mqar_field_in_yaml_names_file_line_and_field(tmp_path):
    pytest.importorskip("ovqprof.capacity.mqar", reason="the MQAR trainer is not in this checkout")
    spec = tmp_path / "bad.yaml"
    spec.write_text("defaults: {d_model: 32, heads: 1, head_dim: 32}\nlayers:\n  - {name: a, type: ovq}\n"
                    "capacity:\n  mqar:\n    vocab_size: 128\n    stepz: 3\n")
    result = runner.invoke(app, ["capacity", "--profile", str(spec), "--method", "mqar"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{spec}, line 7, field capacity.mqar.stepz: unknown key 'stepz'" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default; a GPU selects capacity.yaml")
def test_cli_without_profile_uses_capacity_quick_on_cpu():
    result = runner.invoke(app, ["capacity", "--layers", "softmax", "--pairs", "16", "-f", "csv"])
    assert result.exit_code == 0, result.output
    assert "using capacity-quick.yaml (no GPU is visible)" in result.stderr
    assert [r["layer"] for r in csv.DictReader(io.StringIO(result.stdout))] == ["softmax"]
