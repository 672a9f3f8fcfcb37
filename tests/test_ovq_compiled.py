"""The OVQ kernels compiled for sm_90 (H100/H200) on the CPU, with triton's bundled ptxas: compile errors the
interpreter cannot see, the shared memory each needs at chunk sizes 64 and 256 (with both values of every
write-rule constexpr), and the memory-ordering properties the kernels' speed depends on. About 80 s on two
cores with an empty triton cache (the kernels compile in parallel)."""

import collections
import json
import os
import subprocess
import sys

import pytest

from ovqprof.kernels.ovq import compiled

pytestmark = pytest.mark.skipif(not compiled.tools_available(),
                                reason="this triton install has no ptxas/cuobjdump/nvdisasm to compile for sm_90")

# A persistent split kernel has exactly one GPU-wide fence per barrier: the release before it signals.
_FENCES_ALLOWED = {"ovq_fwd_kernel": 0, "ovq_bwd_kernel": 0, "ovq_decode_kernel": 0,
                   "ovq_fwd_split_kernel": 1, "ovq_bwd_split_kernel": 1, "ovq_split_read_kernel": 0,
                   "ovq_split_write_kernel": 0, "ovq_bwd_split_slots_kernel": 0, "ovq_bwd_split_rows_kernel": 0}
_NO_DICT = {"ovq_decode_kernel", "ovq_split_write_kernel", "ovq_bwd_split_rows_kernel"}  # no DICT modes


_WRITE_RULES = {"ovq_fwd_kernel", "ovq_fwd_split_kernel", "ovq_bwd_kernel", "ovq_bwd_split_kernel", "ovq_decode_kernel",
                 "ovq_split_read_kernel", "ovq_split_write_kernel", "ovq_bwd_split_slots_kernel"}  # INIT/COUNT_BIAS
_NO_CHUNK = {"ovq_decode_kernel"}  # no L: compiled once, listed under the first chunk size
CHUNKS = (64, 256)


@pytest.fixture(scope="module")
def kernels():
    """Compiled in a child process: this session runs kernels under TRITON_INTERPRET, which cannot compile.
    Keys (name, L, write rules, dict mode)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "ovqprof.kernels.ovq.compiled", "--json", "--programs", "8",
                          "--chunks", ",".join(map(str, CHUNKS))], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {(r["name"], r["chunk"], r["rules"], r["dict"]): compiled.CompiledKernel(
        r["name"], r["shared"], r["registers"], r["spill_bytes"], collections.Counter(r["opcodes"])) for r in rows}


def _expected_rows() -> set:
    rows = set()
    for name in _FENCES_ALLOWED:
        for chunk in CHUNKS[:1] if name in _NO_CHUNK else CHUNKS:
            modes = ("-",) if name in _NO_DICT else ("tf32", "bf16x2")
            if name in _WRITE_RULES:  # the other write rules compile with the first dict mode only
                rows |= {(name, chunk, "default", m) for m in modes} | {(name, chunk, "options", modes[0])}
            else:
                rows |= {(name, chunk, "-", m) for m in modes}
    return rows


def test_every_kernel_compiles_for_sm90_within_shared_memory_at_chunks_64_and_256(kernels):
    assert set(kernels) == _expected_rows()
    for key, k in kernels.items():
        assert 0 <= k.shared <= 227 * 1024, (key, k.shared)  # H100/H200: 227 KiB per block at most
        assert 0 < k.registers <= 255, (key, k.registers)


def test_chunk_256_spills_stay_in_the_range_of_chunk_64(kernels):
    """The row blocks keep every tile at BM = 64 rows whatever L: at L = 256 spills stay within 4 KB per
    thread (the L = 64 kernels spill up to ~2.4 KB; whole-chunk [L, d] and [L, L] tiles spilled up to 10 KB
    at L = 256 and needed up to 720 KiB of shared memory)."""
    for (name, chunk, rules, mode), k in kernels.items():
        if chunk == 256:
            assert k.spill_bytes <= 4096, (name, rules, mode, k.spill_bytes)


def test_dictionary_sums_are_fence_free_reductions(kernels):
    """The running sums are added with relaxed atomics: a REDG per element and no fence around each (an
    acq_rel atomic puts a MEMBAR.ALL.GPU before every element)."""
    for (name, *_), k in kernels.items():
        assert k.opcodes["MEMBAR.ALL.GPU"] <= _FENCES_ALLOWED[name], (name, k.opcodes["MEMBAR.ALL.GPU"])
        assert k.float_atomics("ATOMG") == 0, name
    for name in ("ovq_fwd_kernel", "ovq_bwd_kernel", "ovq_fwd_split_kernel", "ovq_bwd_split_kernel",
                 "ovq_split_write_kernel", "ovq_bwd_split_slots_kernel"):
        for chunk in CHUNKS:
            rows = [k for (n, c, _, _), k in kernels.items() if n == name and c == chunk]
            assert rows and all(k.float_atomics("REDG") > 0 for k in rows), (name, chunk)


def test_signature_types_arguments_by_name():
    from ovqprof.kernels.ovq.decode import ovq_decode_kernel

    sig = compiled.signature(ovq_decode_kernel, dict(DK=128, DV=128, BN=64, BB=32, NORMALIZE=True, COUNT_BIAS=True))
    assert sig["Q"] == "*bf16" and sig["MK"] == "*fp32" and sig["BUF_ROWS"] == "i32" and sig["n_active"] == "i32"
    assert sig["DK"] == "constexpr"
