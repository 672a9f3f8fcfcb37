"""Distributed decode (issue 19): every strategy exact against single-device SDPA in float64 at R = 1..4 over
gloo (GQA and MQA included, T not divisible by R), counted bytes equal to the formula, a rank that dies or
hangs costing one row while the run goes on, resume, spec and CLI errors, and the report's plots."""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp
from typer.testing import CliRunner

from ovqprof.cli import app
from ovqprof.distributed.command import DistributedRequest, run_distributed
from ovqprof.distributed.cost import bytes_sent, kv_shard_bytes
from ovqprof.distributed.partial import empty_partial, finish, local_partial, merge, reference_attention
from ovqprof.distributed.shards import random_shard, shard_lengths, shard_starts
from ovqprof.errors import SpecError
from ovqprof.spec import load_spec_text

SPEC = """
name: dist-test
defaults: {batch: 1, d_model: 32, heads: 4, head_dim: 8, dtype: float32, device: cpu}
layers:
  - {name: gqa, type: softmax_attention, kv_heads: 2}
  - {name: swa, type: softmax_attention, window: 8}
  - {name: ovq, type: ovq, dict_size: 16, chunk_size: 8}
distributed:
  layer: gqa
  world_sizes: [2]
  strategies: [tree, ring, allgather]
  seq: [45]
  warmup_ms: 1
  rep_ms: 5
  min_reps: 2
  max_reps: 5
  check_seq: 13
"""


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    err = float((a - b).norm() / b.norm())
    assert err == err, "NaN"  # noqa: PLR0124 - NaN never equals itself
    return err


# --- pure math, one process ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("total", "world"), [(10, 3), (7, 4), (2, 4), (0, 2), (16, 4), (1, 1)])
def test_shards_cover_every_key_once_and_differ_by_at_most_one(total, world):
    n = shard_lengths(total, world)
    assert sum(n) == total and len(n) == world and max(n) - min(n) <= 1
    assert n == sorted(n, reverse=True)  # the first T % R ranks hold one more
    starts = shard_starts(total, world)
    assert [s + k for s, k in zip(starts, n, strict=True)][:-1] == starts[1:]


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_partials_merged_in_any_grouping_equal_sdpa(heads, kv_heads):
    q = torch.randn(2, heads, 5, dtype=torch.float64)
    kv = torch.randn(2, 2, kv_heads, 23, 5, dtype=torch.float64) * 3  # large logits: rescaling matters
    ref = reference_attention(q, kv)
    parts = [local_partial(q, kv[:, :, :, a:b]) for a, b in ((0, 7), (7, 7), (7, 20), (20, 23))]
    left = empty_partial(q)
    for p in parts:
        left = merge(left, p)
    right = merge(merge(parts[0], parts[1]), merge(parts[2], parts[3]))
    assert rel_error(finish(left), ref) <= 1e-12
    assert rel_error(finish(right), ref) <= 1e-12
    assert not torch.isnan(finish(merge(empty_partial(q), parts[0]))).any()


def test_kv_shard_bytes_formula_matches_the_real_shard():
    for rank, n in enumerate(shard_lengths(46, 4)):
        shard = random_shard(0, rank, 2, 3, n, 8, torch.float32)
        assert shard.nbytes == kv_shard_bytes(rank, 4, 46, 2, 3, 8, 4)


# --- gloo groups at R = 1..4 --------------------------------------------------------------------------------
CASES = [dict(strategy=s, keys=keys, batch=b, heads=h, kv_heads=g, head_dim=dh, seed=i)
         for i, (s, keys, b, h, g, dh) in enumerate(
             [(s, keys, b, h, g, dh) for s in ("tree", "ring", "allgather")
              for keys, b, h, g, dh in ((47, 2, 4, 2, 8), (30, 1, 6, 1, 12), (3, 1, 4, 4, 8))])]


