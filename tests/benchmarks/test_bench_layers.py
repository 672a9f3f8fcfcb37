"""GPU benchmarks of the layers (pytest-benchmark), for gating CI with `--benchmark-compare-fail=median:10%`.

pytest-benchmark times on the CPU side, so every timed call ends in `torch.cuda.synchronize()`: the time is
launch + kernels + one synchronisation (a constant of a few microseconds). Each shape is warmed up (lazy
init, autotune) before any call is timed; inputs are random, weights seeded. Without a GPU every benchmark is
skipped with the reason; `ovqprof check` is the other, noise-aware way to gate (README, "Regression checks
in CI").

Add a layer by adding an entry to LAYERS. OVQ-attention runs its v1 Triton kernels here (forward, backward and
decode all dispatch to Triton on CUDA).
"""

from __future__ import annotations

import pytest
import torch

from ovqprof.cell import build_cell_layer
from ovqprof.spec import LayerSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="GPU benchmark: no CUDA GPU is visible (torch.cuda.is_available() is False)"),
]

# (id, registered type, options); dimensions shared below.
LAYERS = [
    ("mha", "softmax_attention", {}),
    ("gqa", "softmax_attention", {"kv_heads": 4}),
    ("swa", "softmax_attention", {"window": 1024}),
    ("linear", "linear_attention", {"feature_map": "elu+1", "normalize": True}),
    ("ovq", "ovq", {"dict_size": 1024, "chunk_size": 64}),
]
D_MODEL, HEADS, HEAD_DIM, DTYPE = 1024, 16, 64, "bfloat16"
SEQ, BATCH = 4096, 1
ROUNDS, WARMUP_ROUNDS = 30, 5


def _layer(type_name: str, options: dict):
    spec = LayerSpec(name="bench", type=type_name, d_model=D_MODEL, heads=HEADS, head_dim=HEAD_DIM, dtype=DTYPE,
                     options=options)
    return build_cell_layer(spec, torch.device("cuda"))


def _synchronised(fn):
    def call():
        fn()
        torch.cuda.synchronize()

    return call


def _run(benchmark, fn, setup=None):
    for _ in range(3):  # never time a first call: lazy init, cuBLAS/SDPA heuristics, Triton autotune
        if setup is not None:
            setup()
        fn()
    torch.cuda.synchronize()
    benchmark.extra_info.update(d_model=D_MODEL, heads=HEADS, head_dim=HEAD_DIM, dtype=DTYPE, seq=SEQ, batch=BATCH,
                                device=torch.cuda.get_device_name())
    benchmark.pedantic(_synchronised(fn), setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)


@pytest.mark.parametrize(("name", "type_name", "options"), LAYERS, ids=[entry[0] for entry in LAYERS])
def test_fwd(benchmark, name, type_name, options):
    layer = _layer(type_name, options)
    x = torch.randn(BATCH, SEQ, D_MODEL, device="cuda", dtype=layer.dtype)

    def fwd():
        with torch.no_grad():
            layer(x)

    _run(benchmark, fwd)


@pytest.mark.parametrize(("name", "type_name", "options"), LAYERS, ids=[entry[0] for entry in LAYERS])
def test_bwd(benchmark, name, type_name, options):
    layer = _layer(type_name, options)
    x = torch.randn(BATCH, SEQ, D_MODEL, device="cuda", dtype=layer.dtype, requires_grad=True)
    dy = torch.randn_like(x)
    params = [p for p in layer.parameters() if p.requires_grad]

    def clear_grads():  # outside the timed call, as do_bench's grad_to_none
        for t in (x, *params):
            t.grad = None

    _run(benchmark, lambda: layer(x).backward(dy), setup=clear_grads)


@pytest.mark.parametrize(("name", "type_name", "options"), LAYERS, ids=[entry[0] for entry in LAYERS])
def test_decode(benchmark, name, type_name, options):
    layer = _layer(type_name, options)
    if not layer.supports_decode:
        pytest.skip(f"{type_name} has no decode path")
    x_t = torch.randn(BATCH, 1, D_MODEL, device="cuda", dtype=layer.dtype)
    with torch.no_grad():
        _, state = layer.prefill(torch.randn(BATCH, SEQ, D_MODEL, device="cuda", dtype=layer.dtype),
                                 capacity=SEQ + 1)

    def step():  # replays one step at context SEQ with the same state (the decode contract allows it)
        with torch.no_grad():
            layer.step(x_t, state)

    _run(benchmark, step)
