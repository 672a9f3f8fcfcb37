"""The OVQ kernels compiled for sm_90 (H100/H200) on the CPU, with triton's bundled ptxas: compile errors the
interpreter cannot see, and the memory-ordering properties the kernels' speed depends on."""

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


@pytest.fixture(scope="module")
def kernels():
    """Compiled in a child process: this session runs kernels under TRITON_INTERPRET, which cannot compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "ovqprof.kernels.ovq.compiled", "--json", "--programs", "8"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {(r["name"], r["dict"]): compiled.CompiledKernel(r["name"], r["shared"], r["registers"], r["spill_bytes"],
                                               collections.Counter(r["opcodes"])) for r in rows}


def test_every_kernel_compiles_for_sm90_within_shared_memory(kernels):
    with_modes = {(n, m) for n in set(_FENCES_ALLOWED) - _NO_DICT for m in ("tf32", "bf16x2")}
    assert set(kernels) == with_modes | {(n, "tf32") for n in _NO_DICT}
    for k in kernels.values():
        assert 0 <= k.shared <= 227 * 1024, (k.name, k.shared)  # H100/H200: 227 KiB per block at most
        assert 0 < k.registers <= 255, (k.name, k.registers)


def test_dictionary_sums_are_fence_free_reductions(kernels):
    """The running sums are added with relaxed atomics: a REDG per element and no fence around each (an
    acq_rel atomic puts a MEMBAR.ALL.GPU before every element)."""
    for (name, _), k in kernels.items():
        assert k.opcodes["MEMBAR.ALL.GPU"] <= _FENCES_ALLOWED[name], (name, k.opcodes["MEMBAR.ALL.GPU"])
        assert k.float_atomics("ATOMG") == 0, name
    for name in ("ovq_fwd_kernel", "ovq_bwd_kernel", "ovq_fwd_split_kernel", "ovq_bwd_split_kernel",
                 "ovq_split_write_kernel", "ovq_bwd_split_slots_kernel"):
        assert kernels[name, "tf32"].float_atomics("REDG") > 0, name


def test_signature_types_arguments_by_name():
    from ovqprof.kernels.ovq.decode import ovq_decode_kernel

    sig = compiled.signature(ovq_decode_kernel, dict(DK=128, DV=128, BN=64, BL=64, NORMALIZE=True))
    assert sig["Q"] == "*bf16" and sig["MK"] == "*fp32" and sig["BUF_ROWS"] == "i32" and sig["n_active"] == "i32"
    assert sig["DK"] == "constexpr"