def _run_group(world_size: int, cases: list[dict]) -> dict:
    ctx = tmp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        init = "file://" + os.path.join(folder, "rendezvous")
        from distributed_helpers import strategy_rank

        procs = [ctx.Process(target=strategy_rank, args=(r, world_size, init, cases, queue)) for r in range(world_size)]
        for p in procs:
            p.start()
        results = {}
        for _ in range(world_size * len(cases)):
            rank, i, o, sent, calls = queue.get(timeout=120)
            results[(rank, i)] = (torch.from_numpy(o), sent, calls)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_strategy_equals_single_device_sdpa_and_counts_the_formula_bytes(world_size):
    results = _run_group(world_size, CASES)
    for i, c in enumerate(CASES):
        lengths = shard_lengths(c["keys"], world_size)
        full = torch.cat([random_shard(c["seed"], r, c["batch"], c["kv_heads"], n, c["head_dim"], torch.float64)
                          for r, n in enumerate(lengths)], dim=3)
        q = torch.randn(c["batch"], c["heads"], c["head_dim"], dtype=torch.float64,
                        generator=torch.Generator().manual_seed(c["seed"] + 7))
        ref = reference_attention(q, full)
        for rank in range(world_size):
            o, sent, calls = results[(rank, i)]
            assert rel_error(o, ref) <= 1e-12, (c, rank)
            expected = bytes_sent(c["strategy"], rank, world_size, c["keys"], c["batch"], c["heads"], c["kv_heads"],
                                  c["head_dim"], 8)
            assert sent == pytest.approx(expected, rel=1e-12, abs=0), (c, rank)
            assert calls == (0 if world_size == 1 else {"tree": 2, "ring": world_size - 1, "allgather": 1}[c["strategy"]])
    if world_size > 1:  # tree's bytes do not grow with T; ring's and allgather's do
        tree = [results[(0, i)][1] for i, c in enumerate(CASES) if c["strategy"] == "tree"]
        ring = [results[(0, i)][1] for i, c in enumerate(CASES) if c["strategy"] == "ring"]
        assert tree[0] < ring[0]


# --- the command: failures as rows, resume ----------------------------------------------------------------
def _spec(tmp_path: Path, text: str = SPEC):
    path = tmp_path / "dist.yaml"
    path.write_text(text)
    from ovqprof.spec import load_spec

    return load_spec(path)


@pytest.mark.slow
def test_a_rank_that_dies_or_hangs_costs_one_row_and_the_run_goes_on(tmp_path):
    spec = _spec(tmp_path, SPEC.replace("  - {name: ovq, type: ovq, dict_size: 16, chunk_size: 8}\n", ""))
    out = tmp_path / "rows.csv"
    request = DistributedRequest(format="csv", output=out, cell_timeout_s=8, collective_timeout_s=60,
                                 faults={(2, "tree", 45): (1, "exit"), (2, "ring", 45): (0, "hang")})
    rows: list[dict] = []
    times = []
    start = time.monotonic()
    run_distributed(spec, {"device": "cpu"}, request, rows, log=lambda _: None)
    times.append(time.monotonic() - start)
    by = {r["strategy"]: r for r in rows}
    assert by["tree"]["status"] == "error" and "rank 1 died" in by["tree"]["note"] and "SIGKILL" in by["tree"]["note"]
    assert by["ring"]["status"] == "timeout" and "rank(s) 0" in by["ring"]["note"]
    assert by["allgather"]["status"] == "ok" and by["allgather"]["check"].startswith("ok")
    assert times[0] < 8 + 40  # the hang cost its timeout, the death no wait at all, then a fresh group
    written = list(csv.DictReader(out.open()))
    assert [r["status"] for r in written] == ["error", "timeout", "ok"]


