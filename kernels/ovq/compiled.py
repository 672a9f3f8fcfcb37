"""Compile the OVQ kernels for a GPU architecture on any machine, and report what the machine code holds.

Triton's wheel ships ptxas, cuobjdump and nvdisasm, so a kernel can be compiled to an sm_90 (H100/H200) cubin
without a GPU. That catches compile errors the interpreter cannot (it runs the Python, not the compiler) and
shows the costs that decide a kernel's speed: shared memory, registers, spills, and memory fences.
`python -m ovqprof.kernels.ovq.compiled` prints one row per kernel for the issue-4 shape (bf16, head_dim
128, L = 64); `--arch 100` for Blackwell, `--json` for machine-readable output. It must run with
TRITON_INTERPRET unset: under the interpreter, @triton.jit gives interpreted functions that cannot compile.
"""

from __future__ import annotations

import argparse
import collections
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
_INT = {"NACT", "MSPAWN", "RANK", "PIDX", "FLAGS", "Z"}
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


def issue_shape_kernels(programs: int = 8, dict_mode: str = "tf32") -> list[tuple]:
    """(kernel, constexprs, num_warps) for every OVQ kernel at the issue-4 shape and the layer's defaults, with
    the dictionary products in `dict_mode` (see forward.dict_mode)."""
    from .backward import ovq_bwd_kernel
    from .backward_split import ovq_bwd_split_kernel, ovq_bwd_split_rows_kernel, ovq_bwd_split_slots_kernel
    from .decode import ovq_decode_kernel
    from .forward import ovq_fwd_kernel
    from .forward_split import ovq_fwd_split_kernel, ovq_split_read_kernel, ovq_split_write_kernel

    shape = dict(L=64, DK=128, DV=128, NORMALIZE=True, IEEE=False, DICT=dict_mode)
    return [
        (ovq_fwd_kernel, dict(shape, BN=64, SPREAD=True), 8),
        (ovq_fwd_split_kernel, dict(shape, BN=64, SPREAD=True, P=programs), 8),
        (ovq_bwd_kernel, dict(shape, BN=32, THROUGH_STATE=True), 8),
        (ovq_bwd_split_kernel, dict(shape, BN=32, THROUGH_STATE=True, P=programs), 8),
        (ovq_decode_kernel, dict(DK=128, DV=128, BN=64, BL=64, NORMALIZE=True), 4),  # float32 math, no DICT
        # The stepped split path (two launches per chunk), used when the grid exceeds the GPU.
        (ovq_split_read_kernel, dict(shape, BN=64, P=programs), 8),
        (ovq_split_write_kernel, dict(L=64, DK=128, DV=128, IEEE=False, SPREAD=True, P=programs), 4),
        (ovq_bwd_split_slots_kernel, dict(shape, BN=32, THROUGH_STATE=True, P=programs), 8),
        (ovq_bwd_split_rows_kernel, dict(L=64, DK=128, DV=128, THROUGH_STATE=True, P=programs), 4),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--programs", type=int, default=8)
    ap.add_argument("--dict", default="tf32,bf16x2", help="dictionary precision modes, comma-separated")
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel, with every opcode count")
    args = ap.parse_args()
    if not tools_available():
        raise SystemExit("this triton install has no ptxas/cuobjdump/nvdisasm: cannot compile for a GPU here")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET is set: unset it to compile the kernels (no GPU is needed)")
    if not args.json:
        print("| kernel | dict | sm | shared KiB | registers | spill B | MEMBAR.ALL.GPU | float atomics "
              "(ATOMG / REDG) |")
        print("|---|---|---|---|---|---|---|---|")
    modes = args.dict.split(",")
    for mode, (kernel, consts, warps) in ((m, row) for m in modes for row in issue_shape_kernels(args.programs, m)):
        if "DICT" not in consts and mode != modes[0]:
            continue  # no dictionary products (decode): one row is enough
        k = compile_kernel(kernel, consts, warps, args.arch)
        if args.json:
            print(json.dumps(dict(name=k.name, dict=mode, arch=args.arch, shared=k.shared, registers=k.registers,
                                  spill_bytes=k.spill_bytes, opcodes=dict(k.opcodes))))
            continue
        print(f"| {k.name} | {mode} | {args.arch} | {k.shared / 1024:.0f} | {k.registers} | {k.spill_bytes} | "
              f"{k.opcodes['MEMBAR.ALL.GPU']} | {k.float_atomics('ATOMG')} / {k.float_atomics('REDG')} |")


if __name__ == "__main__":
    main()
