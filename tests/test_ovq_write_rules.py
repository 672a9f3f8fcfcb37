"""OVQ-attention's write-rule options (issue 17): `assign`, `init: spread_topm`, `count_bias`, `value_update`.

Hand-built chunks where each new rule picks differently from today's, asserting the exact slots, counts and
centroids; decode equals the forward for every combination; growth: full with N >= T is softmax attention in
both assign modes; gradients; the layer's fast CPU core equals the reference for every combination.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ovqprof.kernels.ovq import OVQConfig, ovq_chunked
from ovqprof.kernels.ovq.chunked_cpu import ovq_chunked_fast
from ovqprof.kernels.ovq.reference import choose_spawn, read, write
from ovqprof.layers.ovq import OVQAttention, OVQOptions
from ovqprof.tolerances import assert_close_rel, rel_rms_error

E = torch.eye(4, dtype=torch.float64)
A, B_, C, D = E
PUBLIC = dict(assign="chunk_start", init="spread_topm", normalize_centroids=False)
# Every combination of the new options (with the defaults of the others).
COMBOS = [dict(assign=a, init=i, count_bias=cb, value_update=vu) for a, i, cb, vu in itertools.product(
    ["with_spawned", "chunk_start"], ["spread", "spread_topm", "random"], [True, False], ["mean", "delta"])]


def _ids(combo: dict) -> str:
    return "-".join(str(v) for v in combo.values())


def _unit(*rows) -> torch.Tensor:
    """[1, 1, len(rows), 4] unit vectors."""
    return F.normalize(torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in rows]), dim=-1).view(
        1, 1, len(rows), 4)


def _qkv(B, H, T, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, d, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, H, T, d, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    return q, k, v, 1.5 + 3 * torch.rand(H, generator=g, dtype=torch.float64)


def _linear(N: int, L: int, **opts) -> OVQConfig:
    """A schedule that spawns exactly `rate * L` slots per chunk until N (linear growth)."""
    return OVQConfig(dict_size=N, chunk_size=L, growth="linear", **opts)


# --- assign ---------------------------------------------------------------------------------------------
def test_chunk_start_keeps_a_token_out_of_the_slot_spawned_beside_it():
    # One old slot (key A). Chunk of 4 (linear growth 0.25: one spawn): the token farthest from A is B and
    # spawns slot 1; token 2 (mostly B, a little A) is nearer slot 1 but, with chunk_start, joins slot 0.
    cfg = dict(dict_size=8, chunk_size=4, growth="linear", rate=0.25, normalize_centroids=False)
    keys, values, counts = _unit(A), torch.full((1, 1, 1, 4), 2.0, dtype=torch.float64), torch.tensor([[[3.0]]],
                                                                                                      dtype=torch.float64)
    k = _unit(A, B_, [0.3, 1, 0, 0], [1, 0.2, 0, 0])
    v = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    for assign, z_want, c_want in (("with_spawned", [0, 1, 1, 0], [5.0, 2.0]),
                                   ("chunk_start", [0, 1, 0, 0], [6.0, 1.0])):
        c = OVQConfig(assign=assign, **cfg)
        new_k, new_v, new_c, z = write(k, v, keys, values, counts, c, 1)
        assert z.tolist() == [[z_want]], assign
        assert new_c.tolist() == [[c_want]], assign
        for slot in (0, 1):
            tokens = [j for j in range(4) if z_want[j] == slot]
            old_k = keys[0, 0, 0] * 3 if slot == 0 else 0
            old_v = values[0, 0, 0] * 3 if slot == 0 else 0
            assert torch.allclose(new_k[0, 0, slot], (old_k + k[0, 0, tokens].sum(0)) / c_want[slot], atol=1e-15)
            assert torch.allclose(new_v[0, 0, slot], (old_v + v[0, 0, tokens].sum(0)) / c_want[slot], atol=1e-15)


@pytest.mark.parametrize("init", ["spread", "spread_topm", "random"])
def test_chunk_start_on_an_empty_dictionary_puts_every_other_token_in_slot_zero(init):
    cfg = OVQConfig(dict_size=8, chunk_size=4, growth="linear", rate=0.5, assign="chunk_start", init=init)
    k = _unit(A, B_, C, [1, 1, 0, 0])
    v = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    none = k[:, :, :0]
    new_k, new_v, new_c, z = write(k, v, none, v[:, :, :0], torch.zeros(1, 1, 0, dtype=torch.float64), cfg, 0)
    picks = choose_spawn(k, none, 2, cfg, 0)[0, 0].tolist()
    rest = [j for j in range(4) if j not in picks]
    assert z[0, 0, picks].tolist() == [0, 1] and z[0, 0, rest].tolist() == [0, 0]
    assert new_c.tolist() == [[[3.0, 1.0]]]
    slot0 = [picks[0], *rest]
    assert torch.allclose(new_k[0, 0, 0], k[0, 0, slot0].mean(0), atol=1e-15)
    assert torch.allclose(new_v[0, 0, 0], v[0, 0, slot0].mean(0), atol=1e-15)
    assert torch.equal(new_k[0, 0, 1], k[0, 0, picks[1]]) and torch.equal(new_v[0, 0, 1], v[0, 0, picks[1]])


# --- init: spread_topm -------------------------------------------------------------------------------------
def test_spread_topm_and_farthest_first_pick_differently():
    # Dictionary {C}; keys A, A' (~A), B, A'' (~A, a little C). Farthest-first takes A, then B, then A'' (A' is
    # closer to the pick A than A'' is); one-shot top-m ignores earlier picks and takes the three keys least
    # similar to C: A, A', B (all 0; ties in position order).
    dictionary = _unit(C)
    k = _unit(A, [1, 0.05, 0, 0], B_, [1, 0, 0.3, 0])
    spread = OVQConfig(dict_size=8, chunk_size=4)
    topm = OVQConfig(dict_size=8, chunk_size=4, init="spread_topm")
    assert choose_spawn(k, dictionary, 3, spread, 1).tolist() == [[[0, 2, 3]]]
    # similarity to C: 0, 0, 0, 0.29 -> the three zeros in position order (ties to the lower position)
    assert choose_spawn(k, dictionary, 3, topm, 1).tolist() == [[[0, 1, 2]]]
    # strictly ordered similarities: slots in increasing order of similarity
    k2 = _unit([1, 0, 0.5, 0], [1, 0, 0.1, 0], [1, 0, 0.9, 0], [1, 0, 0.3, 0])
    assert choose_spawn(k2, dictionary, 3, topm, 1).tolist() == [[[1, 3, 0]]]
    assert choose_spawn(k2, dictionary, 4, topm, 1).tolist() == [[[1, 3, 0, 2]]]  # m = L: still that order


def test_spread_topm_on_an_empty_dictionary_seeds_with_the_first_key():
    topm = OVQConfig(dict_size=8, chunk_size=5, init="spread_topm")
    spread = OVQConfig(dict_size=8, chunk_size=5)
    # similarity to key 0 (A): 1 (itself), 0.89, 0, 0.45, -0.71
    k = _unit(A, [2, 1, 0, 0], C, [1, 2, 0, 0], [-1, 0, 1, 0])
    none = k[:, :, :0]
    assert choose_spawn(k, none, 3, topm, 0).tolist() == [[[0, 4, 2]]]
    assert choose_spawn(k, none, 1, topm, 0).tolist() == [[[0]]]
    # farthest-first: 0, then 4 (least similar to A), then key 3, as key 2 (C) is 0.71 similar to key 4
    assert choose_spawn(k, none, 3, spread, 0).tolist() == [[[0, 4, 3]]]


# --- count_bias -----------------------------------------------------------------------------------------
def test_read_without_count_bias_ignores_counts():
    q, k, v, beta = _qkv(1, 1, 3, 4, seed=3)
    dk, dv = _unit(A, B_), torch.randn(1, 1, 2, 4, dtype=torch.float64)
    counts = torch.tensor([[[1.0, 40.0]]], dtype=torch.float64)
    b = beta.item()
    logits = torch.cat([b * q @ dk.transpose(-1, -2), b * q @ k.transpose(-1, -2)], dim=-1)[0, 0]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    p = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
    want = p[:, :2] @ dv[0, 0] + p[:, 2:] @ v[0, 0]
    assert torch.allclose(read(q, k, v, beta, dk, dv, counts, count_bias=False)[0, 0], want, atol=1e-14)
    with_bias = read(q, k, v, beta, dk, dv, counts)[0, 0]
    assert not torch.allclose(with_bias, want, atol=1e-3)  # the log 40 bias moves the read


# --- value_update: delta ---------------------------------------------------------------------------------
@pytest.mark.parametrize("count_bias", [True, False])
def test_delta_values_move_by_the_residuals_of_a_dictionary_read(count_bias):
    cfg = OVQConfig(dict_size=8, chunk_size=4, growth="linear", rate=0.25, assign="chunk_start",
                    init="spread_topm", normalize_centroids=False, value_update="delta", count_bias=count_bias)
    keys = _unit(A, C)
    values = torch.randn(1, 1, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    counts = torch.tensor([[[2.0, 5.0]]], dtype=torch.float64)
    k = _unit([1, 0.1, 0, 0], B_, [0.1, 0, 1, 0], [1, 0, 0.2, 0])
    v = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    beta = torch.tensor([3.0], dtype=torch.float64)
    new_k, new_v, new_c, z = write(k, v, keys, values, counts, cfg, 2, beta)
    assert z.tolist() == [[[0, 2, 1, 0]]] and new_c.tolist() == [[[4.0, 6.0, 1.0]]]
    # R(k_j): softmax over the two old slots with logits 3 k.D_k (+ log c)
    logits = 3.0 * k[0, 0] @ keys[0, 0].t() + (counts[0, 0].log() if count_bias else 0)
    r = v[0, 0] - torch.softmax(logits, dim=-1) @ values[0, 0]
    assert torch.allclose(new_v[0, 0, 0], values[0, 0, 0] + (r[0] + r[3]) / 4, atol=1e-14)
    assert torch.allclose(new_v[0, 0, 1], values[0, 0, 1] + r[2] / 6, atol=1e-14)
    assert torch.allclose(new_v[0, 0, 2], r[1], atol=1e-14)  # spawned: Mv = 0, c = 0, plus its own residual
    # keys keep the running mean
    assert torch.allclose(new_k[0, 0, 0], (2 * keys[0, 0, 0] + k[0, 0, 0] + k[0, 0, 3]) / 4, atol=1e-15)
    assert torch.equal(new_k[0, 0, 2], k[0, 0, 1])


def test_delta_needs_adaptive_steps():
    with pytest.raises(ValueError, match="value_update: delta needs lr: adaptive"):
        OVQConfig(value_update="delta", lr="constant")


# --- identities for every combination -------------------------------------------------------------------
@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_layer_decode_equals_forward_for_every_new_option(combo):
    L, T = 4, 23  # T is not a multiple of L
    torch.manual_seed(3)
    layer = OVQAttention(16, 2, 4, OVQOptions(dict_size=7, chunk_size=L, normalize_centroids=False,
                                              **combo)).double()
    x = torch.randn(2, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = layer(x)
        _, final = layer.prefill(x)
        for prefix in (0, 5, 8):
            y, state = layer.prefill(x[:, :prefix])
            outs = [y]
            for t in range(prefix, T):
                y_t, state = layer.step(x[:, t:t + 1], state)
                outs.append(y_t)
            assert_close_rel(torch.cat(outs, dim=1), expected, torch.float64)
            assert torch.equal(state.counts, final.counts)
            assert torch.allclose(state.keys, final.keys, atol=1e-12)
            assert torch.allclose(state.values, final.values, atol=1e-12)


@pytest.mark.parametrize("assign", ["with_spawned", "chunk_start"])
@pytest.mark.parametrize("init", ["spread", "spread_topm"])
@pytest.mark.parametrize(("T", "L"), [(37, 5), (40, 8), (20, 64)])
def test_full_growth_is_softmax_attention_in_both_assign_modes(assign, init, T, L):
    q, k, v, beta = _qkv(2, 3, T, 16, seed=T + L)
    cfg = OVQConfig(dict_size=T, chunk_size=L, growth="full", assign=assign, init=init)
    s = beta.view(1, -1, 1, 1) * (q @ k.transpose(-1, -2))
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    want = torch.softmax(s, dim=-1) @ v
    for core in (ovq_chunked, ovq_chunked_fast):
        assert rel_rms_error(core(q, k, v, beta, cfg)[0], want) <= 1e-12


@pytest.mark.parametrize("combo", [
    dict(assign="chunk_start"), dict(init="spread_topm"), dict(count_bias=False), dict(value_update="delta"),
    dict(PUBLIC), dict(PUBLIC, value_update="delta", count_bias=False)], ids=_ids)
def test_gradcheck_with_the_new_options(combo):
    cfg = OVQConfig(dict_size=5, chunk_size=3, growth="linear", rate=0.5, **combo)
    q, k, v, beta = _qkv(1, 2, 10, 4, seed=14)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, beta)]
    assert torch.autograd.gradcheck(lambda *a: ovq_chunked(*a, cfg)[0], inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# --- the fast CPU core equals the reference -------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_fast_core_equals_the_reference(combo, normalize):
    q, k, v, beta = _qkv(2, 3, 75, 8, seed=5)
    cfg = OVQConfig(dict_size=12, chunk_size=8, normalize_centroids=normalize, **combo)
    o_ref, s_ref = ovq_chunked(q, k, v, beta, cfg)
    # without autograd (the in-place dictionary, for value_update: mean) and with it (the functional path)
    for o_fast, s_fast in (ovq_chunked_fast(q, k, v, beta, cfg),
                           ovq_chunked_fast(q.clone().requires_grad_(), k, v, beta, cfg)):
        assert rel_rms_error(o_fast, o_ref) <= 1e-13
        assert torch.equal(s_fast.counts, s_ref.counts) and s_fast.active == s_ref.active
        assert rel_rms_error(s_fast.keys, s_ref.keys) <= 1e-13
        assert rel_rms_error(s_fast.values, s_ref.values) <= 1e-13
        assert torch.equal(s_fast.buf_k, s_ref.buf_k) and s_fast.buf_len == s_ref.buf_len == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("combo", [dict(), dict(PUBLIC), dict(PUBLIC, value_update="delta")], ids=_ids)
def test_fast_core_gradients_equal_the_reference(combo, dtype):
    q, k, v, beta = (t.to(dtype) for t in _qkv(1, 2, 50, 8, seed=6))
    cfg = OVQConfig(dict_size=10, chunk_size=8, **combo)
    weight = torch.randn(1, 2, 50, 8, generator=torch.Generator().manual_seed(7)).to(dtype)
    grads = []
    for core in (ovq_chunked, ovq_chunked_fast):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, beta)]
        (core(*inputs, cfg)[0] * weight).sum().backward()
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads, strict=True):
        assert rel_rms_error(b, a) <= (1e-12 if dtype == torch.float64 else 1e-4)


def test_layer_runs_the_fast_core_on_cpu_and_the_reference_for_constant_lr(monkeypatch):
    import ovqprof.layers.ovq as ovq_layer

    calls = []
    monkeypatch.setattr(ovq_layer, "ovq_chunked_fast", lambda *a: calls.append("fast") or ovq_chunked_fast(*a))
    monkeypatch.setattr(ovq_layer, "ovq_chunked", lambda *a: calls.append("ref") or ovq_chunked(*a))
    x = torch.randn(1, 9, 16)
    OVQAttention(16, 2, 8, OVQOptions(dict_size=4, chunk_size=4))(x)
    OVQAttention(16, 2, 8, OVQOptions(dict_size=4, chunk_size=4, lr="constant"))(x)
    assert calls == ["fast", "ref"]
