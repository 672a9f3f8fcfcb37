"""Compile the OVQ kernels for a GPU architecture on any machine, and report what the machine code holds.

Triton's wheel ships ptxas, cuobjdump and nvdisasm, so a kernel can be compiled to an sm_90 (H100/H200) cubin
without a GPU. That catches compile errors the interpreter cannot (it runs the Python, not the compiler) and
shows the costs that decide a kernel's speed: shared memory, registers, spills, and memory fences.
`python -m ovqprof.kernels.ovq.compiled` prints one row per kernel for the issue-4 shape (bf16, head_dim
128) at chunk sizes L = 64 and 256, for the default write rules and for the other value of each write-rule
constexpr; `--arch 100` for Blackwell, `--json` for machine-readable output. Kernels compile in parallel
(`--jobs`, default one per CPU; about 4 s each on one core). It must run with
TRITON_INTERPRET unset: under the interpreter, @triton.jit gives interpreted functions that cannot compile.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import inspect
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton

# Pointer arguments by name (the kernels' convention: upper-case names are tensors): bf16 activations,
# int32 indices and schedules, float32 for everything else; lower-case arguments and the sizes T, H, N are
# int32 scalars.
_BF16 = {"Q", "K", "V", "OUT", "DO", "DQ", "DKO", "DVO"}
_INT = {"NACT", "MSPAWN", "RANK", "PIDX", "SIDX", "SRANK", "FLAGS", "Z"}
_SCALARS = {"T", "H", "N", "BUF_ROWS"}


@dataclass
class CompiledKernel:
    """One compiled kernel: name, shared memory bytes, registers and spill bytes per thread, and the count
    of each SASS opcode (e.g. MEMBAR.ALL.GPU, REDG.E.ADD.F32.FTZ.RN.STRONG.GPU)."""

    name: str
    shared: int
    registers: int
    spill_bytes: int
    opcodes: collections.Counter

    def float_atomics(self, prefix: str) -> int:
        """Float32 atomic instructions of one kind: "ATOMG" (returns a value, or ordered) or "REDG" (a
        fire-and-forget reduction)."""
        return sum(n for op, n in self.opcodes.items() if op.startswith(prefix) and ".F32" in op)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def tools_available() -> bool:
    """Whether this triton install can compile and disassemble for NVIDIA GPUs without one."""
    return all(os.access(_tool(t), os.X_OK) for t in ("ptxas", "cuobjdump", "nvdisasm"))


def signature(kernel, constexprs: dict, activation: str = "*bf16") -> dict:
    """Triton signature of `kernel` from its argument names (see _BF16, _INT) and the given constexprs."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _BF16:
            sig[name] = activation
        elif name in _INT:
            sig[name] = "*i32"
        elif name.isupper() and name not in _SCALARS:
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(kernel, constexprs: dict, num_warps: int, arch: int = 90, activation: str = "*bf16"
                   ) -> CompiledKernel:
    """Compile `kernel` (a @triton.jit function) for sm_<arch> and read its resources and SASS opcodes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature(kernel, constexprs, activation), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=1))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    opcodes = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            opcodes[m.group(1)] += 1
    regs = re.search(r"REG:(\d+)", usage)
    spill = re.search(r"STACK:(\d+)", usage)
    return CompiledKernel(kernel.fn.__name__, compiled.metadata.shared, int(regs.group(1)) if regs else -1,
                          int(spill.group(1)) if spill else -1, opcodes)


WRITE_RULES = {
    # The defaults, and the other value of every write/read-rule constexpr at once (init spread_topm,
    # assign chunk_start, no count bias): each branch of the kernels compiles in one of the two.
    "default": dict(INIT="spread", CHUNK_START=False, COUNT_BIAS=True),
    "options": dict(INIT="spread_topm", CHUNK_START=True, COUNT_BIAS=False),
}


def issue_shape_kernels(programs: int = 8, dict_mode: str = "tf32", chunk: int = 64, rules: str = "default"
                        ) -> list[tuple]:
    """(kernel, constexprs, num_warps) for every OVQ kernel at the issue-4 shape (d = 128) with chunk size
    `chunk` and the layer's defaults: BM = min(L, 64) rows per block, the dictionary products in `dict_mode`
    (see tiles.dict_mode) and the write rules `rules` (see WRITE_RULES)."""
    from .backward import ovq_bwd_kernel
    from .backward_split import ovq_bwd_split_kernel, ovq_bwd_split_rows_kernel, ovq_bwd_split_slots_kernel
    from .decode import ovq_decode_kernel
    from .forward import ovq_fwd_kernel
    from .forward_split import ovq_fwd_split_kernel, ovq_split_read_kernel, ovq_split_write_kernel
    from .split import merge_rows

    rule = WRITE_RULES[rules]
    bm = min(chunk, 64)
    rm = merge_rows(chunk, programs)
    dims = dict(L=chunk, DK=128, DV=128)
    shape = dict(dims, BM=bm, NORMALIZE=True, IEEE=False, DICT=dict_mode)
    write = dict(INIT=rule["INIT"], CHUNK_START=rule["CHUNK_START"])
    bias = dict(COUNT_BIAS=rule["COUNT_BIAS"])
    split = dict(P=programs, RM=rm)
    return [
        (ovq_fwd_kernel, dict(shape, BN=64, **write, **bias), 8),
        (ovq_fwd_split_kernel, dict(shape, BN=64, **write, **bias, **split), 8),
        (ovq_bwd_kernel, dict(shape, BN=32, THROUGH_STATE=True, **bias), 8),
        (ovq_bwd_split_kernel, dict(shape, BN=32, THROUGH_STATE=True, **bias, **split), 8),
        # Float32 math, no DICT; buffer blocks of 32 rows at any L (the buffer holds L - 1 rows).
        (ovq_decode_kernel, dict(DK=128, DV=128, BN=64, BB=32, NORMALIZE=True, **bias), 4),
        # The stepped split path (two launches per chunk), used when the grid exceeds the GPU.
        (ovq_split_read_kernel, dict(shape, BN=64, P=programs, **bias), 8),
        (ovq_split_write_kernel, dict(dims, BM=bm, IEEE=False, **write, **split), 8),
        (ovq_bwd_split_slots_kernel, dict(shape, BN=32, THROUGH_STATE=True, P=programs, **bias), 8),
        (ovq_bwd_split_rows_kernel, dict(dims, THROUGH_STATE=True, **split), 4),
    ]


def report_rows(programs: int, modes: list[str], chunks: list[int], rules: list[str]) -> list[tuple]:
    """(L, rules, mode, kernel index in issue_shape_kernels) of every kernel to compile: each chunk size x
    dictionary mode with the first write rules, and the other write rules with the first mode only (their
    constexprs do not touch the products), skipping repeats: a kernel without DICT compiles once per chunk
    size and rules, one without write-rule constexprs once per chunk size and mode, one without L (decode)
    once for every chunk size (its row is listed under the first)."""
    rows, seen = [], set()
    for chunk in chunks:
        for i, rule in enumerate(rules):
            for mode in modes if i == 0 else modes[:1]:
                for j, (kernel, consts, _) in enumerate(issue_shape_kernels(programs, mode, chunk, rule)):
                    key = (kernel.fn.__name__, chunk if "L" in consts else None, _mode_of(consts, mode),
                           _rules_of(consts, rule))
                    if key not in seen:
                        seen.add(key)
                        rows.append((chunk, rule, mode, j))
    return rows


def _mode_of(consts: dict, mode: str) -> str:
    return mode if "DICT" in consts else "-"


def _rules_of(consts: dict, rule: str) -> str:
    return rule if set(consts) & {"INIT", "COUNT_BIAS"} else "-"


def _compile_row(args: tuple) -> dict:
    """Compile one report row (in a worker process) and summarise it as a JSON-ready dict."""
    programs, arch, (chunk, rule, mode, j) = args
    kernel, consts, warps = issue_shape_kernels(programs, mode, chunk, rule)[j]
    k = compile_kernel(kernel, consts, warps, arch)
    return dict(name=k.name, chunk=chunk, rules=_rules_of(consts, rule), dict=_mode_of(consts, mode), arch=arch,
                shared=k.shared, registers=k.registers, spill_bytes=k.spill_bytes, opcodes=dict(k.opcodes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--programs", type=int, default=8)
    ap.add_argument("--dict", default="tf32,bf16x2", help="dictionary precision modes, comma-separated")
    ap.add_argument("--chunks", default="64,256", help="chunk sizes L, comma-separated")
    ap.add_argument("--rules", default="default,options",
                    help=f"write rules ({', '.join(WRITE_RULES)}); all but the first with the first --dict only")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="kernels compiled in parallel")
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel, with every opcode count")
    args = ap.parse_args()
    if not tools_available():
        raise SystemExit("this triton install has no ptxas/cuobjdump/nvdisasm: cannot compile for a GPU here")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET is set: unset it to compile the kernels (no GPU is needed)")
    if not args.json:
        print("| kernel | L | rules | dict | sm | shared KiB | registers | spill B | MEMBAR.ALL.GPU | float atomics "
              "(ATOMG / REDG) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    rows = report_rows(args.programs, args.dict.split(","), [int(c) for c in args.chunks.split(",")],
                       args.rules.split(","))
    work = [(args.programs, args.arch, row) for row in rows]
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for r in pool.map(_compile_row, work):
            if args.json:
                print(json.dumps(r), flush=True)
                continue
            k = CompiledKernel(r["name"], r["shared"], r["registers"], r["spill_bytes"],
                               collections.Counter(r["opcodes"]))
            print(f"| {k.name} | {r['chunk']} | {r['rules']} | {r['dict']} | {r['arch']} | {k.shared / 1024:.0f} | "
                  f"{k.registers} | {k.spill_bytes} | {k.opcodes['MEMBAR.ALL.GPU']} | {k.float_atomics('ATOMG')} / "
                  f"{k.float_atomics('REDG')} |", flush=True)


if __name__ == "__main__":
    main()
