"""The OVQ-attention Triton kernels against the PyTorch reference (forward, backward, decode).

Without a GPU these run under TRITON_INTERPRET=1 (set in conftest.py) on small shapes; with one they run the
compiled kernels. The reference is evaluated in float64 on the same (rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch
from autograd_helpers import saved_storage_bytes
from ovq_kernel_inputs import ovq_inputs
from triton_device import kernel_device

from ovqprof.kernels.ovq import OVQConfig, active_after, ovq_chunked
from ovqprof.kernels.ovq.reference import centroid_keys, read
from ovqprof.layers.ovq import OVQAttention, OVQOptions
from ovqprof.tolerances import rel_rms_error, tolerance_for

DEVICE = kernel_device()  # skips this module where the kernels cannot run

from ovqprof.kernels.ovq.decode import ovq_decode_triton  # noqa: E402
from ovqprof.kernels.ovq.forward import ovq_forward_triton  # noqa: E402
from ovqprof.kernels.ovq.function import ovq_core_triton  # noqa: E402  (after the interpreter is chosen)

B, H, D = 2, 2, 16
L, N = 16, 40


def _inputs(T: int, dtype: torch.dtype, seed: int, dk: int = D):
    return ovq_inputs(B, H, T, dk, dtype, seed, DEVICE)


def _tol(dtype: torch.dtype) -> float:
    # float32 kernels against a float64 reference: float32 rounding; bf16 inputs: the bf16 tolerance.
    return tolerance_for(dtype)


GROWTH_INIT = [(g, i) for g in ("saturating", "dp", "linear", "full") for i in ("spread", "random")]


@pytest.mark.parametrize(("growth", "init"), GROWTH_INIT)
@pytest.mark.parametrize("T", [48, 75])
def test_forward_matches_reference(growth, init, T):
    cfg = OVQConfig(dict_size=N, chunk_size=L, growth=growth, init=init, alpha=8.0, rate=0.5, seed=3)
    q, k, v, beta = _inputs(T, torch.float32, seed=T)
    o, lse, z, sk, sv, cnt = ovq_forward_triton(q, k, v, beta, cfg, block_slots=16)
    ref, state = ovq_chunked(*(t.double() for t in (q, k, v, beta)), cfg)
    assert rel_rms_error(o, ref) <= _tol(torch.float32)
    # The final dictionary: counts exact, means within float32 rounding, active slots as scheduled.
    assert torch.equal(cnt.double(), state.counts)
    n = active_after(cfg, T)
    assert int((cnt[0, 0] > 0).sum()) == n == state.active
    means = sk[:, :, :n] / cnt[:, :, :n, None]
    assert rel_rms_error(means, state.keys[:, :, :n]) <= 1e-5
    assert z.shape[-1] == (T // L) * L and int(z.max()) < n


@pytest.mark.parametrize("normalize", [True, False])
def test_forward_without_normalised_centroids(normalize):
    cfg = OVQConfig(dict_size=N, chunk_size=L, normalize_centroids=normalize)
    q, k, v, beta = _inputs(64, torch.float32, seed=11)
    o = ovq_forward_triton(q, k, v, beta, cfg, block_slots=16)[0]
    ref, _ = ovq_chunked(*(t.double() for t in (q, k, v, beta)), cfg)
    assert rel_rms_error(o, ref) <= _tol(torch.float32)


def test_forward_bf16_within_bf16_tolerance():
    cfg = OVQConfig(dict_size=N, chunk_size=L)
    q, k, v, beta = _inputs(75, torch.bfloat16, seed=5)
    o = ovq_forward_triton(q, k, v, beta, cfg, block_slots=16)[0]
    ref, _ = ovq_chunked(*(t.double() for t in (q, k, v, beta)), cfg)
    assert o.dtype == torch.bfloat16
    assert rel_rms_error(o, ref) <= _tol(torch.bfloat16)


@pytest.mark.parametrize(("growth", "init", "normalize", "through"), [
    ("saturating", "spread", True, True), ("saturating", "random", False, True),
    ("full", "spread", True, True), ("dp", "spread", True, False), ("linear", "random", True, False)])
def test_backward_matches_reference_autograd(growth, init, normalize, through):
    cfg = OVQConfig(dict_size=N, chunk_size=L, growth=growth, init=init, alpha=8.0, rate=0.5,
                    normalize_centroids=normalize, grad_through_state=through)
    base = _inputs(75, torch.float32, seed=21)
    do = torch.randn(B, H, 75, D, generator=torch.Generator().manual_seed(22)).to(DEVICE)
    ins = [t.clone().requires_grad_() for t in base]
    ovq_core_triton(*ins, cfg).backward(do)
    refs = [t.double().clone().requires_grad_() for t in base]
    ovq_chunked(*refs, cfg)[0].backward(do.double())
    for name, got, want in zip(("q", "k", "v", "beta"), ins, refs, strict=True):
        err = rel_rms_error(got.grad, want.grad)
        assert err <= 1e-4, f"d{name}: rel error {err:.2e}"


def test_backward_bf16_within_bf16_tolerance():
    cfg = OVQConfig(dict_size=N, chunk_size=L)
    base = _inputs(64, torch.bfloat16, seed=31)
    do = torch.randn(B, H, 64, D, generator=torch.Generator().manual_seed(32)).to(DEVICE, torch.bfloat16)
    ins = [t.clone().requires_grad_() for t in base]
    ovq_core_triton(*ins, cfg).backward(do)
    refs = [t.double().clone().requires_grad_() for t in base]
    ovq_chunked(*refs, cfg)[0].backward(do.double())
    for got, want in zip(ins[:3], refs[:3], strict=True):
        assert rel_rms_error(got.grad, want.grad) <= tolerance_for(torch.bfloat16)


@pytest.mark.parametrize("prefix", [0, 5, 16, 40, 74])
@pytest.mark.parametrize("normalize", [True, False])
def test_decode_kernel_matches_reference_read(prefix, normalize):
    cfg = OVQConfig(dict_size=N, chunk_size=L, normalize_centroids=normalize)
    q, k, v, beta = _inputs(75, torch.float32, seed=41)
    _, st = ovq_chunked(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], beta, cfg)
    qt, kt, vt = q[:, :, prefix], k[:, :, prefix], v[:, :, prefix]
    o = ovq_decode_triton(qt, kt, vt, beta, st.keys, st.values, st.counts, st.active, st.buf_k, st.buf_v,
                          st.buf_len, normalize, block_slots=16)
    n, j = st.active, st.buf_len
    ref = read(qt[:, :, None], torch.cat([st.buf_k[:, :, :j], kt[:, :, None]], 2),
               torch.cat([st.buf_v[:, :, :j], vt[:, :, None]], 2), beta, centroid_keys(st.keys[:, :, :n], cfg),
               st.values[:, :, :n], st.counts[:, :, :n])[:, :, 0]
    assert rel_rms_error(o, ref) <= _tol(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("growth", ["saturating", "full"])
def test_layer_triton_matches_reference_and_streams(dtype, growth):
    torch.manual_seed(52)
    opts = dict(dict_size=N, chunk_size=L, growth=growth)
    ref = OVQAttention(64, 2, 32, OVQOptions(impl="reference", **opts)).to(DEVICE, dtype)
    tri = OVQAttention(64, 2, 32, OVQOptions(impl="triton", **opts)).to(DEVICE, dtype)
    tri.load_state_dict(ref.state_dict())
    assert tri.implementation() == "triton" and ref.implementation() == "torch-chunked"
    x = torch.randn(2, 75, 64, generator=torch.Generator().manual_seed(51)).to(DEVICE, dtype)
    with torch.no_grad():
        full = tri(x)
        assert rel_rms_error(full, ref(x)) <= tolerance_for(dtype)
        y, state = tri.prefill(x[:, :37])
        outs = [y]
        for t in range(37, 75):  # crosses two flushes
            y_t, state = tri.step(x[:, t : t + 1], state)
            outs.append(y_t)
    assert rel_rms_error(torch.cat(outs, dim=1), full) <= tolerance_for(dtype)
    assert state.written == 64 and state.active == active_after(tri.config, 75)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_triton_gradients_match_reference(dtype):
    """Through the whole layer (projections, unit_norm, kernels, gradients stored in the layer dtype)."""
    torch.manual_seed(53)
    opts = dict(dict_size=N, chunk_size=L, learn_beta=True)
    ref = OVQAttention(64, 2, 32, OVQOptions(impl="reference", **opts)).to(DEVICE, dtype)
    tri = OVQAttention(64, 2, 32, OVQOptions(impl="triton", **opts)).to(DEVICE, dtype)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 70, 64, generator=torch.Generator().manual_seed(54)).to(DEVICE, dtype)
    w = torch.randn(2, 70, 64, generator=torch.Generator().manual_seed(55)).to(DEVICE, dtype)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    (tri(xs[0]).float() * w.float()).sum().backward()
    (ref(xs[1]).float() * w.float()).sum().backward()
    tol = tolerance_for(dtype)
    assert xs[0].grad.dtype == dtype and rel_rms_error(xs[0].grad, xs[1].grad) <= tol
    for (name, got), want in zip(tri.named_parameters(), ref.parameters(), strict=True):
        assert rel_rms_error(got.grad, want.grad) <= tol, name


def test_layer_triton_forward_saves_each_activation_once():
    """What autograd keeps from the layer's forward, in bf16 [B, T, H*dh]-sized storages: x, raw q and k, v,
    and o (5: the kernel writes o in [B, T, H, dv] memory, so o_proj's input is a view of it); no float32
    copies and no second (unit-norm) copy of q and k."""
    opts = OVQOptions(impl="triton", dict_size=N, chunk_size=L)
    layer = OVQAttention(64, 2, 32, opts).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, 70, 64, generator=torch.Generator().manual_seed(56)).to(DEVICE, torch.bfloat16)
    saved = saved_storage_bytes(layer, x.requires_grad_())
    unit = x.numel() * 2
    assert saved.count(unit) == 5
    assert not [b for b in saved if b == 2 * unit]  # a float32 copy of an activation


def test_layer_rejects_triton_for_unsupported_shapes():
    from ovqprof.layers.base import LayerConfigError

    with pytest.raises(LayerConfigError, match="impl"):
        OVQAttention(64, 2, 32, OVQOptions(impl="triton", chunk_size=5))
    with pytest.raises(LayerConfigError, match="impl"):
        OVQAttention(64, 2, 32, OVQOptions(impl="triton", lr="constant"))
    # auto falls back to the reference where the kernels do not apply
    assert OVQAttention(64, 2, 32, OVQOptions(chunk_size=5)).implementation() == "torch-chunked"
