"""OVQ-attention (issue 3): the layer and the core against their "done when" items, beyond the core identities
in test_ovq_reference.py: the layer's softmax identity on its own projections, layer decode for every option
combination, gradients of beta, detached state through the layer, schedule values by hand, merge order with
every update rule, seeds, state bytes and cost, option errors through the spec loader, the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from ovqprof.cli import app
from ovqprof.errors import SpecError
from ovqprof.kernels.ovq import (
    OVQConfig,
    active_after,
    empty_state,
    growth_target,
    ovq_chunked,
    ovq_step,
    spawn_count,
)
from ovqprof.kernels.ovq.reference import choose_spawn, read, write
from ovqprof.layers.base import tensor_bytes
from ovqprof.layers.ovq import OVQAttention, OVQOptions
from ovqprof.registry import build_layer, get_layer_type
from ovqprof.spec import load_spec, load_spec_text
from ovqprof.tolerances import assert_close_rel, rel_rms_error

ROOT = Path(__file__).resolve().parent.parent
GROWTHS = ["saturating", "dp", "linear", "full"]
# Small schedules that spawn and merge within a few chunks of 3-5 tokens.
SMALL = dict(alpha=3.0, rate=0.5)


def _qkv(B, H, T, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, d, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, H, T, d, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    beta = 1.5 + 3 * torch.rand(H, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype)


def _layer(dtype=torch.float64, d_model=16, heads=2, head_dim=4, weight_seed=0, **opts) -> OVQAttention:
    torch.manual_seed(weight_seed)
    return OVQAttention(d_model, heads, head_dim, OVQOptions(**opts)).to(dtype)


def _x(B, T, d_model=16, dtype=torch.float64, seed=1):
    return torch.randn(B, T, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _build(spec) -> OVQAttention:
    """The layer a spec entry describes (what the sweep builds)."""
    return build_layer(get_layer_type(spec.type), spec.d_model, spec.heads, spec.head_dim, spec.options)


def _naive_layer_softmax(layer: OVQAttention, x: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention with scale beta on the layer's own weights, per head, no positional encoding."""
    B, T, _ = x.shape
    H, dh = layer.heads, layer.head_dim
    x64 = x.double()

    def heads(w: torch.Tensor) -> torch.Tensor:
        return (x64 @ w.double().t()).view(B, T, H, dh).transpose(1, 2)

    q = F.normalize(heads(layer.q_proj.weight), dim=-1)
    k = F.normalize(heads(layer.k_proj.weight), dim=-1)
    v = heads(layer.v_proj.weight)
    outs = []
    for h in range(H):
        s = layer.beta[h].double() * (q[:, h] @ k[:, h].transpose(-1, -2))
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
        outs.append(torch.softmax(s, dim=-1) @ v[:, h])
    o = torch.stack(outs, dim=2).reshape(B, T, H * dh)
    return o @ layer.o_proj.weight.double().t()


# --- growth: full and N >= T is exact causal softmax attention ------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("T", "L", "N"), [(1, 4, 1), (13, 4, 13), (29, 1, 40), (9, 16, 9), (24, 6, 30)])
def test_layer_with_full_growth_is_softmax_attention_on_its_projections(dtype, T, L, N):
    layer = _layer(dtype, dict_size=N, chunk_size=L, growth="full", beta=2.5)
    x = _x(2, T, dtype=dtype, seed=T)
    with torch.no_grad():
        y = layer(x)
        assert y.dtype == dtype
        assert_close_rel(y, _naive_layer_softmax(layer, x), dtype)
        # prefill returns the same outputs, and every written token owns a slot of count 1
        y_pre, state = layer.prefill(x)
    assert_close_rel(y_pre, y, dtype)
    assert state.active == (T // L) * L
    assert torch.equal(state.counts[:, :, : state.active], torch.ones_like(state.counts[:, :, : state.active]))


@pytest.mark.parametrize(("T", "L"), [(17, 4), (21, 7)])
def test_split_chunked_forward_equals_one_call(T, L):
    """The result does not depend on how the chunked forward is split (at chunk boundaries)."""
    cfg = OVQConfig(dict_size=6, chunk_size=L, **SMALL)
    q, k, v, beta = _qkv(2, 2, T, 6, seed=11)
    whole, final = ovq_chunked(q, k, v, beta, cfg)
    cut = 2 * L
    first, mid = ovq_chunked(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], beta, cfg)
    second, end = ovq_chunked(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], beta, cfg, mid)
    assert rel_rms_error(torch.cat([first, second], dim=2), whole) <= 1e-13
    assert (end.active, end.written, end.buf_len) == (final.active, final.written, final.buf_len)
    assert torch.allclose(end.keys, final.keys, atol=1e-13) and torch.equal(end.counts, final.counts)


