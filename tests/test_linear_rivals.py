"""The linear family of rivals (GLA, Mamba2/SSD, DeltaNet, Gated DeltaNet, RetNet): the shared core against
naive per-token loops, chunked against recurrent forms, decode against forward, state bytes against real state
tensors, gradients, the capacity probe, option errors, the CLI, and (GPU only) fla kernels against PyTorch."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F
import yaml
from decode_helpers import decode_all
from pydantic import ValidationError
from typer.testing import CliRunner

from ovqprof.cli import app
from ovqprof.layers.base import LayerConfigError, tensor_bytes
from ovqprof.layers.delta_net import DeltaNet, GatedDeltaNet
from ovqprof.layers.gated_linear_core import (
    causal_conv,
    decay_chunked,
    decay_recurrent,
    delta_chunked,
    delta_recurrent,
)
from ovqprof.layers.gla import GLA
from ovqprof.layers.mamba2 import Mamba2
from ovqprof.layers.retnet import RetNet, retention_decays
from ovqprof.registry import BUILTIN_LAYERS, build_layer, get_layer_type
from ovqprof.tolerances import assert_close_rel, rel_rms_error

D, H, DH, B = 16, 4, 8, 2

# Small chunk sizes so that T = 19 spans several chunks and ends inside one.
CONFIGS = {
    "gla": (GLA, {"chunk_size": 4}),
    "mamba2": (Mamba2, {"state_size": 6, "chunk_size": 8}),
    "mamba2_conv1": (Mamba2, {"state_size": 6, "chunk_size": 8, "conv_size": 1}),
    "delta_net": (DeltaNet, {"chunk_size": 8}),
    "delta_net_conv2": (DeltaNet, {"chunk_size": 5, "conv_size": 2}),
    "gated_delta_net": (GatedDeltaNet, {"chunk_size": 8}),
    "retnet": (RetNet, {"chunk_size": 8}),
}
REGISTERED = {"gla": GLA, "mamba2": Mamba2, "delta_net": DeltaNet, "gated_delta_net": GatedDeltaNet,
              "retnet": RetNet}
FLA_MISSING = importlib.util.find_spec("fla") is None


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def make(name, dtype=torch.float64, **extra):
    cls, opts = CONFIGS[name]
    torch.manual_seed(0)
    return cls(D, H, DH, cls.Options(**{**opts, **extra})).to(dtype)


def rand(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- naive references, written from the definitions -------------------------------------------------------
def naive_decay(q, k, v, g, scale):
    """S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t, one (batch, head) at a time."""
    Bq, Hq, T, dk = q.shape
    o = torch.zeros(Bq, Hq, T, v.shape[-1], dtype=q.dtype)
    for b in range(Bq):
        for h in range(Hq):
            S = torch.zeros(dk, v.shape[-1], dtype=q.dtype)
            for t in range(T):
                alpha = g[b, h, t].exp()
                S = torch.diag(alpha) @ S if alpha.dim() else alpha * S  # per-channel or per-head decay
                S = S + torch.outer(k[b, h, t], v[b, h, t])
                o[b, h, t] = scale * q[b, h, t] @ S
    return o


def naive_delta(q, k, v, beta, g, scale):
    """The task's form, state in [dv, dk]: S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,
    o_t = scale * S_t q_t."""
    Bq, Hq, T, dk = q.shape
    o = torch.zeros(Bq, Hq, T, v.shape[-1], dtype=q.dtype)
    eye = torch.eye(dk, dtype=q.dtype)
    for b in range(Bq):
        for h in range(Hq):
            S = torch.zeros(v.shape[-1], dk, dtype=q.dtype)
            for t in range(T):
                alpha = 1.0 if g is None else g[b, h, t].exp()
                kt, bt = k[b, h, t], beta[b, h, t]
                S = S @ (alpha * (eye - bt * torch.outer(kt, kt))) + bt * torch.outer(v[b, h, t], kt)
                o[b, h, t] = scale * S @ q[b, h, t]
    return o


def core_inputs(T, dk=5, dv=4, seed=0, heads=2):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, heads, T, dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, heads, T, dv, generator=g, dtype=torch.float64)
    g_head = F.logsigmoid(torch.randn(B, heads, T, generator=g, dtype=torch.float64) + 2)
    g_chan = F.logsigmoid(torch.randn(B, heads, T, dk, generator=g, dtype=torch.float64) + 2)
    beta = torch.rand(B, heads, T, generator=g, dtype=torch.float64)
    S0 = torch.randn(B, heads, dk, dv, generator=g, dtype=torch.float64)
    return q, k, v, g_head, g_chan, beta, S0


# --- the core ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True])
def test_decay_recurrence_matches_naive_loop(per_channel):
    q, k, v, g_head, g_chan, _, _ = core_inputs(11)
    g = g_chan if per_channel else g_head
    o, _ = decay_recurrent(q, k, v, g, 0.7)
    assert_close_rel(o, naive_decay(q, k, v, g, 0.7))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_delta_rule_matches_naive_loop(gated, chunk):
    q, k, v, g_head, _, beta, _ = core_inputs(13)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    g = g_head if gated else None
    expected = naive_delta(q, k, v, beta, g, 0.7)
    assert_close_rel(delta_recurrent(q, k, v, beta, g, 0.7)[0], expected)
    assert_close_rel(delta_chunked(q, k, v, beta, g, 0.7, chunk)[0], expected)


@pytest.mark.parametrize("T", [1, 7, 16, 37])
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("form", ["decay_head", "decay_channel", "delta", "gated_delta"])
def test_chunked_matches_recurrent_with_initial_state(form, chunk, T):
    q, k, v, g_head, g_chan, beta, S0 = core_inputs(T)
    if form.startswith("decay"):
        g = g_chan if form == "decay_channel" else g_head
        rec = decay_recurrent(q, k, v, g, 0.5, S0)
        chk = decay_chunked(q, k, v, g, 0.5, chunk, S0)
    else:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = g_head if form == "gated_delta" else None
        rec = delta_recurrent(q, k, v, beta, g, 0.5, S0)
        chk = delta_chunked(q, k, v, beta, g, 0.5, chunk, S0)
    assert_close_rel(chk[0], rec[0])
    assert_close_rel(chk[1], rec[1])
    assert rel_rms_error(rec[1], S0) > 1e-3  # the state really moved


def test_chunked_decay_survives_strong_gates():
    # log decay -60 per token: exp(-b) over a chunk would overflow float32; only ratios <= 1 are formed
    q, k, v, _, g_chan, _, _ = core_inputs(40)
    q, k, v = q.float(), k.float(), v.float()
    g = (g_chan * 0 - 60.0).float()
    o, S = decay_chunked(q, k, v, g, 1.0, 16)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert_close_rel(o, decay_recurrent(q, k, v, g, 1.0)[0])


def test_delta_chunked_gradcheck():
    q, k, v, g_head, _, beta, S0 = core_inputs(5, dk=3, dv=2, heads=1)
    q, k = F.normalize(q[:1], dim=-1), F.normalize(k[:1], dim=-1)
    args = [t.clone().requires_grad_(True) for t in (q, k, v[:1], beta[:1], g_head[:1], S0[:1])]

    def fn(q, k, v, beta, g, S0):
        return delta_chunked(q, k, v, beta, g, 0.9, 3, S0)

    assert torch.autograd.gradcheck(fn, tuple(args))


def test_causal_conv_streams_like_the_full_sequence():
    x, w, bias = rand(2, 9, 6), rand(6, 4, seed=2), rand(6, seed=3)
    full, tail = causal_conv(x, w, bias)
    # output t sees x[t-3..t]: compare one position with the explicit sum
    assert torch.allclose(full[:, 5], (x[:, 2:6] * w.T).sum(1) + bias)
    outs, state = [], None
    for t in range(9):
        y, state = causal_conv(x[:, t:t + 1], w, bias, state)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, 1), full) and torch.equal(state, tail)


# --- layers against their definitions, token by token ------------------------------------------------------
def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _conv_naive(x, weight, bias):
    """y_t = sum_i w[:, i] x_{t-K+1+i} (zeros before the start) + bias, x [B, T, Ch]."""
    K = weight.shape[1]
    y = torch.zeros_like(x) + (0 if bias is None else bias)
    for t in range(x.shape[1]):
        for i in range(K):
            if t - K + 1 + i >= 0:
                y[:, t] += weight[:, i] * x[:, t - K + 1 + i]
    return y


def naive_layer(layer, x):
    """Each layer's docstring definition, one token at a time, from the layer's own weights."""
    Bx, T, _ = x.shape
    Hn, dh, eps = layer.heads, layer.head_dim, layer.options.norm_eps

    def split(t, w):
        return t.view(Bx, T, Hn, w)

    if isinstance(layer, Mamba2):
        N, inner = layer.options.state_size, Hn * dh
        z, xbc, dt = layer.in_proj(x).split([inner, inner + 2 * N, Hn], dim=-1)
        xs, Bm, Cm = F.silu(_conv_naive(xbc, layer.conv_weight, layer.conv_bias)).split([inner, N, N], dim=-1)
        dt = F.softplus(dt + layer.dt_bias)  # [B, T, H]
        A = -layer.A_log.exp()
        xs = split(xs, dh)
        S = torch.zeros(Bx, Hn, N, dh, dtype=x.dtype)
        ys = []
        for t in range(T):
            write = Bm[:, t, None, :, None] * (dt[:, t, :, None] * xs[:, t])[:, :, None]  # B_t (dt x_t)^T
            S = (dt[:, t] * A).exp()[..., None, None] * S + write
            ys.append(torch.einsum("bn,bhnp->bhp", Cm[:, t], S) + layer.D[:, None] * xs[:, t])
        y = torch.stack(ys, 1).reshape(Bx, T, inner)
        return layer.out_proj(_rms(y * F.silu(z), layer.norm_weight, eps))
    if isinstance(layer, DeltaNet):
        qkv = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], dim=-1)
        q, k, v = (split(t, dh) for t in F.silu(_conv_naive(qkv, layer.conv_weight, None)).chunk(3, dim=-1))
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        beta = torch.sigmoid(layer.b_proj(x))
        alpha = torch.ones_like(beta)
        if layer.gated:
            alpha = torch.exp(-layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias))
        S = torch.zeros(Bx, Hn, dh, dh, dtype=x.dtype)  # [dv, dk], the task's layout
        eye = torch.eye(dh, dtype=x.dtype)
        outs = []
        for t in range(T):
            kt = k[:, t]
            bt = beta[:, t, :, None, None]
            decay = alpha[:, t, :, None, None] * (eye - bt * kt[..., :, None] * kt[..., None, :])
            S = S @ decay + bt * v[:, t, ..., :, None] * kt[..., None, :]
            outs.append(dh ** -0.5 * (S @ q[:, t, ..., None]).squeeze(-1))
        o = _rms(torch.stack(outs, 1), layer.norm_weight, eps).reshape(Bx, T, Hn * dh)
        if layer.gated:
            o = o * F.silu(layer.g_proj(x))
        return layer.out_proj(o)
    # GLA and RetNet: S_t = diag(alpha_t) S_{t-1} + k v^T, swish-gated RMSNorm output
    q, k, v = (split(p(x), dh) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    if isinstance(layer, GLA):
        gate = split(layer.gate_up(layer.gate_down(x)), dh)
        alpha = torch.sigmoid(gate) ** (1 / layer.options.gate_logit_normalizer)
    else:
        gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(Hn)], dtype=x.dtype)
        alpha = gamma[None, None, :, None].expand(Bx, T, Hn, dh)
    S = torch.zeros(Bx, Hn, dh, dh, dtype=x.dtype)
    outs = []
    for t in range(T):
        S = alpha[:, t, ..., None] * S + k[:, t, ..., :, None] * v[:, t, ..., None, :]
        outs.append(dh ** -0.5 * (q[:, t, ..., None, :] @ S).squeeze(-2))
    o = _rms(torch.stack(outs, 1), layer.norm_weight, eps).reshape(Bx, T, Hn * dh)
    return layer.out_proj(o * F.silu(layer.g_proj(x)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_forward_matches_its_definition(name):
    layer = make(name)
    x = rand(B, 19, D)
    with torch.no_grad():
        assert_close_rel(layer(x), naive_layer(layer, x))


# --- layers: decode against forward -----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_matches_forward(name, dtype):
    layer = make(name, dtype)
    x = rand(B, 19, D, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
        for prefix in (2, 11):  # shorter than the conv tail, inside a chunk
            actual, _ = decode_all(layer, x, prefix)
            assert_close_rel(actual, expected, factor=0.1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunk_size_does_not_change_the_forward(name):
    x = rand(B, 23, D)
    with torch.no_grad():
        ref = make(name, chunk_size=1)(x)
        for chunk in (3, 8, 64):
            assert_close_rel(make(name, chunk_size=chunk)(x), ref)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_never_changes_its_input_state(name):
    layer = make(name)
    x = rand(B, 9, D)
    with torch.no_grad():
        _, state = layer.prefill(x[:, :7])
        before = [None if t is None else t.clone() for t in dataclasses.astuple(state)]
        y1, s1 = layer.step(x[:, 7:8], state)
        y_other, _ = layer.step(x[:, 8:9], state)
        y2, s2 = layer.step(x[:, 7:8], state)
    after = dataclasses.astuple(state)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.equal(y1, y2) and torch.equal(s1.S, s2.S)
    assert not torch.allclose(y1, y_other)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_state_bytes_match_state_tensors(name, dtype):
    layer = make(name, dtype)
    x = rand(B, 6, D, dtype=dtype)
    with torch.no_grad():
        for T in (1, 5):
            _, state = layer.prefill(x[:, :T])
            assert layer.state_bytes(B, T) == tensor_bytes(state) > 0
        _, stepped = layer.step(x[:, 5:6], state)
    assert layer.state_bytes(B, 6) == tensor_bytes(stepped)
    assert stepped.S.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    assert stepped.conv is None or stepped.conv.dtype == dtype
    assert layer.state_bytes(B, 1) == layer.state_bytes(B, 100_000)


def test_state_bytes_formulas():
    assert make("gla").state_bytes(B, 9) == B * H * DH * DH * 8
    assert make("retnet").state_bytes(B, 9) == B * H * DH * DH * 8
    assert make("mamba2").state_bytes(B, 9) == B * (H * 6 * DH + 3 * (H * DH + 2 * 6)) * 8
    assert make("delta_net").state_bytes(B, 9) == B * (H * DH * DH + 3 * 3 * H * DH) * 8
    assert make("mamba2_conv1").state_bytes(B, 9) == B * H * 6 * DH * 8  # a 1-tap conv keeps no tail


# --- layers: gradients, precision, registry, cost ---------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward_reach_every_parameter(name):
    layer = make(name, torch.float32)
    x = rand(B, 21, D, dtype=torch.float32).requires_grad_(True)
    (layer(x) * rand(B, 21, D, dtype=torch.float32, seed=5)).sum().backward()
    for pname, p in [*layer.named_parameters(), ("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["gla", "mamba2", "gated_delta_net", "retnet"])
def test_bfloat16_layer_close_to_float32(name):
    x = rand(B, 20, D, dtype=torch.float32)
    with torch.no_grad():
        ref = make(name, torch.float32)(x)
        half = make(name, torch.bfloat16)(x.bfloat16())
    assert half.dtype == torch.bfloat16
    assert_close_rel(half, ref, dtype=torch.bfloat16)


def test_registry_builds_every_linear_rival():
    for name, cls in REGISTERED.items():
        assert BUILTIN_LAYERS[name].endswith(cls.__name__)
        layer_type = get_layer_type(name)
        layer = build_layer(layer_type, D, H, DH, {"chunk_size": 16})
        assert isinstance(layer, cls) and layer_type.summary and layer.kind == "linear"
        assert {row[0] for row in layer_type.option_table()} == set(cls.Options.model_fields)
        assert layer.implementation() == "torch-chunked"  # CPU: the PyTorch path, whether or not fla exists


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cost_model(name):
    layer = make(name)
    fwd, bwd = layer.cost("fwd", B, 64), layer.cost("bwd", B, 64)
    assert bwd.flops > fwd.flops > 0 and bwd.bytes > fwd.bytes > layer.weight_bytes()
    assert layer.cost("fwd", B, 128).flops == 2 * layer.cost("fwd", B, 64).flops  # linear in T
    dec = layer.cost("decode", B, 10)
    assert dec == layer.cost("decode", B, 100_000)
    assert dec.bytes == layer.weight_bytes() + 2 * layer.state_bytes(B, 10) + 2 * B * D * 8
    with pytest.raises(ValueError):
        layer.cost("train", B, 64)


# --- options ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name,opts", [
    ("gla", {"chunk_size": 0}), ("gla", {"gate_low_rank": 0}), ("gla", {"probe_decay": 0.0}),
    ("gla", {"probe_decay": 1.5}), ("mamba2", {"state_size": 0}), ("mamba2", {"conv_size": 0}),
    ("mamba2", {"dt_min": -1.0}), ("delta_net", {"probe_beta": 0.0}), ("delta_net", {"probe_decay": 0.5}),
    ("gated_delta_net", {"conv_size": 0}), ("retnet", {"window": 4}), ("retnet", {"chunk_size": "big"}),
])
def test_invalid_options_raise_validation_error(type_name, opts):
    with pytest.raises(ValidationError):
        build_layer(get_layer_type(type_name), D, H, DH, opts)


def test_impossible_combinations_raise_layer_config_error():
    with pytest.raises(LayerConfigError) as info:
        build_layer(get_layer_type("mamba2"), D, H, DH, {"dt_min": 0.5, "dt_max": 0.1})
    assert info.value.field == "dt_min"
    with pytest.raises(LayerConfigError):
        build_layer(get_layer_type("gla"), D, 0, DH, {})


# --- RetNet decays and the capacity probe -----------------------------------------------------------------
def test_retnet_decay_values():
    assert torch.equal(retention_decays(4), torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256],
                                                         dtype=torch.float64))
    # the layer really decays head h by gamma_h: one pair written, then N-1 zero fillers
    layer = make("retnet")
    N = 20
    keys = torch.zeros(1, H, N, DH, dtype=torch.float64)
    values = torch.zeros(1, H, N, DH, dtype=torch.float64)
    keys[:, :, 0, 0] = 1.0
    values[:, :, 0] = rand(1, H, DH)
    reads = layer.probe_memory(keys, values, keys[:, :, :1])
    expected = retention_decays(H).pow(N - 1).view(1, H, 1, 1) * values[:, :, :1]
    assert_close_rel(reads, expected)


def orthonormal_pairs(N, dk=DH, dv=DH, heads=H):
    basis = torch.linalg.qr(rand(heads, dk, dk, seed=7))[0]  # [H, dk, dk], orthonormal columns
    keys = basis.transpose(-1, -2)[:, :N].unsqueeze(0)  # [1, H, N, dk]
    return keys, rand(1, heads, N, dv, seed=8)


@pytest.mark.parametrize("name", list(REGISTERED))
def test_probe_memory_shapes_and_dtype(name):
    layer = REGISTERED[name](D, H, DH).to(torch.bfloat16)
    keys, values = orthonormal_pairs(5)
    reads = layer.probe_memory(keys.float(), values.float(), rand(1, H, 3, DH, dtype=torch.float32))
    assert reads.shape == (1, H, 3, DH) and reads.dtype == torch.float32  # the accumulation dtype


@pytest.mark.parametrize("name", ["gla", "mamba2", "delta_net", "gated_delta_net"])
def test_probe_retrieves_orthonormal_keys_exactly_at_neutral_gates(name):
    layer = REGISTERED[name](D, H, DH).double()
    keys, values = orthonormal_pairs(DH)  # as many keys as dimensions: the state is full
    assert_close_rel(layer.probe_memory(keys, values, keys), values)


def test_probe_delta_rule_overwrites_while_linear_memory_adds():
    keys, values = orthonormal_pairs(2)
    keys = torch.cat([keys, keys[:, :, :1]], dim=2)  # key 0 written again with a new value
    values = torch.cat([values, rand(1, H, 1, DH, seed=9)], dim=2)
    delta = REGISTERED["delta_net"](D, H, DH).double().probe_memory(keys, values, keys[:, :, :1])
    assert_close_rel(delta, values[:, :, 2:])
    gla = REGISTERED["gla"](D, H, DH).double().probe_memory(keys, values, keys[:, :, :1])
    assert_close_rel(gla, values[:, :, :1] + values[:, :, 2:])


@pytest.mark.parametrize("name,opts", [("gla", {"probe_decay": 0.5}), ("mamba2", {"probe_decay": 0.5}),
                                       ("gated_delta_net", {"probe_decay": 0.5})])
def test_probe_decay_option_forgets_older_pairs(name, opts):
    cls = REGISTERED[name]
    layer = cls(D, H, DH, cls.Options(**opts)).double()
    keys, values = orthonormal_pairs(4)
    reads = layer.probe_memory(keys, values, keys)
    weights = 0.5 ** torch.arange(3, -1, -1, dtype=torch.float64).view(1, 1, 4, 1)  # older: more decays
    assert_close_rel(reads, weights * values)


# --- the CLI ----------------------------------------------------------------------------------------------
def test_cli_sweep_runs_every_linear_rival(tmp_path):
    profile = {
        "name": "linear-rivals-test",
        "defaults": {"batch": 1, "d_model": 32, "heads": 2, "head_dim": 16, "dtype": "float32",
                     "device": "cpu"},
        "layers": [{"name": name, "type": name, "chunk_size": 32} for name in REGISTERED],
        "sweep": {"seq": [128], "modes": ["fwd"], "batch": 1, "warmup_ms": 1, "rep_ms": 5, "check_seq": 24},
    }
    path = tmp_path / "rivals.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    result = CliRunner().invoke(app, ["sweep", "--profile", str(path), "--seq", "128", "--modes",
                                      "fwd,bwd,decode", "--format", "csv", "--no-roofline"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected = [(n, m) for n in REGISTERED for m in ("fwd", "bwd", "decode")]
    assert [(r["layer"], r["mode"]) for r in rows] == expected
    assert all(r["status"] == "ok" and r["check"] == "pass" for r in rows), rows
    assert all(r["impl"] == "torch-chunked" for r in rows)


# --- the fla wrappers' plumbing, on CPU with stand-in kernels ---------------------------------------------
def _fake_kernel(q, k, v, *, gk=None, g=None, beta=None, scale=None, initial_state=None):
    """fla's documented semantics in its layout: q, k [B, T, H, K], v [B, T, H, V], log gates gk [B, T, H, K]
    or g [B, T, H], beta [B, T, H], state [B, H, K, V] float32; o in q's dtype, final state float32."""
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    S = (initial_state if initial_state is not None
         else q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])).to(q.dtype)
    outs = []
    for t in range(q.shape[1]):
        if gk is not None:
            S = gk[:, t].to(S.dtype).exp()[..., None] * S
        if g is not None:
            S = g[:, t].to(S.dtype).exp()[..., None, None] * S
        kt, vt = k[:, t], v[:, t]
        if beta is not None:
            vt = beta[:, t, :, None] * (vt - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + kt[..., None] * vt[..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, dim=1).to(q.dtype), S.float()


def _fake_fla_modules(calls):
    """Stand-ins for fla.ops.{gla, simple_gla, gated_delta_rule} with fla 0.6's signatures."""
    import types

    def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
                  cu_seqlens=None, cu_seqlens_cpu=None):
        calls.append("chunk_gla")
        return _fake_kernel(q, k, v, gk=g, scale=scale, initial_state=initial_state)

    def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None,
                            output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None,
                            **kwargs):
        calls.append("fused_recurrent_gla")
        return _fake_kernel(q, k, v, gk=gk, scale=scale, initial_state=initial_state)

    def simple(name):
        def fn(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
               state_v_first=False, cu_seqlens=None, **kwargs):
            calls.append(name)
            return _fake_kernel(q, k, v, g=g, scale=scale, initial_state=initial_state)
        return fn

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, **kwargs):
        calls.append("chunk_gated_delta_rule")
        return _fake_kernel(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state)

    def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None,
                                         initial_state=None, output_final_state=False, **kwargs):
        calls.append("fused_recurrent_gated_delta_rule")
        return _fake_kernel(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state)

    modules = {name: types.ModuleType(name) for name in
               ("fla", "fla.ops", "fla.ops.gla", "fla.ops.simple_gla", "fla.ops.gated_delta_rule")}
    modules["fla.ops.gla"].__dict__.update(chunk_gla=chunk_gla, fused_recurrent_gla=fused_recurrent_gla)
    modules["fla.ops.simple_gla"].__dict__.update(chunk_simple_gla=simple("chunk_simple_gla"),
                                                  fused_recurrent_simple_gla=simple("fused_recurrent_simple_gla"))
    modules["fla.ops.gated_delta_rule"].__dict__.update(
        chunk_gated_delta_rule=chunk_gated_delta_rule,
        fused_recurrent_gated_delta_rule=fused_recurrent_gated_delta_rule)
    return modules


