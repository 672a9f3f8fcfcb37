"""The split OVQ kernels (slots of each head over P programs) against the reference and the per-head kernels.

Without a GPU these run under TRITON_INTERPRET=1: P = 1 through the persistent kernel, P > 1 through the
stepped path (phase A and B launched per chunk), which shares all its math with the persistent kernel. With a
GPU the persistent kernel also runs with P > 1, its barrier included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ovq_kernel_inputs import ovq_inputs
from triton_device import kernel_device

from ovqprof.kernels.ovq import OVQConfig, active_after, ovq_chunked
from ovqprof.layers.ovq import OVQAttention, OVQOptions
from ovqprof.tolerances import rel_rms_error, tolerance_for

DEVICE = kernel_device()  # skips this module where the kernels cannot run

from ovqprof.kernels.ovq.backward import ovq_backward_triton  # noqa: E402
from ovqprof.kernels.ovq.backward_split import ovq_backward_split_triton  # noqa: E402
from ovqprof.kernels.ovq.forward import ovq_forward_triton  # noqa: E402
from ovqprof.kernels.ovq.forward_split import ovq_forward_split_triton  # noqa: E402
from ovqprof.kernels.ovq.function import kernels_for, ovq_core_triton  # noqa: E402
from ovqprof.kernels.ovq.split import split_programs  # noqa: E402

B, H, D = 2, 2, 16
L, N = 16, 40
ON_GPU = DEVICE == "cuda"


def _inputs(T: int, dtype: torch.dtype, seed: int):
    return ovq_inputs(B, H, T, D, dtype, seed, DEVICE)


def _check_against_reference(cfg: OVQConfig, T: int, programs: int, stepped: bool, seed: int) -> None:
    q, k, v, beta = _inputs(T, torch.float32, seed)
    o, lse, z, sk, sv, cnt = ovq_forward_split_triton(q, k, v, beta, cfg, programs=programs, stepped=stepped,
                                                      block_slots=16)
    ref, state = ovq_chunked(*(t.double() for t in (q, k, v, beta)), cfg)
    assert rel_rms_error(o, ref) <= tolerance_for(torch.float32)
    assert torch.equal(cnt.double(), state.counts)
    n = active_after(cfg, T)
    means = sk[:, :, :n] / cnt[:, :, :n, None]
    assert rel_rms_error(means, state.keys[:, :, :n]) <= 1e-5
    assert rel_rms_error(sv[:, :, :n] / cnt[:, :, :n, None], state.values[:, :, :n]) <= 1e-5
    # Splitting the slots must not change a single assignment, count or log-sum-exp of the v1 kernel.
    o1, lse1, z1, _, _, cnt1 = ovq_forward_triton(q, k, v, beta, cfg, block_slots=16)
    assert torch.equal(z, z1) and torch.equal(cnt, cnt1)
    assert torch.allclose(lse, lse1, rtol=0, atol=1e-5) and rel_rms_error(o, o1) <= tolerance_for(torch.float32)


SPLITS = [(1, False), (2, True), (4, True)] + ([(2, False), (4, False)] if ON_GPU else [])


@pytest.mark.parametrize(("programs", "stepped"), SPLITS)
@pytest.mark.parametrize(("growth", "init"), [("saturating", "spread"), ("dp", "random"), ("linear", "spread"),
                                              ("full", "random")])
def test_split_forward_matches_reference(growth, init, programs, stepped):
    cfg = OVQConfig(dict_size=N, chunk_size=L, growth=growth, init=init, alpha=8.0, rate=0.5, seed=3)
    _check_against_reference(cfg, 75, programs, stepped, seed=61)  # 75: the last chunk is partial


@pytest.mark.parametrize(("T", "programs"), [(16, L), (48, 8)])
def test_split_forward_whole_chunks_and_few_rows_per_program(T, programs):
    """T a multiple of L (every chunk written), and P up to L: each program merges L / P output rows (one at
    P = L)."""
    cfg = OVQConfig(dict_size=N, chunk_size=L, growth="full")
    _check_against_reference(cfg, T, programs, stepped=not ON_GPU, seed=T)


@pytest.mark.parametrize("normalize", [True, False])
def test_split_forward_without_normalised_centroids(normalize):
    cfg = OVQConfig(dict_size=N, chunk_size=L, normalize_centroids=normalize)
    _check_against_reference(cfg, 64, 2, stepped=not ON_GPU, seed=62)


def test_split_forward_bf16_within_bf16_tolerance():
    cfg = OVQConfig(dict_size=N, chunk_size=L)
    q, k, v, beta = _inputs(75, torch.bfloat16, seed=63)
    o = ovq_forward_split_triton(q, k, v, beta, cfg, programs=2, stepped=not ON_GPU, block_slots=16)[0]
    ref, _ = ovq_chunked(*(t.double() for t in (q, k, v, beta)), cfg)
    assert o.dtype == torch.bfloat16 and rel_rms_error(o, ref) <= tolerance_for(torch.bfloat16)


@pytest.mark.parametrize(("programs", "stepped"), SPLITS)
@pytest.mark.parametrize(("growth", "init", "normalize", "through"), [
    ("saturating", "spread", True, True), ("linear", "random", False, True), ("dp", "spread", True, False)])
def test_split_backward_matches_reference_autograd(growth, init, normalize, through, programs, stepped):
    cfg = OVQConfig(dict_size=N, chunk_size=L, growth=growth, init=init, alpha=8.0, rate=0.5,
                    normalize_centroids=normalize, grad_through_state=through)
    q, k, v, beta = _inputs(75, torch.float32, seed=64)
    do = torch.randn(B, H, 75, D, generator=torch.Generator().manual_seed(65)).to(DEVICE)
    o, lse, z, sk, sv, cnt = ovq_forward_triton(q, k, v, beta, cfg, block_slots=16)
    grads = ovq_backward_split_triton(q, k, v, o, do, lse, z, beta, sk, sv, cnt, cfg, programs=programs,
                                      stepped=stepped, block_slots=16)
    refs = [t.double().clone().requires_grad_() for t in (q, k, v, beta)]
    ovq_chunked(*refs, cfg)[0].backward(do.double())
    per_head = ovq_backward_triton(q, k, v, o, do, lse, z, beta, sk, sv, cnt, cfg, block_slots=16)
    for name, got, want, v1 in zip(("q", "k", "v", "beta"), grads, refs, per_head, strict=True):
        assert rel_rms_error(got, want.grad) <= 1e-4, f"d{name} vs the reference"
        assert rel_rms_error(got, v1) <= 1e-5, f"d{name} vs the per-head kernel"


def test_split_core_function_gradients_bf16():
    """Forward and backward both split, through the autograd Function (q, k normalised inside), in bf16."""
    cfg = OVQConfig(dict_size=N, chunk_size=L)
    base = _inputs(64, torch.bfloat16, seed=70)
    do = torch.randn(B, H, 64, D, generator=torch.Generator().manual_seed(71)).to(DEVICE, torch.bfloat16)
    ins = [t.clone().requires_grad_() for t in base]
    ovq_core_triton(*ins, cfg, normalize_qk=True, variant="split").backward(do)
    refs = [t.double().clone().requires_grad_() for t in base]
    ovq_chunked(F.normalize(refs[0], dim=-1), F.normalize(refs[1], dim=-1), refs[2], refs[3], cfg)[0].backward(
        do.double())
    for got, want in zip(ins[:3], refs[:3], strict=True):
        assert got.grad.dtype == torch.bfloat16
        assert rel_rms_error(got.grad, want.grad) <= tolerance_for(torch.bfloat16)


def test_layer_with_split_kernels_matches_reference_streams_and_trains():
    torch.manual_seed(66)
    opts = dict(dict_size=N, chunk_size=L, learn_beta=True)
    ref = OVQAttention(64, 2, 32, OVQOptions(impl="reference", **opts)).to(DEVICE)
    tri = OVQAttention(64, 2, 32, OVQOptions(impl="triton", triton_variant="split", **opts)).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    assert tri.implementation() == "triton-split"
    x = torch.randn(2, 75, 64, generator=torch.Generator().manual_seed(67)).to(DEVICE)
    with torch.no_grad():
        full = tri(x)
        assert rel_rms_error(full, ref(x)) <= tolerance_for(torch.float32)
        y, state = tri.prefill(x[:, :40])  # the prefill's dictionary comes from the split kernel too
        outs = [y]
        for t in range(40, 75):
            y_t, state = tri.step(x[:, t : t + 1], state)
            outs.append(y_t)
    assert rel_rms_error(torch.cat(outs, dim=1), full) <= tolerance_for(torch.float32)
    w = torch.randn(2, 75, 64, generator=torch.Generator().manual_seed(68)).to(DEVICE)
    (tri(x) * w).sum().backward()
    (ref(x) * w).sum().backward()
    for (name, got), want in zip(tri.named_parameters(), ref.parameters(), strict=True):
        assert rel_rms_error(got.grad, want.grad) <= 1e-4, name


def test_program_count_fills_the_sms_and_respects_the_limits():
    assert split_programs(16, 1024, 64, 64, sms=132) == 8  # B=1, H=16 on an H100: 128 resident programs
    assert split_programs(32, 1024, 64, 64, sms=132) == 4
    assert split_programs(256, 1024, 64, 64, sms=132) == 1  # enough (batch, head) pairs already
    assert split_programs(1, 1024, 64, 16, sms=132) == 16  # at most chunk_size programs
    assert split_programs(1, 40, 16, 16, sms=132) == 2  # each program owns a full tile of 16 slots
    assert split_programs(16, 1024, 64, 64, sms=1) == 1


def test_bad_program_counts_are_refused():
    cfg = OVQConfig(dict_size=N, chunk_size=L)
    q, k, v, beta = _inputs(32, torch.float32, seed=68)
    for bad in (0, 3, 2 * L):
        with pytest.raises(ValueError, match="power of two"):
            ovq_forward_split_triton(q, k, v, beta, cfg, programs=bad, stepped=True)
        with pytest.raises(ValueError, match="power of two"):
            ovq_backward_split_triton(q, k, v, q, v, q[..., 0], q[..., 0].int(), beta, q, v, q[..., 0], cfg,
                                      programs=bad, stepped=True)
    with pytest.raises(ValueError, match="unknown OVQ kernel variant"):
        kernels_for("fastest")


@pytest.mark.skipif(ON_GPU, reason="the interpreter's one-program-at-a-time rule is what is checked")
def test_persistent_kernel_with_several_programs_is_refused_under_the_interpreter():
    cfg = OVQConfig(dict_size=N, chunk_size=L)
    q, k, v, beta = _inputs(32, torch.float32, seed=69)
    with pytest.raises(ValueError, match="stepped=True"):
        ovq_forward_split_triton(q, k, v, beta, cfg, programs=2, stepped=False)
    with pytest.raises(ValueError, match="stepped=True"):
        ovq_backward_split_triton(q, k, v, q, v, q[..., 0], q[..., 0].int(), beta, q, v, q[..., 0], cfg,
                                  programs=2, stepped=False)
