"""OVQ-attention on the CPU against its only public implementation, layer against layer.

    python -m ovqprof.kernels.ovq.bench_public --public PATH/KVM-paper/model/ovq_mixer.py [--seq 16384]

The public implementation (recursal/KVM-paper, `model/ovq_mixer.py`, function `ovq_attention`) is not part of
this repository: point --public at a checkout's copy. Both layers share one set of projections (ovqprof's
OVQAttention's q/k/v/o weights and its q, k normalisation); only the core differs: ovqprof's CPU core with the
public variant's options (assign: chunk_start, init: spread_topm, raw centroids, count bias, running-mean
values) against `ovq_attention` with the published switches. Calls are interleaved (ours, public, ours, ...)
so drift on a shared machine hits both; prints each one's median and spread, the speed ratio and how far the
outputs differ (the public code keeps counts in float32, so agreement is ~1e-7 relative, not 1e-15).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ovqprof.layers.ovq import OVQAttention, OVQOptions

PUBLIC_OPTIONS = dict(assign="chunk_start", init="spread_topm", normalize_centroids=False, count_bias=True,
                      value_update="mean", growth="saturating")


def load_public_core(path: str | Path) -> Callable:
    """`ovq_attention` from a copy of the public `model/ovq_mixer.py`. Its imports of the rest of that model
    (`utils.opt`, `.rwkv7_backbone`, `.value_residual_mixin`) are only used by its nn.Module, which this does
    not touch; they are replaced by empty stand-ins when the file is loaded outside its repository."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass the public repository's model/ovq_mixer.py")
    package = "_ovqprof_public_model"
    stand_ins = {
        package: dict(__path__=[str(path.parent)]),
        f"{package}.rwkv7_backbone": dict(StatesDictCache=object, apply_rotary_embeddings=None),
        f"{package}.value_residual_mixin": dict(ValueResidualMixin=nn.Module),
        "utils": dict(__path__=[]),
        "utils.opt": dict(set_label=lambda _label, param: param),
    }
    for name, attrs in stand_ins.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
    spec = importlib.util.spec_from_file_location(f"{package}.ovq_mixer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ovq_attention


def public_layer_forward(core: Callable, layer: OVQAttention, x: torch.Tensor, *, count_bias: bool = True,
                         delta: bool = False) -> torch.Tensor:
    """The public core between `layer`'s own projections: x [B, T, D] -> y [B, T, D]. The public core scales
    q by beta_h * sqrt(dk) itself, so it gets layer.beta / sqrt(dk)."""
    q, k, v = layer.project(x)
    cfg = layer.config
    o, *_ = core(q, k, v, None, None, None, beta=layer._beta() / math.sqrt(layer.head_dim),
                 chunk_size=cfg.chunk_size, max_centroids=cfg.dict_size, normalize_centroids=False,
                 use_min_state_size=cfg.growth == "full", use_counts_for_lr_only=not count_bias,
                 use_delta_rule=delta)
    return layer._output(o, x.dtype)


def _median_ms(times: list[float]) -> str:
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return f"{statistics.median(times) * 1e3:8.1f} ms (p20 {q[0] * 1e3:.1f}, p80 {q[-1] * 1e3:.1f})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--public", required=True, help="path to the public repository's model/ovq_mixer.py")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--chunk", type=int, nargs="+", default=[256, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    core = load_public_core(args.public)
    d_model = args.heads * args.head_dim
    x = torch.randn(1, args.seq, d_model, generator=torch.Generator().manual_seed(0))
    print(f"B=1 T={args.seq} H={args.heads} dk={args.head_dim} d_model={d_model} N={args.slots} float32, "
          f"{args.threads} threads, {args.reps} interleaved calls each")
    for L in args.chunk:
        torch.manual_seed(0)
        layer = OVQAttention(d_model, args.heads, args.head_dim,
                             OVQOptions(dict_size=args.slots, chunk_size=L, **PUBLIC_OPTIONS)).eval()
        ours, public = [], []
        with torch.no_grad():
            y_ours, y_public = layer(x), public_layer_forward(core, layer, x)  # warm-up, and the agreement
            for _ in range(args.reps):
                for public_side, times in ((False, ours), (True, public)):
                    t0 = time.perf_counter()
                    _ = public_layer_forward(core, layer, x) if public_side else layer(x)
                    times.append(time.perf_counter() - t0)
        diff = ((y_ours - y_public).norm() / y_public.norm()).item()
        print(f"L={L:4d}  ovqprof {_median_ms(ours)}   public {_median_ms(public)}   "
              f"speed-up {statistics.median(public) / statistics.median(ours):.2f}x   rel. difference {diff:.1e}")


if __name__ == "__main__":
    main()
