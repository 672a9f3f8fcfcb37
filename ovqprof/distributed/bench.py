"""The README's distributed-decode benchmark: R = 2 and 4 ranks, contexts 16k..256k, d_model 1024, 8 heads x
128 (MHA), float32, tree vs ring vs all-gather, OVQ-attention's single-device step (N = 1024, L = 64) beside.

    python -m ovqprof.distributed.bench --output distributed-bench.json

Rows go to --output as they finish (resume with --resume FILE); a Markdown table of the finished rows is
printed at the end. Not a test: it takes minutes and its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ovqprof.output import human_bytes

BENCH_SPEC = """
name: distributed-bench
description: README benchmark of distributed decode (d_model 1024, 8 x 128, float32)
defaults: {batch: 1, d_model: 1024, heads: 8, head_dim: 128, dtype: float32, device: cpu}
layers:
  - {name: mha, type: softmax_attention}
  - {name: ovq, type: ovq, dict_size: 1024, chunk_size: 64}
distributed:
  layer: mha
  ovq: ovq
  world_sizes: [2, 4]
  strategies: [tree, ring, allgather]
  seq: 16k..256k
  warmup_ms: 50
  rep_ms: 500
  min_reps: 5
  max_reps: 50
  collective_timeout_s: 300
  cell_timeout_s: 900
"""


def _ms(row: dict | None) -> str:
    return "-" if row is None else (f"{row['ms_median']:.3g}" if row["status"] == "ok" else row["status"])


def markdown_table(rows: list[dict]) -> str:
    """One line per (R, T): ms per step and bytes per rank of each strategy, and OVQ's step."""
    strategies = [s for s in ("tree", "ring", "allgather") if any(r["strategy"] == s for r in rows)]
    head = ["R", "T"] + [f"{s} ms" for s in strategies] + [f"{s} sent/rank" for s in strategies] + ["ovq ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = sorted({(int(r["world_size"]), int(r["seq"])) for r in rows})
    for world_size, seq in cells:
        at = {r["strategy"]: r for r in rows if int(r["world_size"]) == world_size and int(r["seq"]) == seq}
        times = [_ms(at.get(s)) for s in strategies]
        sent = [human_bytes(at[s]["bytes_sent"]) if s in at and at[s]["status"] == "ok" else "-" for s in strategies]
        ovq = next((r["ovq_ms"] for r in at.values() if r.get("ovq_ms") is not None), None)
        lines.append("| " + " | ".join([str(world_size), f"{seq // 1024}k", *times, *sent,
                                         "-" if ovq is None else f"{ovq:.3g}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ovqprof.distributed.command import DistributedRequest, run_distributed, summary
    from ovqprof.machine import machine_info
    from ovqprof.resume import resume_format
    from ovqprof.spec import load_spec_text

    parser = argparse.ArgumentParser(prog="python -m ovqprof.distributed.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("distributed-bench.json"))
    parser.add_argument("--resume", action="store_true", help="skip the cells already in --output")
    parser.add_argument("--seq", help="contexts, overriding 16k..256k (as for sweep)")
    parser.add_argument("--world-size", help="rank counts, overriding 2,4")
    args = parser.parse_args(argv)
    import torch

    spec = load_spec_text(BENCH_SPEC, "<ovqprof.distributed.bench>")
    request = DistributedRequest(world_sizes=args.world_size, seq=args.seq, format=resume_format(args.output,
                                 "--output"), output=args.output, resume=args.resume, show_progress=True)
    rows: list[dict] = []
    try:
        run_distributed(spec, machine_info(torch.device("cpu")), request, rows, log=lambda t: print(t, file=sys.stderr))
    except KeyboardInterrupt:
        print(f"interrupted: {len(rows)} rows kept in {args.output}; continue with --resume", file=sys.stderr)
        return 130
    from ovqprof.distributed.command import resume_rows

    sys.stdout.write(markdown_table(resume_rows(args.output)))
    text, failed = summary(rows)
    print(f"wrote {len(rows)} rows to {args.output} ({text})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
