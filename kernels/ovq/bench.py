# ruff: noqa: B023  (closures are timed immediately, inside the loop iteration that made them)
"""Kernel-level timings of the OVQ core against SDPA (GPU): `python -m ovqprof.kernels.ovq.bench`.

Times the core alone (no projections) for the shapes of issue 4 and prints one table: forward, forward +
backward, and the decode read, with the dictionary products in tf32 or bf16. Used to tune the kernels; the
numbers users see come from `ovqprof sweep` (whole layers).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from .backward import OVQCoreFunction
from .config import OVQConfig, active_after
from .decode import ovq_decode_triton
from .forward import ovq_forward_triton


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", default="4096,16384,65536")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    args = ap.parse_args()
    dev = torch.device("cuda")
    B, H, d = args.batch, args.heads, args.dim
    cfg = OVQConfig(dict_size=args.slots, chunk_size=64)
    print(f"device {torch.cuda.get_device_name()}  B={B} H={H} d={d} N={args.slots} L=64 bf16")
    print(f"{'T':>6} {'what':<28} {'ms':>9}")
    for T in (int(s) for s in args.seq.split(",")):
        q, k = (F.normalize(torch.randn(B, H, T, d, device=dev), dim=-1).bfloat16() for _ in range(2))
        v = torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16)
        beta = torch.full((H,), d ** 0.5, device=dev)
        rows = []
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        rows.append(("sdpa fwd", do_bench(sdpa, warmup=25, rep=100)))
        for tf32 in (True, False):
            tag = "tf32" if tf32 else "bf16"
            fwd = lambda: ovq_forward_triton(q, k, v, beta, cfg, args.block, args.warps, tf32)  # noqa: E731
            rows.append((f"ovq fwd ({tag})", do_bench(fwd, warmup=25, rep=100)))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        do = torch.randn_like(v)

        def sdpa_fb():
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)

        def ovq_fb():
            OVQCoreFunction.apply(qg, kg, vg, beta, cfg).backward(do)

        rows.append(("sdpa fwd+bwd", do_bench(sdpa_fb, warmup=25, rep=100)))
        rows.append(("ovq fwd+bwd (tf32)", do_bench(ovq_fb, warmup=25, rep=100)))
        n = active_after(cfg, T)
        keys = F.normalize(torch.randn(B, H, args.slots, d, device=dev), dim=-1)
        vals = torch.randn(B, H, args.slots, d, device=dev)
        cnt = torch.ones(B, H, args.slots, device=dev)
        buf = torch.randn(B, H, 63, d, device=dev)
        q1, k1, v1 = q[:, :, 0].float(), k[:, :, 0].float(), v[:, :, 0].float()
        dec = lambda: ovq_decode_triton(q1, k1, v1, beta, keys, vals, cnt, n, buf, buf, 0, True)  # noqa: E731
        ms = do_bench(dec, warmup=25, rep=100)
        gbs = B * H * n * (2 * d + 1) * 4 / ms / 1e6
        rows.append((f"ovq decode read n={n} ({gbs:.0f} GB/s)", ms))
        for what, ms in rows:
            print(f"{T:>6} {what:<28} {ms:>9.3f}")


if __name__ == "__main__":
    main()