def test_chunked_forward_refuses_a_state_with_a_partial_buffer():
    cfg = OVQConfig(dict_size=6, chunk_size=4)
    q, k, v, beta = _qkv(1, 2, 6, 4, seed=12)
    _, state = ovq_chunked(q, k, v, beta, cfg)
    with pytest.raises(ValueError, match="empty buffer"):
        ovq_chunked(q, k, v, beta, cfg, state)


# --- the read, the merge and the spawn against their definitions -------------------------------------------
def test_read_weights_a_slot_like_count_copies_of_its_token():
    """p(i | q) proportional to c_i exp(beta q.D_k[i]): a slot of count c reads like c identical tokens."""
    q, k, v, beta = _qkv(2, 2, 5, 4, seed=21)
    _, dk, dv, _ = _qkv(2, 2, 3, 4, seed=22)
    counts = torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64).expand(2, 2, 3)
    o = read(q, k, v, beta, dk, dv, counts)
    reps = torch.tensor([1, 4, 2])
    dup_k, dup_v = dk.repeat_interleave(reps, dim=2), dv.repeat_interleave(reps, dim=2)  # 7 tokens
    s_dict = beta.view(1, -1, 1, 1) * (q @ dup_k.transpose(-1, -2))
    s_local = beta.view(1, -1, 1, 1) * (q @ k.transpose(-1, -2))
    s_local = s_local.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf)
    p = torch.softmax(torch.cat([s_dict, s_local], dim=-1), dim=-1)
    assert rel_rms_error(o, p[..., :7] @ dup_v + p[..., 7:] @ v) <= 1e-14
    # no slots: plain causal attention over the local keys
    assert rel_rms_error(read(q, k, v, beta, dk[:, :, :0], dv[:, :, :0], counts[:, :, :0]),
                         torch.softmax(s_local, dim=-1) @ v) <= 1e-14


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("growth", ["saturating", "dp", "linear"])
def test_adaptive_slots_are_the_means_of_every_token_ever_assigned(growth, normalize):
    """With lr: adaptive, chunk by chunk running means equal the plain mean of the tokens each slot received."""
    L, C, N = 4, 9, 6
    cfg = OVQConfig(dict_size=N, chunk_size=L, growth=growth, normalize_centroids=normalize, **SMALL)
    _, k, v, _ = _qkv(2, 2, L * C, 5, seed=23)
    keys, values, counts = k[:, :, :0], v[:, :, :0], k.new_zeros(2, 2, 0)
    slots = []
    for c in range(C):
        keys, values, counts, z = write(k[:, :, c * L : (c + 1) * L], v[:, :, c * L : (c + 1) * L], keys, values,
                                        counts, cfg, c)
        slots.append(z)
    z = torch.cat(slots, dim=-1)  # [B, H, T]: the slot of every token
    n = keys.shape[2]
    assert n == active_after(cfg, L * C) and int(z.max()) == n - 1
    onehot = F.one_hot(z, n).double()  # [B, H, T, n]
    hits = onehot.sum(2)
    assert torch.equal(counts, hits)
    assert torch.allclose(keys, onehot.transpose(-1, -2) @ k / hits.unsqueeze(-1), atol=1e-14)
    assert torch.allclose(values, onehot.transpose(-1, -2) @ v / hits.unsqueeze(-1), atol=1e-14)


