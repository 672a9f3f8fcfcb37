"""`ovqprof distributed` under torchrun, for several machines: every rank is a process torchrun started, the
world size is torchrun's, and rank 0 writes the rows.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id decode19 \\
        -m ovqprof.distributed.launch --profile distributed --output rows.csv

Each rank measures every (context, strategy) cell of the spec's `distributed:` section in turn, with the
same timing, gate and byte counts as the one-machine run; the per-rank figures are gathered to rank 0
(gather_object), merged into rows and written as they finish. A rank that dies is torchrun's to handle (its
elastic agent stops the job, or restarts it with --max-restarts): the rows already written stay, and
`--resume FILE` continues. The OVQ comparison runs on rank 0's device, before rank 0's first cell at a context.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ovqprof.distributed.launch")
    parser.add_argument("--profile", default="distributed")
    parser.add_argument("--strategy")
    parser.add_argument("--seq")
    parser.add_argument("--backend")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="skip the cells already in --output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ovqprof.cell import build_cell_layer
    from ovqprof.distributed.command import (
        DistributedRequest,
        OvqSteps,
        chosen_layers,
        distributed_header,
        distributed_settings,
        resume_rows,
    )
    from ovqprof.distributed.group import resolve_backend
    from ovqprof.distributed.rank import join_group
    from ovqprof.distributed.rows import cell_key, layout
    from ovqprof.machine import machine_info
    from ovqprof.output import RowWriter
    from ovqprof.resume import resume_format
    from ovqprof.spec import load_spec, resolve_profile

    args = _arguments(argv)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    spec = load_spec(resolve_profile(args.profile))
    request = DistributedRequest(strategies=args.strategy, seq=args.seq, backend=args.backend,
                                 world_sizes=str(world_size), output=args.output, resume=args.resume,
                                 format=resume_format(args.output, "--output"))
    settings = distributed_settings(spec, request)
    layer, ovq = chosen_layers(spec, settings)
    backend = resolve_backend(settings.backend, 1)  # one GPU per local rank is enough here
    device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    join_group(rank, world_size, backend, None, settings.collective_timeout_s, device)
    module = build_cell_layer(layer, torch.device(device))
    existing = resume_rows(args.output) if args.resume and rank == 0 else []
    done = {cell_key(r) for r in existing}
    plan = [(t, s) for t in settings.seq for s in settings.strategies]
    flags = [(layer.name, world_size, s, t, settings.batch) in done for t, s in plan]
    dist.broadcast_object_list(flags, src=0)  # every rank skips the same cells
    writer = ovq_steps = None
    if rank == 0:
        header = distributed_header(machine_info(torch.device(device)), spec, settings, [layer, ovq] if ovq else [layer])
        writer = RowWriter(request.format, args.output, header, layout=layout(), existing_rows=existing)
        writer.open()
        ovq_steps = OvqSteps(ovq, settings, "cuda" if backend == "nccl" else "cpu", existing)
    try:
        todo = [cell for cell, skip in zip(plan, flags, strict=True) if not skip]
        failed = _measure_cells(todo, layer, ovq, module, settings, rank, world_size, backend, device, writer,
                                ovq_steps)
    finally:
        if writer is not None:
            writer.close()
        dist.destroy_process_group()
    if rank == 0:
        print(f"wrote rows to {args.output}", file=sys.stderr)
    return 1 if failed else 0


def _measure_cells(todo, layer, ovq, module, settings, rank: int, world_size: int, backend: str, device: str,
                   writer, ovq_steps) -> bool:
    """Measure each (seq, strategy) on every rank; rank 0 gathers the ranks' figures and writes the row.
    Returns whether a cell failed on some rank."""
    from ovqprof.cell import classify_failure, failure_note
    from ovqprof.distributed.command import merge_rank_results
    from ovqprof.distributed.rank import RankJob, measure_on_rank
    from ovqprof.distributed.rows import empty_row

    gates: dict = {}
    failed = False
    for seq, strategy in todo:
        job = RankJob(layer, strategy, seq, settings.batch, seed=settings.seed, warmup_ms=settings.warmup_ms,
                      rep_ms=settings.rep_ms, min_reps=settings.min_reps, max_reps=settings.max_reps,
                      check_seq=settings.check_seq)
        try:
            mine = measure_on_rank(job, module, rank, world_size, device, gates)
        except Exception as exc:  # noqa: BLE001 - reported in the row; the group may be unusable after
            mine = {"rank": rank, "error": failure_note(exc), "status": classify_failure(exc)}
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank != 0:
            continue
        figures, note = ovq_steps.at(seq)
        base = empty_row(layer=layer.name, ovq_layer=ovq.name if ovq else None, world_size=world_size,
                         strategy=strategy, backend=backend, device=device, dtype=layer.dtype, seq=seq,
                         batch=settings.batch, heads=layer.heads, kv_heads=layer.options.get("kv_heads") or
                         layer.heads, head_dim=layer.head_dim, note=note, **figures)
        errors = [g for g in gathered if "error" in g]
        if errors:
            row = dict(base, status=errors[0]["status"], note=f"rank {errors[0]['rank']}: {errors[0]['error']}")
            failed = True
        else:
            row = merge_rank_results(gathered, base, settings, layer, world_size, strategy, seq)
        writer.write(row)
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
