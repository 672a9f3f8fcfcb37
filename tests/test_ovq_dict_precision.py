"""Precision modes of the OVQ kernels' dictionary products (tf32, bf16x2, bf16) for bf16 inputs.

Under TRITON_INTERPRET=1 the bf16 modes are emulated exactly (bf16-rounded operands, float32 products, as the
tensor cores compute them) and tf32 runs as IEEE float32, so these tests check the hi + lo split's arithmetic
and that each mode reaches the kernels; on a GPU they run the real tensor-core products.
"""

from __future__ import annotations

import pytest
import torch
from decode_helpers import decode_all
from ovq_kernel_inputs import ovq_inputs
from triton_device import kernel_device

from ovqprof.kernels.ovq import OVQConfig, ovq_chunked
from ovqprof.layers.ovq import OVQAttention, OVQOptions
from ovqprof.tolerances import rel_rms_error, tolerance_for

DEVICE = kernel_device()  # skips this module where the kernels cannot run

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ovqprof.kernels.ovq.forward import ovq_forward_triton  # noqa: E402
from ovqprof.kernels.ovq.forward_split import ovq_forward_split_triton  # noqa: E402
from ovqprof.kernels.ovq.function import ovq_core_triton  # noqa: E402
from ovqprof.kernels.ovq.tiles import dict_mode, exact_dots, key_dot  # noqa: E402

B, H, D = 2, 2, 16
L, N = 16, 40


@triton.jit
def _key_dot_kernel(A, Bm, C, M: tl.constexpr, K: tl.constexpr, NC: tl.constexpr, IEEE: tl.constexpr,
                    DICT: tl.constexpr):
    r, kk, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, NC)
    a = tl.load(A + r[:, None] * K + kk[None, :])
    b = tl.load(Bm + kk[:, None] * NC + n[None, :])
    tl.store(C + r[:, None] * NC + n[None, :], key_dot(a, b, IEEE, DICT))


def _key_dot_error(mode: str) -> float:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(16, 32, generator=gen).to(DEVICE, torch.bfloat16)
    b = torch.randn(32, 16, generator=gen).to(DEVICE)  # a float32 dictionary tile (transposed)
    c = torch.empty(16, 16, device=DEVICE)
    _key_dot_kernel[(1,)](a, b, c, 16, 32, 16, IEEE=exact_dots(torch.bfloat16), DICT=mode)
    ref = a.double() @ b.double()
    return ((c.double() - ref).abs().max() / ref.abs().max()).item()


def test_bf16x2_key_products_are_near_float32_and_bf16_is_not():
    """hi + lo keeps a float32 dictionary to ~2^-16 (finer than tf32's 2^-11); one bf16 rounding is ~2^-9."""
    assert _key_dot_error("bf16x2") <= 2e-5
    assert _key_dot_error("bf16") >= 5e-4


def test_dict_mode_checks_and_float32_is_exact():
    assert dict_mode(torch.float32, "bf16") == "ieee"
    assert dict_mode(torch.bfloat16, "bf16x2") == "bf16x2"
    with pytest.raises(ValueError, match="dict_precision must be one of tf32, bf16x2, bf16"):
        dict_mode(torch.bfloat16, "fp8")


def _inputs(T: int, seed: int):
    return ovq_inputs(B, H, T, D, torch.bfloat16, seed, DEVICE)


@pytest.mark.parametrize("split", [False, True])
def test_bf16x2_forward_keeps_every_assignment(split):
    """bf16x2 logits and similarities are close enough to float32 that no token changes slot."""
    cfg = OVQConfig(dict_size=N, chunk_size=L)
    q, k, v, beta = _inputs(75, seed=3)
    run = ((lambda **kw: ovq_forward_split_triton(q, k, v, beta, cfg, programs=2, block_slots=16, **kw))
           if split else (lambda **kw: ovq_forward_triton(q, k, v, beta, cfg, block_slots=16, **kw)))
    o, lse, z, _, _, cnt = run(dict_precision="bf16x2")
    o_exact, lse_exact, z_exact, _, _, cnt_exact = run(dict_precision="tf32")
    assert torch.equal(z, z_exact) and torch.equal(cnt, cnt_exact)
    assert torch.allclose(lse, lse_exact, rtol=0, atol=1e-2)
    ref, _ = ovq_chunked(*(t.double() for t in (q, k, v, beta)), cfg)
    assert rel_rms_error(o, ref) <= tolerance_for(torch.bfloat16)
    assert rel_rms_error(o, o_exact) <= tolerance_for(torch.bfloat16)


@pytest.mark.parametrize("variant", ["per_head", "split"])
@pytest.mark.parametrize("precision", ["bf16x2", "bf16"])
def test_bf16_modes_backward_within_bf16_tolerance(variant, precision):
    cfg = OVQConfig(dict_size=N, chunk_size=L)
    base = _inputs(64, seed=31)
    do = torch.randn(B, H, 64, D, generator=torch.Generator().manual_seed(32)).to(DEVICE, torch.bfloat16)
    ins = [t.clone().requires_grad_() for t in base]
    ovq_core_triton(*ins, cfg, variant=variant, dict_precision=precision).backward(do)
    refs = [t.double().clone().requires_grad_() for t in base]
    ovq_chunked(*refs, cfg)[0].backward(do.double())
    for name, got, want in zip("qkv", ins[:3], refs[:3], strict=True):
        err = rel_rms_error(got.grad, want.grad)
        assert err <= tolerance_for(torch.bfloat16), f"d{name} ({precision}, {variant}): rel error {err:.2e}"


def test_layer_bf16x2_decode_matches_forward():
    """The decode step reads the float32 dictionary exactly; the bf16x2 forward must agree with it."""
    torch.manual_seed(52)
    opts = OVQOptions(impl="triton", dict_size=N, chunk_size=L, dict_precision="bf16x2", triton_variant="split")
    layer = OVQAttention(64, 2, 32, opts).to(DEVICE, torch.bfloat16)
    assert layer.implementation() == "triton-split-bf16x2"
    x = torch.randn(2, 75, 64, generator=torch.Generator().manual_seed(51)).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        full = layer(x)
        streamed, _ = decode_all(layer, x, prefix=37)  # crosses two flushes
    assert rel_rms_error(streamed, full) <= tolerance_for(torch.bfloat16)