@pytest.mark.parametrize("normalize", [True, False])
def test_each_chunk_reads_the_dictionary_written_before_it(normalize):
    """Chunk c's outputs are `read` over the state after c chunks, with D_k = Mk / |Mk| or the raw means Mk."""
    L = 4
    cfg = OVQConfig(dict_size=3, chunk_size=L, normalize_centroids=normalize, growth="linear", rate=0.25)
    q, k, v, beta = _qkv(2, 2, 3 * L, 4, seed=25)
    o, _ = ovq_chunked(q, k, v, beta, cfg)
    _, st = ovq_chunked(q[:, :, : 2 * L], k[:, :, : 2 * L], v[:, :, : 2 * L], beta, cfg)
    assert st.active == 2 and bool((st.counts[:, :, :2] > 1).any())  # merged slots: |Mk| < 1
    n = st.active
    dict_k = F.normalize(st.keys[:, :, :n], dim=-1) if normalize else st.keys[:, :, :n]
    s = slice(2 * L, 3 * L)
    want = read(q[:, :, s], k[:, :, s], v[:, :, s], beta, dict_k, st.values[:, :, :n], st.counts[:, :, :n])
    assert rel_rms_error(o[:, :, s], want) <= 1e-14
    other = OVQConfig(**{**cfg.__dict__, "normalize_centroids": not normalize})
    assert rel_rms_error(ovq_chunked(q, k, v, beta, other)[0][:, :, s], o[:, :, s]) > 1e-6


def test_constant_lr_steps_eta_towards_the_chunk_mean():
    N, L = 3, 5
    cfg = OVQConfig(dict_size=N, chunk_size=L, growth="full", lr="constant", eta=0.3)
    g = torch.Generator().manual_seed(24)
    keys = F.normalize(torch.randn(1, 1, N, 4, generator=g, dtype=torch.float64), dim=-1)
    values = torch.randn(1, 1, N, 4, generator=g, dtype=torch.float64)
    counts = torch.tensor([[[2.0, 5.0, 1.0]]], dtype=torch.float64)
    k = F.normalize(keys[:, :, [0, 0, 1, 0, 1]] + 0.05 * torch.randn(1, 1, L, 4, generator=g), dim=-1)
    v = torch.randn(1, 1, L, 4, generator=g, dtype=torch.float64)
    new_k, new_v, new_c, z = write(k, v, keys, values, counts, cfg, 1)
    assert z.tolist() == [[[0, 0, 1, 0, 1]]]
    assert new_c.tolist() == [[[5.0, 7.0, 1.0]]]
    for slot, tokens in ((0, [0, 1, 3]), (1, [2, 4])):
        want_k = keys[0, 0, slot] + 0.3 * (k[0, 0, tokens].mean(0) - keys[0, 0, slot])
        want_v = values[0, 0, slot] + 0.3 * (v[0, 0, tokens].mean(0) - values[0, 0, slot])
        assert torch.allclose(new_k[0, 0, slot], want_k, atol=1e-15)
        assert torch.allclose(new_v[0, 0, slot], want_v, atol=1e-15)
    assert torch.equal(new_k[0, 0, 2], keys[0, 0, 2]) and torch.equal(new_v[0, 0, 2], values[0, 0, 2])


def test_spread_init_picks_the_keys_farthest_from_the_dictionary_and_each_other():
    cfg = OVQConfig(dict_size=8, chunk_size=6)
    basis = torch.eye(4, dtype=torch.float64)
    a, b, c, d = basis
    k = torch.stack([a, a, b, a, c, b]).view(1, 1, 6, 4)
    # empty dictionary: the first pick is position 0 (ties), then the farthest from it, then from both
    assert choose_spawn(k, k[:, :, :0], 3, cfg, 0).tolist() == [[[0, 2, 4]]]
    # a dictionary holding b and c: the a's are farthest; then nothing new is left, ties go to the lowest position
    dictionary = torch.stack([b, c]).view(1, 1, 2, 4)
    assert choose_spawn(k, dictionary, 2, cfg, 0).tolist() == [[[0, 1]]]
    k2 = torch.stack([a, a, d, b, a, c]).view(1, 1, 6, 4)
    assert choose_spawn(k2, dictionary, 2, cfg, 0).tolist() == [[[0, 2]]]