@pytest.mark.slow
def test_cli_writes_rows_with_ovq_and_resume_runs_only_the_missing_cells(tmp_path):
    spec_path = tmp_path / "dist.yaml"
    spec_path.write_text(SPEC.replace("world_sizes: [2]", "world_sizes: [1, 2]"))
    out = tmp_path / "rows.csv"
    runner = CliRunner()
    args = ["distributed", "--profile", str(spec_path), "--strategy", "tree,ring", "--seq", "45", "-q"]
    result = runner.invoke(app, [*args, "--world-size", "2", "--output", str(out), "--format", "csv"])
    assert result.exit_code == 0, result.output
    first = list(csv.DictReader(out.open()))
    assert [(r["world_size"], r["strategy"]) for r in first] == [("2", "tree"), ("2", "ring")]
    for r in first:
        assert r["status"] == "ok" and float(r["ovq_ms"]) > 0 and int(r["ovq_state_bytes"]) > 0
        assert float(r["bytes_sent"]) == float(r["bytes_sent_formula"]) > 0
        assert len(r["ms_ranks"].split(",")) == 2 and int(r["kv_shard_bytes"]) == 2 * 2 * 23 * 8 * 4
    # tree sends 2 (R-1)/R B H (dh + 2) float32 elements, ring everything but the next rank's block
    assert float(first[0]["bytes_sent"]) == 2 * 1 / 2 * 4 * (8 + 2) * 4
    assert float(first[1]["bytes_sent"]) == 2 * 2 * 8 * 4 * 23
    result = runner.invoke(app, [*args, "--world-size", "1,2", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 rows already there, 2 cells to run" in result.output
    rows = list(csv.DictReader(out.open()))
    assert rows[:2] == first
    assert [(r["world_size"], r["strategy"]) for r in rows[2:]] == [("1", "tree"), ("1", "ring")]
    assert all(float(r["bytes_sent"]) == 0 for r in rows[2:])


# --- spec and flags -----------------------------------------------------------------------------------------
def test_spec_distributed_layer_must_be_a_softmax_layer_without_window():
    with pytest.raises(SpecError) as err:
        load_spec_text(SPEC.replace("layer: gqa", "layer: swa"), "d.yaml")
    assert err.value.field == "distributed.layer" and "gqa" in str(err.value) and err.value.line == 9  # the line of `layer:` under `distributed:`
    with pytest.raises(SpecError) as err:
        load_spec_text(SPEC.replace("strategies: [tree, ring, allgather]", "strategies: [tree, star]"), "d.yaml")
    assert err.value.field.startswith("distributed.strategies")
    with pytest.raises(SpecError) as err:
        load_spec_text(SPEC.replace("  seq: [45]", "  seq: [45]\n  color: red"), "d.yaml")
    assert "unknown key 'color'" in str(err.value)
    assert load_spec_text(SPEC).distributed.world_sizes == (2,)


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--strategy", "tree,star"], "--strategy 'tree,star' is not valid"),
    (["--world-size", "0,2"], "--world-size '0,2' is not valid"),
    (["--backend", "mpi"], "--backend 'mpi' is not known"),
    (["--seq", "1k..x"], "--seq"),
])
def test_bad_flags_are_one_paragraph_usage_errors(tmp_path, flags, fragment):
    spec_path = tmp_path / "dist.yaml"
    spec_path.write_text(SPEC)
    result = CliRunner().invoke(app, ["distributed", "--profile", str(spec_path), *flags])
    assert result.exit_code == 2
    assert fragment in result.output and "Traceback" not in result.output


# --- report -------------------------------------------------------------------------------------------------
def test_report_plots_latency_and_bytes_per_strategy_and_reads_tree_against_ring(tmp_path):
    from ovqprof.distributed.rows import COLUMNS, empty_row
    from ovqprof.report import write_report

    rows = []
    for seq in (1024, 4096):
        for strategy, ms, sent in (("tree", 2.0, 1056.0), ("ring", 1.0 * seq / 256, 2.0 * seq * 1024)):
            rows.append(empty_row(layer="mha", world_size=2, strategy=strategy, seq=seq, batch=1, status="ok",
                                  ms_median=ms, bytes_sent=sent, ovq_ms=0.2, mem_peak_bytes=1000))
    rows.append(empty_row(layer="mha", world_size=2, strategy="allgather", seq=4096, batch=1, status="timeout",
                          note="rank(s) 0 did not finish"))
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    text = write_report([path], tmp_path / "rep", generated="now").read_text()
    assert (tmp_path / "rep" / "distributed-latency.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "distributed-bytes.png").stat().st_size > 1000
    assert "At R=2, T=4096: tree takes 2 ms per step, ring 16 ms (8x faster)" in text
    assert "R=2 allgather T=4096" in text and "timeout" in text