@pytest.mark.parametrize("name,kernels", [
    ("gla", ("chunk_gla", "fused_recurrent_gla")),
    ("mamba2", ("chunk_simple_gla", "fused_recurrent_simple_gla")),
    ("delta_net", ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule")),
    ("gated_delta_net", ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule")),
    ("retnet", ("chunk_simple_gla", "fused_recurrent_simple_gla")),
])
def test_fla_wrappers_pass_layout_gates_scale_and_state(name, kernels, monkeypatch):
    """The GPU path's plumbing ([B, T, H, D] transposes, log gates, scale, initial and final state) checked on
    CPU: with stand-ins implementing fla's documented semantics, the fla path equals the torch path."""
    import sys

    from ovqprof.layers import recurrent_base

    layer = make(name)
    x = rand(B, 19, D)
    with torch.no_grad():
        expected = layer(x)
        calls: list[str] = []
        for mod_name, mod in _fake_fla_modules(calls).items():
            monkeypatch.setitem(sys.modules, mod_name, mod)
        monkeypatch.setattr(recurrent_base, "use_fla", lambda t: True)
        assert layer.implementation() == "fla-chunk"
        # fla's gates and states are float32, so float32's tolerance; a layout slip is an O(1) error
        assert_close_rel(layer(x), expected, dtype=torch.float32)
        decoded, _ = decode_all(layer, x, 11)
        assert_close_rel(decoded, expected, dtype=torch.float32)
    assert set(calls) == set(kernels) and calls[0] == kernels[0]


def test_fla_only_for_cuda_tensors_of_kernel_dtypes(monkeypatch):
    from ovqprof.layers import fla_ops

    monkeypatch.setattr(fla_ops, "fla_available", lambda: True)
    assert not fla_ops.use_fla(torch.zeros(1))  # CPU: never, even with fla installed
    assert make("gla").implementation() == "torch-chunked"


# --- GPU: fla kernels against the PyTorch path ------------------------------------------------------------
GPU_REASON = "needs a CUDA GPU and fla-core (pip install 'ovqprof[fla]') to compare fla kernels"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or FLA_MISSING, reason=GPU_REASON)
@pytest.mark.parametrize("name", list(REGISTERED))
def test_fla_matches_torch_forward_and_decode(name, monkeypatch):
    from ovqprof.layers import recurrent_base

    cls = REGISTERED[name]
    torch.manual_seed(0)
    layer = cls(256, 4, 64, cls.Options()).to("cuda", torch.bfloat16)
    x = torch.randn(2, 200, 256, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    assert layer.implementation() == "fla-chunk"
    with torch.no_grad():
        fla_y = layer(x)
        fla_decoded, fla_state = decode_all(layer, x, 131)
        monkeypatch.setattr(recurrent_base, "use_fla", lambda t: False)
        assert layer.implementation() == "torch-chunked"
        torch_y = layer(x)
        torch_decoded, torch_state = decode_all(layer, x, 131)
    assert_close_rel(fla_y, torch_y, dtype=torch.bfloat16)
    assert_close_rel(fla_decoded, torch_y, dtype=torch.bfloat16)
    assert_close_rel(torch_decoded, torch_y, dtype=torch.bfloat16)
    assert fla_state.S.dtype == torch.float32 and fla_state.S.shape == torch_state.S.shape
    assert_close_rel(fla_state.S, torch_state.S, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or FLA_MISSING, reason=GPU_REASON)
@pytest.mark.parametrize("name", list(REGISTERED))
def test_fla_backward_matches_torch(name, monkeypatch):
    from ovqprof.layers import recurrent_base

    cls = REGISTERED[name]
    torch.manual_seed(0)
    layer = cls(256, 4, 64, cls.Options()).to("cuda", torch.bfloat16)
    x = torch.randn(2, 200, 256, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)

    def grads():
        layer.zero_grad()
        xr = x.clone().requires_grad_(True)
        layer(xr).float().square().mean().backward()
        return [xr.grad] + [p.grad.clone() for p in layer.parameters()]

    fla_grads = grads()
    monkeypatch.setattr(recurrent_base, "use_fla", lambda t: False)
    for a, b in zip(fla_grads, grads(), strict=True):
        assert_close_rel(a, b, dtype=torch.bfloat16, factor=2)