# --- streaming decode equals the chunked forward ----------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lr", ["adaptive", "constant"])
@pytest.mark.parametrize("init", ["spread", "random"])
@pytest.mark.parametrize("growth", GROWTHS)
def test_layer_decode_equals_forward(growth, init, lr, normalize):
    L, T = 4, 23
    layer = _layer(dict_size=6, chunk_size=L, growth=growth, init=init, lr=lr, normalize_centroids=normalize,
                   weight_seed=3, seed=2, **SMALL)
    x = _x(2, T, seed=4)
    with torch.no_grad():
        expected = layer(x)
        _, final = layer.prefill(x)
        for prefix in (0, 5, 8, 13):  # empty, odd, a multiple of L, odd with several chunks written
            y, state = layer.prefill(x[:, :prefix])
            outs = [y]
            for t in range(prefix, T):
                y_t, state = layer.step(x[:, t : t + 1], state)
                outs.append(y_t)
            assert_close_rel(torch.cat(outs, dim=1), expected, torch.float64)
            assert (state.active, state.written, state.buf_len) == (final.active, final.written, final.buf_len)
            assert torch.equal(state.counts, final.counts)
            assert torch.allclose(state.keys, final.keys, atol=1e-12)
            assert torch.allclose(state.values, final.values, atol=1e-12)
            assert torch.allclose(state.buf_k[:, :, : state.buf_len], final.buf_k[:, :, : final.buf_len])


@pytest.mark.parametrize("growth", GROWTHS)
def test_core_decode_from_an_empty_state_without_normalised_centroids(growth):
    cfg = OVQConfig(dict_size=7, chunk_size=3, growth=growth, normalize_centroids=False, lr="constant",
                    eta=0.3, **SMALL)
    q, k, v, beta = _qkv(1, 3, 20, 5, seed=13)
    full, final = ovq_chunked(q, k, v, beta, cfg)
    state = empty_state(1, 3, 5, 5, cfg, dtype=q.dtype, device="cpu")
    outs = []
    for t in range(20):
        o_t, state = ovq_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], beta, cfg, state)
        outs.append(o_t)
    assert rel_rms_error(torch.cat(outs, dim=2), full) <= 1e-12
    assert torch.allclose(state.values, final.values, atol=1e-12) and state.written == final.written == 18


# --- step idempotence ------------------------------------------------------------------------------------
def _snapshot(state):
    return [t.clone() for t in (state.keys, state.values, state.counts, state.buf_k, state.buf_v)], (
        state.active, state.written, state.buf_len)


@pytest.mark.parametrize(("prefix", "flushes"), [(5, False), (7, True), (8, False), (0, False)])
def test_layer_step_is_idempotent_and_keeps_the_input_state(prefix, flushes):
    L = 4
    layer = _layer(dict_size=5, chunk_size=L, init="random", weight_seed=5)
    x = _x(2, prefix + 1, seed=6)
    with torch.no_grad():
        _, state = layer.prefill(x[:, :prefix])
        tensors, scalars = _snapshot(state)
        y1, s1 = layer.step(x[:, prefix:], state)
        y2, s2 = layer.step(x[:, prefix:], state)
    assert (s1.buf_len == 0) == flushes and s1.written == (prefix + 1) // L * L
    assert torch.equal(y1, y2)
    for a, b in zip((s1.keys, s1.values, s1.counts), (s2.keys, s2.values, s2.counts), strict=True):
        assert torch.equal(a, b)
    assert (s1.active, s1.written, s1.buf_len) == (s2.active, s2.written, s2.buf_len)
    # the input state still describes the first `prefix` tokens: dictionary untouched, buffer rows kept
    after, after_scalars = _snapshot(state)
    assert after_scalars == scalars
    for i, (before_t, after_t) in enumerate(zip(tensors, after, strict=True)):
        if i < 3:
            assert torch.equal(before_t, after_t)
        else:
            assert torch.equal(before_t[:, :, : state.buf_len], after_t[:, :, : state.buf_len])


