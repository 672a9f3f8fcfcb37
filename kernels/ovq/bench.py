# ruff: noqa: B023  (closures are timed immediately, inside the loop iteration that made them)
"""Kernel-level timings of the OVQ core against SDPA (GPU): `python -m ovqprof.kernels.ovq.bench`.

Times the core alone (no projections) for the shapes of issue 4 and prints one line per configuration:
forward for each kernel variant (per_head, split), dictionary precision (tf32, bf16x2, bf16) and slot block,
the split forward at several programs per head, forward + backward per variant and precision, and the decode
read. Used to tune the kernels; the numbers users see come from `ovqprof sweep` (whole layers).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from .config import OVQConfig, active_after
from .decode import ovq_decode_triton
from .forward_split import ovq_forward_split_triton
from .function import VARIANTS, kernels_for, ovq_core_triton
from .tiles import DICT_PRECISIONS


def _time(fn) -> str:
    try:
        return f"{do_bench(fn, warmup=10, rep=50):9.3f}"
    except Exception as exc:  # a config that does not fit is a row, not the end of the table
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", default="16384")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64, help="chunk size L (a power of two, 16 .. 256)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    B, H, d = args.batch, args.heads, args.dim
    L = args.chunk
    cfg = OVQConfig(dict_size=args.slots, chunk_size=L)
    print(f"device {torch.cuda.get_device_name()}  B={B} H={H} d={d} N={args.slots} L={L} bf16", flush=True)
    for T in (int(s) for s in args.seq.split(",")):
        q, k = (F.normalize(torch.randn(B, H, T, d, device=dev), dim=-1).bfloat16() for _ in range(2))
        v = torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16)
        beta = torch.full((H,), d ** 0.5, device=dev)
        print(f"T={T} sdpa fwd ms {_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}",
              flush=True)
        for variant in VARIANTS:
            forward, _ = kernels_for(variant)
            for precision in DICT_PRECISIONS:
                for block in (32, 64):
                    ms = _time(lambda: forward(q, k, v, beta, cfg, block_slots=block, dict_precision=precision))
                    print(f"T={T} ovq fwd {variant} dict={precision} BN={block} ms {ms}", flush=True)
        for programs in (2, 4, 8, 16):
            for stepped in (False, True):
                ms = _time(lambda: ovq_forward_split_triton(q, k, v, beta, cfg, programs=programs, stepped=stepped))
                print(f"T={T} ovq fwd split P={programs} stepped={stepped} ms {ms}", flush=True)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        do = torch.randn_like(v)

        def sdpa_fb():
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)

        print(f"T={T} sdpa fwd+bwd ms {_time(sdpa_fb)}", flush=True)
        for variant in VARIANTS:
            for precision in DICT_PRECISIONS:
                def ovq_fb():
                    ovq_core_triton(qg, kg, vg, beta, cfg, variant=variant, dict_precision=precision).backward(do)

                print(f"T={T} ovq fwd+bwd {variant} dict={precision} ms {_time(ovq_fb)}", flush=True)
        n = active_after(cfg, T)
        keys = F.normalize(torch.randn(B, H, args.slots, d, device=dev), dim=-1)
        vals = torch.randn(B, H, args.slots, d, device=dev)
        cnt = torch.ones(B, H, args.slots, device=dev)
        buf = torch.randn(B, H, L - 1, d, device=dev)
        q1, k1, v1 = q[:, :, 0].float(), k[:, :, 0].float(), v[:, :, 0].float()
        dec = lambda: ovq_decode_triton(q1, k1, v1, beta, keys, vals, cnt, n, buf, buf, 0, True)  # noqa: E731
        ms = do_bench(dec, warmup=10, rep=50)
        gbs = B * H * n * (2 * d + 1) * 4 / ms / 1e6
        print(f"T={T} ovq decode read n={n} ms {ms:.4f} ({gbs:.0f} GB/s of the dictionary)", flush=True)


if __name__ == "__main__":
    main()
