"""Softmax and linear attention layers: forward against naive references, decode against forward, state
bytes against real state tensors, gradients, option validation and the cost model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from decode_helpers import decode_all
from pydantic import ValidationError

from ovqprof.layers.base import LayerConfigError, tensor_bytes
from ovqprof.layers.linear_attention import LinearAttention
from ovqprof.layers.softmax_attention import SoftmaxAttention
from ovqprof.registry import build_layer, get_layer_type
from ovqprof.tolerances import assert_close_rel, rel_rms_error

D, H, DH, B = 16, 4, 8, 2

SOFTMAX_CONFIGS = {
    "mha": {},
    "gqa": {"kv_heads": 2},
    "mqa": {"kv_heads": 1},
    "swa1": {"window": 1},
    "swa5_gqa": {"window": 5, "kv_heads": 2},
    "swa200": {"window": 200},  # wider than every T of the decode tests
}
LINEAR_CONFIGS = {
    f"{fm}-{'norm' if norm else 'raw'}": {"feature_map": fm, "normalize": norm, "chunk_size": 8}
    for fm in ("elu+1", "identity") for norm in (True, False)
}
ALL_CONFIGS = [(SoftmaxAttention, name, o) for name, o in SOFTMAX_CONFIGS.items()] + [
    (LinearAttention, name, o) for name, o in LINEAR_CONFIGS.items()
]
ALL_IDS = [name for _, name, _ in ALL_CONFIGS]


def make(cls, dtype=torch.float64, d=D, heads=H, dh=DH, **opts):
    torch.manual_seed(0)
    return cls(d, heads, dh, cls.Options(**opts)).to(dtype)


def rand_x(T, dtype=torch.float64, batch=B, d=D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, T, d, generator=g, dtype=dtype)


# --- naive references ----------------------------------------------------------------------------------
def naive_softmax(layer: SoftmaxAttention, x: torch.Tensor) -> torch.Tensor:
    """Explicit T x T masked softmax with kv heads repeated."""
    Bx, T, _ = x.shape
    G = layer.kv_heads
    q = F.linear(x, layer.q_proj.weight).view(Bx, T, H, DH).transpose(1, 2)
    k = F.linear(x, layer.k_proj.weight).view(Bx, T, G, DH).transpose(1, 2).repeat_interleave(H // G, dim=1)
    v = F.linear(x, layer.v_proj.weight).view(Bx, T, G, DH).transpose(1, 2).repeat_interleave(H // G, dim=1)
    t = torch.arange(T).view(T, 1)
    s = torch.arange(T).view(1, T)
    W = layer.window if layer.window is not None else T
    allowed = (s <= t) & (s > t - W)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(DH)
    o = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1) @ v
    return F.linear(o.transpose(1, 2).reshape(Bx, T, H * DH), layer.o_proj.weight)


def naive_linear(layer: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """The recurrence token by token."""
    Bx, T, _ = x.shape
    phi = (lambda a: F.elu(a) + 1) if layer.options.feature_map == "elu+1" else (lambda a: a)
    q, k, v = (F.linear(x, p.weight).view(Bx, T, H, DH) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    S = torch.zeros(Bx, H, DH, DH, dtype=x.dtype)
    z = torch.zeros(Bx, H, DH, dtype=x.dtype)
    outs = []
    for t in range(T):
        qt, kt = phi(q[:, t]), phi(k[:, t])
        S = S + torch.einsum("bhk,bhv->bhkv", kt, v[:, t])
        z = z + kt
        o = torch.einsum("bhk,bhkv->bhv", qt, S)
        if layer.options.normalize:
            o = o / ((qt * z).sum(-1, keepdim=True) + layer.options.eps)
        outs.append(o.reshape(Bx, H * DH))
    return F.linear(torch.stack(outs, dim=1), layer.o_proj.weight)


# --- forward against the references --------------------------------------------------------------------
@pytest.mark.parametrize("opts,T", [
    ({}, 1), ({}, 37), ({"kv_heads": 2}, 37), ({"kv_heads": 1}, 37),
    ({"window": 1}, 9), ({"window": 5}, 13), ({"window": 5, "kv_heads": 1}, 23),
    ({"window": 40}, 37),  # window >= T: the plain causal path
    ({"window": 300}, 600),  # blocked path with C = 256 and T not a multiple of it
])
def test_softmax_forward_matches_naive(opts, T):
    layer = make(SoftmaxAttention, **opts)
    x = rand_x(T)
    assert_close_rel(layer(x), naive_softmax(layer, x))
    blocked = opts.get("window") is not None and opts["window"] < T
    assert layer.implementation() == ("sdpa-window-blocked" if blocked else "sdpa")


@pytest.mark.parametrize("name", list(LINEAR_CONFIGS))
@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("T", [37, 100])
def test_linear_chunked_matches_recurrence(name, chunk, T):
    layer = make(LinearAttention, **{**LINEAR_CONFIGS[name], "chunk_size": chunk})
    x = rand_x(T)
    assert_close_rel(layer(x), naive_linear(layer, x))


# --- decode against forward ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls,name,opts", ALL_CONFIGS, ids=ALL_IDS)
@pytest.mark.parametrize("T", [1, 7, 63, 100])
def test_decode_matches_forward(cls, name, opts, T):
    layer = make(cls, **opts)
    x = rand_x(T)
    with torch.no_grad():
        expected = layer(x)
        for i, prefix in enumerate(sorted({1, 2, T // 2, T - 1, T} - {0})):
            capacity = T if i % 2 else None  # preallocated, and grown step by step from the prompt length
            actual, state = decode_all(layer, x, prefix, capacity)
            assert_close_rel(actual, expected)
            if cls is SoftmaxAttention:
                assert state.length == T


@pytest.mark.parametrize("cls,opts", [(SoftmaxAttention, {"kv_heads": 2}), (SoftmaxAttention, {"window": 6}),
                                      (LinearAttention, {"chunk_size": 16})])
def test_decode_matches_forward_float32(cls, opts):
    layer = make(cls, dtype=torch.float32, **opts)
    x = rand_x(63, dtype=torch.float32)
    with torch.no_grad():
        actual, _ = decode_all(layer, x, 20)
        assert_close_rel(actual, layer(x))


@pytest.mark.parametrize("cls,name,opts", ALL_CONFIGS, ids=ALL_IDS)
@pytest.mark.parametrize("prefix", [3, 5, 16, 40])
def test_repeated_step_gives_identical_output(cls, name, opts, prefix):
    layer = make(cls, **opts)
    x = rand_x(prefix + 2)
    with torch.no_grad():
        _, state = layer.prefill(x[:, :prefix])  # default capacity: the first step of a full cache grows it
        y1, _ = layer.step(x[:, prefix:prefix + 1], state)
        y_other, _ = layer.step(x[:, prefix + 1:], state)  # another token from the same state in between
        y2, _ = layer.step(x[:, prefix:prefix + 1], state)
        y3, _ = layer.step(x[:, prefix:prefix + 1], state)
    assert torch.equal(y1, y2) and torch.equal(y2, y3)
    assert not torch.allclose(y1, y_other)
    assert_close_rel(y1, layer(x[:, :prefix + 1])[:, -1:])


def test_full_cache_grows_without_touching_the_input_state():
    layer = make(SoftmaxAttention, kv_heads=2)
    x = rand_x(5)
    with torch.no_grad():
        _, state = layer.prefill(x[:, :4])
        k_before = state.k.clone()
        _, new = layer.step(x[:, 4:], state)
    assert state.k.shape[2] == 4 and new.k.shape[2] > 4 and new.length == 5
    assert torch.equal(state.k, k_before)


# --- state bytes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,name,opts", ALL_CONFIGS, ids=ALL_IDS)
@pytest.mark.parametrize("T", [1, 7, 63])
def test_state_bytes_match_state_tensors(cls, name, opts, T):
    layer = make(cls, **opts)
    with torch.no_grad():
        _, state = layer.prefill(rand_x(T))
    assert layer.state_bytes(B, T) == tensor_bytes(state) > 0


def test_state_bytes_formulas():
    swa = make(SoftmaxAttention, window=5, kv_heads=2)
    assert swa.state_bytes(B, 63) == swa.state_bytes(B, 5) == 2 * B * 2 * 5 * DH * 8
    mha = make(SoftmaxAttention)
    assert mha.state_bytes(B, 63) == 2 * B * H * 63 * DH * 8
    lin = make(LinearAttention)
    assert lin.state_bytes(B, 1) == lin.state_bytes(B, 10_000) == B * H * DH * (DH + 1) * 8
    assert make(LinearAttention, normalize=False).state_bytes(B, 7) == B * H * DH * DH * 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_linear_state_is_float32(dtype):
    layer = make(LinearAttention, dtype=dtype)
    with torch.no_grad():
        y, state = layer.prefill(rand_x(10, dtype=dtype))
        y_t, _ = layer.step(rand_x(1, dtype=dtype), state)
    assert state.S.dtype == state.z.dtype == torch.float32
    assert y.dtype == y_t.dtype == dtype
    assert layer.state_bytes(B, 10) == tensor_bytes(state) == B * H * DH * (DH + 1) * 4


# --- gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,name,opts", ALL_CONFIGS + [(SoftmaxAttention, "swa3", {"window": 3})],
                         ids=ALL_IDS + ["swa3"])
def test_gradients_finite_and_nonzero(cls, name, opts):
    layer = make(cls, **opts)
    x = rand_x(10).requires_grad_(True)
    weights = rand_x(10, seed=2)
    (layer(x) * weights).sum().backward()
    # With a window of 1 each token attends only to itself: its softmax weight is exactly 1, so q and k get
    # no gradient at all (a nonzero one would be numerical noise, not a signal).
    dead = {"q_proj.weight", "k_proj.weight"} if opts.get("window") == 1 else set()
    for pname, p in [*layer.named_parameters(), ("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if pname in dead:
            assert p.grad.abs().max() < 1e-12, pname
        else:
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("cls,opts", [(SoftmaxAttention, {"kv_heads": 1, "window": 2}),
                                      (SoftmaxAttention, {"kv_heads": 2}),
                                      (LinearAttention, {"chunk_size": 2})])
def test_gradcheck(cls, opts):
    layer = make(cls, d=4, heads=2, dh=3, **opts)
    x = rand_x(5, batch=1, d=4).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (x,))


# --- options -------------------------------------------------------------------------------------------
def test_kv_heads_must_divide_heads():
    with pytest.raises(LayerConfigError) as info:
        SoftmaxAttention(D, 4, DH, SoftmaxAttention.Options(kv_heads=3))
    assert info.value.field == "kv_heads" and info.value.value == 3 and "2" in info.value.allowed


@pytest.mark.parametrize("cls,opts", [
    (SoftmaxAttention, {"window": 0}), (SoftmaxAttention, {"kv_heads": 0}), (SoftmaxAttention, {"heads": 2}),
    (LinearAttention, {"chunk_size": 0}), (LinearAttention, {"eps": 0.0}),
    (LinearAttention, {"feature_map": "relu"}), (LinearAttention, {"window": 4}),
])
def test_invalid_options_raise_validation_error(cls, opts):
    with pytest.raises(ValidationError):
        cls.Options(**opts)


def test_registry_builds_both_layers():
    for name, cls, opts in [("softmax_attention", SoftmaxAttention, {"kv_heads": 2}),
                            ("linear_attention", LinearAttention, {"chunk_size": 16})]:
        layer_type = get_layer_type(name)
        layer = build_layer(layer_type, D, H, DH, opts)
        assert isinstance(layer, cls) and layer_type.summary and layer_type.kind == cls.kind
        assert {row[0] for row in layer_type.option_table()} == set(cls.Options.model_fields)
    assert make(LinearAttention).implementation() == "torch-chunked"
    assert make(SoftmaxAttention, window=4).implementation() == "sdpa-window-blocked"


# --- cost model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{}, {"kv_heads": 2}, {"window": 3}])
def test_softmax_fwd_flops_formula(opts):
    layer = make(SoftmaxAttention, **opts)
    G, T = layer.kv_heads, 7
    W = opts.get("window", T)
    keys = sum(sum(1 for s in range(T) if t - W < s <= t) for t in range(T))  # counted, not summed in closed form
    proj = 2 * B * T * (D * H * DH + 2 * D * G * DH + H * DH * D)
    attn = 2 * B * H * keys * DH * 2  # QK^T and PV: one multiply-add (2 FLOPs) per (query, key, channel) each
    assert layer.cost("fwd", B, T).flops == proj + attn
    assert layer.cost("bwd", B, T).flops == 3 * proj + 3.5 * attn


@pytest.mark.parametrize("cls,name,opts", ALL_CONFIGS, ids=ALL_IDS)
def test_bwd_costs_more_than_fwd(cls, name, opts):
    layer = make(cls, **opts)
    fwd, bwd = layer.cost("fwd", B, 64), layer.cost("bwd", B, 64)
    assert bwd.flops > fwd.flops > 0 and bwd.bytes > fwd.bytes > layer.weight_bytes()
    with pytest.raises(ValueError):
        layer.cost("train", B, 64)


def test_decode_cost_growth():
    full = make(SoftmaxAttention, kv_heads=2)
    assert full.cost("decode", B, 100).flops < full.cost("decode", B, 101).flops
    # one more cached token adds exactly its k and v to the bytes read
    assert full.cost("decode", B, 101).bytes - full.cost("decode", B, 100).bytes == 2 * B * 2 * DH * 8
    proj = 2 * B * (D * (H + 2 * 2) * DH + H * DH * D)
    assert full.cost("decode", B, 100).flops == proj + 4 * B * H * DH * 101  # the new token's key counts too
    swa = make(SoftmaxAttention, window=16)
    assert swa.cost("decode", B, 5).flops < swa.cost("decode", B, 14).flops
    assert swa.cost("decode", B, 15) == swa.cost("decode", B, 16)  # context 15 + the new token fill W = 16
    assert swa.cost("decode", B, 20) == swa.cost("decode", B, 5000)
    lin = make(LinearAttention)
    assert lin.cost("decode", B, 1) == lin.cost("decode", B, 100_000)
    assert lin.cost("decode", B, 1).bytes == lin.weight_bytes() + 2 * lin.state_bytes(B, 1) + 2 * B * D * 8


def test_linear_fwd_cost_is_linear_in_length():
    lin = make(LinearAttention, chunk_size=64)
    c1, c2 = lin.cost("fwd", B, 640), lin.cost("fwd", B, 1280)
    assert c2.flops == 2 * c1.flops
    softmax = make(SoftmaxAttention)
    assert softmax.cost("fwd", B, 1280).flops > 2.5 * softmax.cost("fwd", B, 640).flops


def test_rel_rms_error_sanity():
    # guards the tolerance helper the tests above rely on: a wrong answer must not pass at float64
    a = rand_x(4)
    assert rel_rms_error(a, a) == 0.0 and rel_rms_error(a * (1 + 1e-6), a) > 1e-9