# --- gradients -------------------------------------------------------------------------------------------
def _merges_and_spawns(cfg: OVQConfig, T: int) -> bool:
    """Some full chunk both spawns a slot and merges a token into an existing one."""
    return any(0 < spawn_count(cfg, c)[1] < cfg.chunk_size for c in range(T // cfg.chunk_size))


@pytest.mark.parametrize(("growth", "lr", "normalize"), [
    ("dp", "adaptive", True), ("linear", "constant", True), ("saturating", "adaptive", False),
    ("full", "constant", False),
])
def test_gradcheck_q_k_v_and_beta(growth, lr, normalize):
    cfg = OVQConfig(dict_size=4 if growth == "full" else 5, chunk_size=3, growth=growth, lr=lr, eta=0.4,
                    normalize_centroids=normalize, alpha=2.0, rate=0.5)
    T = 10
    assert _merges_and_spawns(cfg, T) or growth == "full"
    assert active_after(cfg, T) < T  # the dictionary is not one slot per token: merges happened
    q, k, v, beta = _qkv(1, 2, T, 4, seed=14)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, beta)]

    def f(q_, k_, v_, beta_):
        return ovq_chunked(q_, k_, v_, beta_, cfg)[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_learned_beta_gradient_matches_finite_differences():
    layer = _layer(dict_size=5, chunk_size=3, learn_beta=True, beta=2.0, weight_seed=7)
    assert isinstance(layer.beta, torch.nn.Parameter)
    x = _x(1, 11, seed=8)
    w = torch.randn(1, 11, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (layer(x) * w).sum()

    loss().backward()
    grad = layer.beta.grad.clone()
    assert grad.abs().min() > 0
    eps = 1e-6
    for h in range(layer.heads):
        with torch.no_grad():
            layer.beta[h] += eps
            up = loss().item()
            layer.beta[h] -= 2 * eps
            down = loss().item()
            layer.beta[h] += eps
        assert grad[h].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_fixed_beta_is_a_buffer_not_a_parameter():
    layer = _layer(dict_size=5, chunk_size=3)
    assert not any(p is layer.beta for p in layer.parameters())
    assert layer.beta.tolist() == pytest.approx([2.0, 2.0])  # sqrt(head_dim = 4)


@pytest.mark.parametrize("through", [True, False])
def test_layer_without_grad_through_state_cuts_gradients_at_chunk_boundaries(through):
    L, T = 4, 14  # chunks 0-3, 4-7, 8-11 written; 12-13 are the last (partial) chunk
    layer = _layer(dict_size=5, chunk_size=L, grad_through_state=through, weight_seed=10)
    x = _x(1, T, seed=11).requires_grad_()
    layer(x)[:, 12:].sum().backward()
    earlier = x.grad[:, :12].abs().amax(dim=-1).squeeze(0)  # per token
    if through:
        assert (earlier > 0).all()
    else:
        assert torch.count_nonzero(earlier) == 0
    assert (x.grad[:, 12:].abs().amax(dim=-1) > 0).all()


# --- counts, active slots and schedules ------------------------------------------------------------------
@pytest.mark.parametrize("lr", ["adaptive", "constant"])
@pytest.mark.parametrize("growth", GROWTHS)
def test_decode_states_keep_counts_equal_to_tokens_written(growth, lr):
    cfg = OVQConfig(dict_size=6, chunk_size=3, growth=growth, lr=lr, **SMALL)
    q, k, v, _ = _qkv(2, 2, 31, 4, seed=15)
    beta = torch.full((2,), 3.0, dtype=torch.float64)
    state = empty_state(2, 2, 4, 4, cfg, dtype=torch.float64, device="cpu")
    for t in range(31):
        _, state = ovq_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], beta, cfg, state)
        assert state.tokens == t + 1 and state.written == (t + 1) // 3 * 3
        assert torch.equal(state.counts.sum(-1), torch.full((2, 2), float(state.written), dtype=torch.float64))
        assert state.active == active_after(cfg, t + 1) <= 6
        assert bool((state.counts[:, :, : state.active] >= 1).all())
        assert not state.counts[:, :, state.active :].any() and not state.keys[:, :, state.active :].any()


