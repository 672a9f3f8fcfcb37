"""The OVQ-attention PyTorch reference (the ground truth for the kernels): identities the README's
"How OVQ-attention works here" states (full growth is causal softmax attention, decode reproduces the forward,
counts sum to the tokens written, growth follows its formula)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovqprof.kernels.ovq import OVQConfig, active_after, empty_state, growth_target, ovq_chunked, ovq_step
from ovqprof.kernels.ovq.reference import write
from ovqprof.layers.base import tensor_bytes
from ovqprof.layers.ovq import OVQAttention, OVQOptions
from ovqprof.tolerances import rel_rms_error, tolerance_for


def _qkv(B, H, T, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, d, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, H, T, d, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    beta = 2.0 + torch.rand(H, generator=g, dtype=torch.float64) * 4
    return q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype)


def _softmax_attention(q, k, v, beta):
    T = q.shape[2]
    s = beta.view(1, -1, 1, 1) * (q @ k.transpose(-1, -2))
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("T", "L"), [(37, 5), (40, 8), (33, 1), (20, 64), (64, 16)])
def test_full_growth_is_exact_softmax_attention(dtype, T, L):
    q, k, v, beta = _qkv(2, 3, T, 16, dtype, seed=T + L)
    o, state = ovq_chunked(q, k, v, beta, OVQConfig(dict_size=T, chunk_size=L, growth="full"))
    assert rel_rms_error(o, _softmax_attention(q, k, v, beta)) <= tolerance_for(dtype)
    assert state.active == (T // L) * L and state.buf_len == T % L


@pytest.mark.parametrize("growth", ["saturating", "dp", "linear", "full"])
@pytest.mark.parametrize("init", ["spread", "random"])
@pytest.mark.parametrize("lr", ["adaptive", "constant"])
@pytest.mark.parametrize("prefix", [0, 7, 10])
def test_streaming_decode_equals_chunked_forward(growth, init, lr, prefix):
    cfg = OVQConfig(dict_size=12, chunk_size=5, growth=growth, init=init, lr=lr, alpha=4.0, rate=0.5, seed=1)
    q, k, v, beta = _qkv(2, 2, 33, 8, seed=3)
    full, final = ovq_chunked(q, k, v, beta, cfg)
    if prefix:
        o_prefix, state = ovq_chunked(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], beta, cfg)
        outs = [o_prefix]
    else:
        outs, state = [], empty_state(2, 2, 8, 8, cfg, dtype=q.dtype, device="cpu")
    for t in range(prefix, 33):
        o_t, state = ovq_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], beta, cfg, state)
        outs.append(o_t)
    assert rel_rms_error(torch.cat(outs, dim=2), full) <= 1e-12
    assert state.active == final.active and state.written == final.written
    assert torch.allclose(state.keys, final.keys) and torch.equal(state.counts, final.counts)


def test_step_is_idempotent_and_leaves_its_input_state_alone():
    cfg = OVQConfig(dict_size=12, chunk_size=5)
    q, k, v, beta = _qkv(1, 2, 14, 8, seed=4)
    _, state = ovq_chunked(q[:, :, :9], k[:, :, :9], v[:, :, :9], beta, cfg)  # 4 buffered: next step flushes
    before = (state.keys.clone(), state.counts.clone(), state.buf_len, state.active)
    args = (q[:, :, 9:10], k[:, :, 9:10], v[:, :, 9:10], beta, cfg, state)
    o1, s1 = ovq_step(*args)
    o2, s2 = ovq_step(*args)
    assert torch.equal(o1, o2) and torch.equal(s1.keys, s2.keys) and s1.written == 10
    assert torch.equal(state.keys, before[0]) and torch.equal(state.counts, before[1])
    assert (state.buf_len, state.active) == before[2:]


@pytest.mark.parametrize("growth", ["saturating", "full"])
def test_gradcheck_through_reads_and_running_means(growth):
    cfg = OVQConfig(dict_size=5, chunk_size=3, growth=growth)
    q, k, v, beta = _qkv(1, 2, 10, 4, seed=5)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]

    def f(q_, k_, v_):
        return ovq_chunked(q_, k_, v_, beta, cfg)[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_without_grad_through_state_earlier_chunks_get_no_gradient_from_later_reads():
    q, k, v, beta = _qkv(1, 2, 12, 4, seed=6)
    grads = {}
    for through in (True, False):
        cfg = OVQConfig(dict_size=6, chunk_size=4, grad_through_state=through)
        kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
        o, _ = ovq_chunked(q, kk, vv, beta, cfg)
        o[:, :, 8:].sum().backward()  # the last chunk's outputs only
        grads[through] = (kk.grad[:, :, :8].abs().max().item(), vv.grad[:, :, :8].abs().max().item())
    assert grads[False] == (0.0, 0.0)
    assert min(grads[True]) > 0


@pytest.mark.parametrize("growth", ["saturating", "dp", "linear", "full"])
def test_counts_sum_to_tokens_written_and_active_never_exceeds_n(growth):
    cfg = OVQConfig(dict_size=10, chunk_size=4, growth=growth, alpha=3.0, rate=0.75)
    q, k, v, beta = _qkv(2, 2, 50, 8, seed=7)
    for T in (3, 4, 17, 50):
        _, st = ovq_chunked(q[:, :, :T], k[:, :, :T], v[:, :, :T], beta, cfg)
        assert torch.equal(st.counts.sum(-1), torch.full((2, 2), float(st.written), dtype=st.counts.dtype))
        assert st.active == active_after(cfg, T) <= 10
        assert int((st.counts > 0).sum(-1).min()) == st.active  # every active slot holds a token


def test_growth_schedules_follow_their_formulas():
    N, t = 1024, 4096
    assert growth_target(OVQConfig(dict_size=N), t) == pytest.approx(N * t / (N + t))
    assert growth_target(OVQConfig(growth="dp", alpha=50.0), t) == pytest.approx(50 * math.log(1 + t / 50))
    assert growth_target(OVQConfig(growth="linear", rate=0.25), t) == pytest.approx(1024)
    assert active_after(OVQConfig(dict_size=N, chunk_size=64), 64) == math.floor(N * 64 / (N + 64))
    assert active_after(OVQConfig(dict_size=N, chunk_size=64), 63) == 0  # a partial chunk is not written
    assert active_after(OVQConfig(dict_size=100, growth="full", chunk_size=64), 1 << 20) == 100


def test_merge_does_not_depend_on_token_order_within_a_chunk():
    cfg = OVQConfig(dict_size=6, chunk_size=8, growth="full")
    q, k, v, beta = _qkv(1, 2, 64, 8, seed=8)
    _, st = ovq_chunked(q[:, :, :56], k[:, :, :56], v[:, :, :56], beta, cfg)
    assert st.active == 6  # full dictionary: the next chunk only merges
    n, c = st.active, 56 // 8
    args = (st.keys[:, :, :n], st.values[:, :, :n], st.counts[:, :, :n], cfg, c)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    a = write(k[:, :, 56:], v[:, :, 56:], *args)
    b = write(k[:, :, 56:][:, :, perm], v[:, :, 56:][:, :, perm], *args)
    for x, y in zip(a[:3], b[:3], strict=True):
        assert torch.allclose(x, y, atol=1e-12)


def test_random_init_is_seeded():
    q, k, v, beta = _qkv(1, 2, 40, 8, seed=9)
    states = [ovq_chunked(q, k, v, beta, OVQConfig(dict_size=10, chunk_size=8, init="random", seed=s))[1]
              for s in (1, 1, 2)]
    assert torch.equal(states[0].keys, states[1].keys)
    assert not torch.equal(states[0].keys, states[2].keys)


def test_layer_state_bytes_match_the_state_and_stay_constant():
    layer = OVQAttention(64, 2, 16, OVQOptions(dict_size=20, chunk_size=8))
    for T in (5, 16, 45):
        _, state = layer.prefill(torch.randn(2, T, 64))
        assert layer.state_bytes(2, T) == tensor_bytes(state) == layer.state_bytes(2, 10 * T)
    big = OVQAttention(2048, 16, 128, OVQOptions())
    ratio = big.cost("fwd", 1, 16384).flops / big.cost("fwd", 1, 4096).flops
    assert 3.5 < ratio < 4.6  # linear in T once the dictionary saturates
    assert big.cost("decode", 1, 65536).bytes < 1.5 * big.cost("decode", 1, 8192).bytes


def test_layer_growth_full_matches_softmax_attention_on_its_projections():
    torch.manual_seed(0)
    layer = OVQAttention(32, 2, 8, OVQOptions(dict_size=64, chunk_size=4, growth="full")).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    q, k, v = layer.project(x)
    o = _softmax_attention(q, k, v, layer.beta.double())
    want = layer.o_proj(o.transpose(1, 2).reshape(2, 23, 16))
    assert rel_rms_error(layer(x), want) <= tolerance_for(torch.float64)
    assert layer.beta[0].item() == pytest.approx(math.sqrt(8))


def test_learned_beta_gets_a_gradient():
    layer = OVQAttention(32, 2, 8, OVQOptions(dict_size=8, chunk_size=4, learn_beta=True))
    layer(torch.randn(1, 12, 32)).square().sum().backward()
    assert layer.beta.grad is not None and layer.beta.grad.abs().min() > 0