def test_schedules_by_hand():
    assert growth_target(OVQConfig(dict_size=64), 64) == pytest.approx(32.0)
    assert growth_target(OVQConfig(dict_size=64), 192) == pytest.approx(48.0)
    assert growth_target(OVQConfig(growth="dp", alpha=10.0), 100) == pytest.approx(10 * math.log(11))
    assert growth_target(OVQConfig(growth="linear", rate=0.25), 40) == pytest.approx(10.0)
    assert growth_target(OVQConfig(growth="full"), 37) == 37.0
    # active_after: floor of g at the last chunk boundary, capped at N, at least 1 once a chunk is written
    assert active_after(OVQConfig(dict_size=64, chunk_size=16), 200) == 48  # 192 written: 64*192/256
    assert active_after(OVQConfig(growth="dp", alpha=10.0, chunk_size=10), 109) == 23  # 10 ln 11 = 23.98
    assert active_after(OVQConfig(growth="linear", rate=0.1, chunk_size=5), 30) == 3  # 0.1 * 30 = 3.0000000004
    assert active_after(OVQConfig(growth="linear", rate=0.7, chunk_size=10), 10) == 7
    assert active_after(OVQConfig(growth="full", dict_size=8, chunk_size=4), 100) == 8
    assert active_after(OVQConfig(dict_size=1024, chunk_size=1), 1) == 1  # floor(1024/1025) = 0 -> 1
    assert active_after(OVQConfig(chunk_size=64), 0) == active_after(OVQConfig(chunk_size=64), 63) == 0


@pytest.mark.parametrize("growth", GROWTHS)
@pytest.mark.parametrize("L", [1, 3, 64])
@pytest.mark.parametrize("N", [1, 7, 1024])
def test_spawn_counts_are_consistent_and_at_most_one_chunk(growth, L, N):
    cfg = OVQConfig(dict_size=N, chunk_size=L, growth=growth, alpha=5.0, rate=0.3)
    previous = 0
    for c in range(300):
        n, m = spawn_count(cfg, c)
        assert n == previous and 0 <= m <= L
        assert n + m == active_after(cfg, (c + 1) * L) <= min(N, (c + 1) * L)
        previous = n + m
    assert previous >= 1


# --- merges do not depend on token order -----------------------------------------------------------------
@pytest.mark.parametrize("lr", ["adaptive", "constant"])
@pytest.mark.parametrize("normalize", [True, False])
def test_merge_into_a_full_dictionary_is_permutation_invariant(lr, normalize):
    N, L, d = 5, 9, 6
    cfg = OVQConfig(dict_size=N, chunk_size=L, growth="full", lr=lr, eta=0.25, normalize_centroids=normalize)
    chunk_index = 3
    assert spawn_count(cfg, chunk_index) == (N, 0)  # dictionary full: nothing spawns, every token merges
    g = torch.Generator().manual_seed(16)
    keys = torch.randn(2, 3, N, d, generator=g, dtype=torch.float64)
    values = torch.randn(2, 3, N, d, generator=g, dtype=torch.float64)
    counts = torch.randint(1, 9, (2, 3, N), generator=g).double()
    _, k, v, _ = _qkv(2, 3, L, d, seed=17)
    perm = torch.randperm(L, generator=g)
    a = write(k, v, keys, values, counts, cfg, chunk_index)
    b = write(k[:, :, perm], v[:, :, perm], keys, values, counts, cfg, chunk_index)
    assert torch.equal(a[3][:, :, perm], b[3])  # each token goes to the same slot
    assert torch.equal(a[2], b[2]) and a[2].sum() == counts.sum() + 2 * 3 * L
    for x, y in zip(a[:2], b[:2], strict=True):
        assert torch.allclose(x, y, rtol=0, atol=1e-14)


# --- seeds -----------------------------------------------------------------------------------------------
def test_layer_random_init_follows_its_seed_and_spread_ignores_it():
    x = _x(1, 40, seed=18)

    def state(**opts):
        with torch.no_grad():
            return _layer(dict_size=12, chunk_size=8, weight_seed=19, **opts).prefill(x)[1]

    same = [state(init="random", seed=s) for s in (3, 3, 4)]
    assert torch.equal(same[0].keys, same[1].keys) and torch.equal(same[0].counts, same[1].counts)
    assert not torch.equal(same[0].keys, same[2].keys)
    assert torch.equal(state(init="spread", seed=1).keys, state(init="spread", seed=2).keys)


# --- state bytes, active slots and cost ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_state_bytes_equal_the_state_tensors_for_every_length(dtype):
    layer = _layer(dtype, dict_size=6, chunk_size=4)
    expected = layer.state_bytes(3, 0)
    math_bytes = 8 if dtype == torch.float64 else 4  # half layers keep a float32 state
    assert expected == 3 * 2 * (6 * (2 * 4 + 1) + 3 * 2 * 4) * math_bytes
    x = _x(3, 30, dtype=dtype, seed=20)
    with torch.no_grad():
        for T in (0, 3, 4, 11, 17):
            _, state = layer.prefill(x[:, :T])
            assert state.keys.dtype == layer.accum_dtype
            assert layer.state_bytes(3, T) == expected == tensor_bytes(state) == layer.state_tensor_bytes(state)
            assert layer.active_slots(T) == state.active
            for t in range(T, T + 5):  # steps, one of which flushes, keep the size
                _, state = layer.step(x[:, t : t + 1], state)
                assert layer.state_tensor_bytes(state) == expected
                assert layer.active_slots(t + 1) == state.active



@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_empty_state_allocates_exactly_the_decode_state(dtype):
    # A decode from no tokens starts from empty_state: no more storage than the state it grows into, which
    # the prefill of the same tokens holds too (a fixed N slots and L - 1 buffer rows).
    layer = _layer(dtype, dict_size=6, chunk_size=4)
    state = empty_state(3, 2, 4, 4, layer.config, dtype=layer.accum_dtype, device="cpu")
    assert tensor_bytes(state) == layer.state_bytes(3, 0)
    x = _x(3, 9, dtype=dtype, seed=21)
    with torch.no_grad():
        for t in range(9):
            _, state = layer.step(x[:, t : t + 1], state)
            assert tensor_bytes(state) == layer.state_bytes(3, t + 1)
        _, prefilled = layer.prefill(x)
    assert tensor_bytes(prefilled) == tensor_bytes(state)

def test_cost_is_positive_linear_in_length_and_flat_for_decode():
    layer = OVQAttention(1024, 8, 128, OVQOptions(dict_size=1024, chunk_size=64))
    for mode in ("fwd", "bwd", "decode"):
        for T in (1, 63, 64, 1000, 4096):
            c = layer.cost(mode, 2, T)
            assert c.flops > 0 and c.bytes > 0
    assert layer.cost("bwd", 1, 4096).flops == pytest.approx(3 * layer.cost("fwd", 1, 4096).flops)
    fwd = [layer.cost("fwd", 1, T) for T in (4096, 16384)]
    assert 3.5 <= fwd[1].flops / fwd[0].flops <= 4.5
    dec = [layer.cost("decode", 1, T) for T in (8192, 65536)]
    assert 1 <= dec[1].flops / dec[0].flops < 1.1 and 1 <= dec[1].bytes / dec[0].bytes < 1.15
    full = OVQAttention(1024, 8, 128, OVQOptions(dict_size=1024, chunk_size=64, growth="full"))
    assert full.cost("decode", 1, 2048) == full.cost("decode", 1, 65536)  # saturated: exactly constant
    with pytest.raises(ValueError, match="unknown mode"):
        layer.cost("sideways", 1, 64)


# --- options: the spec loader, the registry, `ovqprof layers` ----------------------------------------------
SPEC = """\
defaults: {d_model: 64, heads: 2, head_dim: 32}
layers:
  - name: o
    type: ovq
    %s
"""


@pytest.mark.parametrize(("option", "field", "fragments"), [
    ("rate: 1.5", "rate", ["less than or equal to 1", "1.5", "float <= 1.0"]),
    ("eta: 0", "eta", ["greater than 0", "float > 0.0"]),
    ("growth: exponential", "growth", ["'exponential'", "'saturating', 'dp', 'linear' or 'full'"]),
    ("dict_size: 0", "dict_size", ["greater than or equal to 1", "int >= 1"]),
    ("chunk_size: 0", "chunk_size", ["greater than or equal to 1"]),
    ("init: kmeans", "init", ["'kmeans'", "'spread', 'random' or 'spread_topm'"]),
    ("assign: nearest", "assign", ["'nearest'", "'with_spawned' or 'chunk_start'"]),
    ("value_update: ema", "value_update", ["'ema'", "'mean' or 'delta'"]),
    ("lr: fast", "lr", ["'fast'", "'adaptive' or 'constant'"]),
    ("alpha: -2", "alpha", ["greater than 0"]),
    ("beta: 0", "beta", ["greater than 0"]),
    ("dict_sz: 8", "dict_sz", ["unknown option 'dict_sz'", "dict_size, chunk_size", "grad_through_state"]),
])
def test_invalid_ovq_options_fail_at_load_with_line_and_field(option, field, fragments):
    with pytest.raises(SpecError) as info:
        load_spec_text(SPEC % option, file="ovq.yaml")
    err, message = info.value, str(info.value)
    assert (err.file, err.line, err.field) == ("ovq.yaml", 5, f"layers[0].{field}"), message
    for fragment in fragments:
        assert fragment in message, message


def test_valid_ovq_options_build_the_configured_layer():
    spec = load_spec_text(SPEC % "growth: dp\n    alpha: 16\n    init: random\n    seed: 3\n    lr: constant\n"
                                 "    eta: 0.5\n    normalize_centroids: false\n    grad_through_state: false\n"
                                 "    dict_size: 32\n    chunk_size: 8\n    learn_beta: true")
    layer = _build(spec.layers[0])
    assert isinstance(layer, OVQAttention)
    assert layer.config == OVQConfig(dict_size=32, chunk_size=8, growth="dp", alpha=16.0, init="random", seed=3,
                                     lr="constant", eta=0.5, normalize_centroids=False, grad_through_state=False)
    assert isinstance(layer.beta, torch.nn.Parameter) and layer.implementation() == "torch-chunked"


runner = CliRunner()


def test_ovqprof_layers_lists_every_ovq_option_with_its_default():
    result = runner.invoke(app, ["layers", "--format", "json"])
    assert result.exit_code == 0, result.output
    (entry,) = [e for e in json.loads(result.stdout) if e["type"] == "ovq"]
    options = {o["name"]: o for o in entry["options"]}
    assert list(options) == list(OVQOptions.model_fields)
    assert {name: options[name]["default"] for name in ("dict_size", "chunk_size", "growth", "init", "lr")} == {
        "dict_size": "1024", "chunk_size": "64", "growth": "'saturating'", "init": "'spread'", "lr": "'adaptive'"}
    assert all(o["description"] for o in options.values())
    table = runner.invoke(app, ["layers"], env={"COLUMNS": "160"})  # wide enough not to wrap option names
    assert table.exit_code == 0 and "grad_through_state" in table.stdout and "normalize_centroids" in table.stdout


def test_sweep_runs_ovq_in_every_mode_on_the_quick_profile():
    result = runner.invoke(app, ["sweep", "--profile", "quick", "--layers", "ovq", "--seq", "128", "--modes",
                                 "fwd,bwd,decode", "--format", "csv", "--no-roofline"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["layer"], r["mode"]) for r in rows] == [("ovq", "fwd"), ("ovq", "bwd"), ("ovq", "decode")]
    for r in rows:
        assert (r["status"], r["check"], r["impl"]) == ("ok", "pass", "torch-chunked"), r
        assert float(r["ms_median"]) > 0 and float(r["flops"]) > 0
    quick = load_spec(ROOT / "profiles" / "quick.yaml")
    (spec,) = [s for s in quick.layers if s.name == "ovq"]
    assert int(rows[0]["state_bytes"]) == _build(spec).state_bytes(1, 128)


# --- the README's ablation example is the shipped profile -------------------------------------------------
def test_readme_ablation_yaml_is_the_ablations_profile_and_loads():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## How OVQ-attention works here", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the OVQ section shows the ablations profile as one YAML block"
    profile = ROOT / "profiles" / "ovq-ablations.yaml"
    assert yaml.safe_load(blocks[0]) == yaml.safe_load(profile.read_text())
    spec = load_spec_text(blocks[0], file="README.md")
    options = {layer.name: layer.options for layer in spec.layers}
    assert {"init", "growth", "lr", "dict_size"} <= {key for opts in options.values() for key in opts}
    for layer_spec in spec.layers:  # every ablation builds at the profile's sizes
        assert isinstance(_build(layer_spec), OVQAttention)
