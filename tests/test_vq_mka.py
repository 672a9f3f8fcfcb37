"""Transformer-VQ, MKA and FastMKA: decode against forward, the decode contract, state bytes against real
state tensors, gradients, exact equivalences (codebook holding the exact keys; one-hot routers), the
associative-memory probe, options, cost model and a CLI sweep."""

from __future__ import annotations

import csv
import io
import math

import pytest
import torch
from decode_helpers import decode_all
from pydantic import ValidationError
from typer.testing import CliRunner

from ovqprof.cli import app
from ovqprof.layers.base import LayerConfigError, tensor_bytes
from ovqprof.layers.mka import MKA, FastMKA, causal_ema
from ovqprof.layers.transformer_vq import TransformerVQ
from ovqprof.registry import BUILTIN_LAYERS, build_layer, get_layer_type
from ovqprof.tolerances import assert_close_rel, rel_rms_error

D, H, DH, B = 16, 4, 8, 2
L, S = 8, 16  # Transformer-VQ block length and codebook size of these tests
T = 45  # not a multiple of L: five full blocks and a partial one

CONFIGS = {
    "tvq": (TransformerVQ, {"codebook_size": S, "block_size": L}),
    "tvq-block1": (TransformerVQ, {"codebook_size": 3, "block_size": 1}),
    "mka": (MKA, {}),
    "mka-beta0.5": (MKA, {"beta": 0.5, "router_hidden": 4}),
    "fast_mka": (FastMKA, {}),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def make(cls, dtype=torch.float64, **opts):
    torch.manual_seed(0)
    return cls(D, H, DH, cls.Options(**opts)).to(dtype)


def rand_x(n, dtype=torch.float64, batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, D, generator=g, dtype=dtype)


def naive_attention(q, k, v):
    """Explicit T x T causal softmax, q, k, v[B, H, T, dh]."""
    n = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, -math.inf).softmax(-1) @ v


def heads(t):
    return t.view(t.shape[0], t.shape[1], H, DH).transpose(1, 2)


def output(layer, o):
    return layer.o_proj(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], H * DH))


def naive_ema(x, beta):
    m, out = torch.zeros_like(x[:, 0]), []
    for t in range(x.shape[1]):
        m = beta * m + (1 - beta) * x[:, t]
        out.append(m)
    return torch.stack(out, dim=1)


# --- decode against forward and the decode contract ------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_matches_forward(name, dtype):
    cls, opts = CONFIGS[name]
    layer = make(cls, dtype, **opts)
    x = rand_x(T, dtype)
    with torch.no_grad():
        expected = layer(x)
        # odd prefixes: 7 steps across five block boundaries, 17 starts with a non-empty code cache
        for prefix, capacity in ((7, T), (17, None), (1, None)):
            actual, state = decode_all(layer, x, prefix, capacity)
            assert_close_rel(actual, expected)
            assert state.length == T


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prefix", [16, 19])  # 16: the step starts block 2 and folds block 0 into the cache
def test_step_twice_from_one_state_is_identical_and_leaves_it_untouched(name, prefix):
    cls, opts = CONFIGS[name]
    layer = make(cls, **opts)
    x = rand_x(prefix + 2)
    with torch.no_grad():
        _, state = layer.prefill(x[:, :prefix])
        before = {k: v.clone() for k, v in vars(state).items() if isinstance(v, torch.Tensor)}
        y1, _ = layer.step(x[:, prefix:prefix + 1], state)
        y_other, _ = layer.step(x[:, prefix + 1:], state)  # another token from the same state in between
        y2, new = layer.step(x[:, prefix:prefix + 1], state)
        expected = layer(x[:, :prefix + 1])[:, -1:]
    assert torch.equal(y1, y2) and not torch.allclose(y1, y_other)
    assert_close_rel(y1, expected)
    assert new.length == prefix + 1 and state.length == prefix
    for key, value in before.items():  # what the input state held: slots below its length, cache, EMA
        held = getattr(state, key)
        if key in ("cur_k", "cur_v"):
            r = prefix - (prefix - 1) // layer.block_size * layer.block_size
            assert torch.equal(held[:, :, :r], value[:, :, :r]), key
        elif key in ("k", "v"):
            assert torch.equal(held[..., :prefix, :], value[..., :prefix, :]), key
        else:
            assert torch.equal(held, value), key


def test_mka_ema_state_is_carried_across_steps():
    layer = make(FastMKA)
    x = rand_x(20)
    with torch.no_grad():
        _, state = decode_all(layer, x, 5)
    assert_close_rel(state.ema, naive_ema(x, 0.9)[:, -1])
    # a decode path that reset the EMA every call would give a different output: the gate would catch it
    with torch.no_grad():
        _, mid = layer.prefill(x[:, :19])
        reset = type(mid)(mid.k, mid.v, torch.zeros_like(mid.ema), mid.length)
        y_reset, _ = layer.step(x[:, 19:], reset)
        y_kept, _ = layer.step(x[:, 19:], mid)
    assert rel_rms_error(y_reset, y_kept) > 1e-3
    assert_close_rel(y_kept, layer(x)[:, -1:])


def test_causal_ema_matches_recurrence_across_chunks_and_from_a_start_state():
    x = rand_x(150, batch=3)  # three EMA chunks of 64, the last one partial
    assert_close_rel(causal_ema(x, 0.9), naive_ema(x, 0.9))
    m0 = rand_x(1, batch=3, seed=5)[:, 0]
    full = causal_ema(torch.cat([torch.zeros_like(x[:, :1]), x], dim=1), 0.7)  # 0 token leaves m0 = 0
    assert_close_rel(causal_ema(x, 0.7, torch.zeros_like(m0)), full[:, 1:])
    ref = naive_ema(torch.cat([m0.unsqueeze(1) / 0.3, x], dim=1), 0.7)[:, 1:]  # first token sets m = m0
    assert_close_rel(causal_ema(x, 0.7, m0), ref)


# --- state bytes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n", [1, 7, T])
def test_state_bytes_match_state_tensors(name, n):
    cls, opts = CONFIGS[name]
    layer = make(cls, **opts)
    with torch.no_grad():
        _, state = layer.prefill(rand_x(n))
    assert layer.state_bytes(B, n) == tensor_bytes(state) > 0


def test_transformer_vq_state_is_constant_in_length():
    layer = make(TransformerVQ, codebook_size=S, block_size=L)
    expected = B * H * (S * (DH + 1) * 8 + 2 * L * 2 * DH * 8)
    assert layer.state_bytes(B, 1) == layer.state_bytes(B, 100_000) == expected
    with torch.no_grad():
        _, state = decode_all(layer, rand_x(40), 3)
    assert tensor_bytes(state) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache_sums_and_ema_are_float32(dtype):
    vq = make(TransformerVQ, dtype, codebook_size=S, block_size=L)
    mka = make(MKA, dtype)
    x = rand_x(30, dtype)
    with torch.no_grad():
        _, vq_state = decode_all(vq, x, 19)
        _, mka_state = decode_all(mka, x, 19, 30)  # preallocated: no growth beyond 30
    assert vq_state.counts.dtype == vq_state.sums.dtype == mka_state.ema.dtype == torch.float32
    assert vq_state.cur_k.dtype == mka_state.k.dtype == dtype
    assert vq.state_bytes(B, 30) == tensor_bytes(vq_state) == B * H * (S * (DH + 1) * 4 + 4 * L * DH * 2)
    assert mka.state_bytes(B, 30) == tensor_bytes(mka_state) == 2 * 2 * B * H * 30 * DH * 2 + B * D * 4


# --- gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_reach_every_parameter(name):
    cls, opts = CONFIGS[name]
    layer = make(cls, **opts)
    x = rand_x(T).requires_grad_(True)
    (layer(x) * rand_x(T, seed=2)).sum().backward()
    for pname, p in [*layer.named_parameters(), ("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    if cls is TransformerVQ:
        assert "codebook" in dict(layer.named_parameters())


@pytest.mark.parametrize("cls,opts", [(MKA, {}), (FastMKA, {"router_hidden": 3})])
def test_gradcheck(cls, opts):
    """MKA's gradients are the true ones; Transformer-VQ's are straight-through by design (argmin has zero
    derivative), so it is checked against a naive reference with the same estimator instead (below)."""
    torch.manual_seed(0)
    layer = cls(4, 2, 3, cls.Options(**opts)).to(torch.float64)
    x = torch.randn(1, 7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


# --- Transformer-VQ against exact attention --------------------------------------------------------------
def tokens_from_vocabulary(n, vocab=6, seed=3):
    """x[B, n, D] drawn from `vocab` distinct vectors: equal tokens give equal keys, so codes get counts > 1."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, D, generator=g, dtype=torch.float64)
    return table[torch.randint(vocab, (B, n), generator=g)], table


def test_transformer_vq_with_the_exact_keys_as_codes_is_causal_softmax_attention():
    layer = make(TransformerVQ, codebook_size=S, block_size=L)
    x, table = tokens_from_vocabulary(T)
    with torch.no_grad():
        keys = heads(layer.k_proj(table.unsqueeze(0)))[0]  # [H, vocab, dh]
        layer.codebook[:, :keys.shape[1]] = keys  # the other codes stay random: never nearer than an exact one
        q, k, v = (heads(p(x)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        expected = output(layer, naive_attention(q, k, v))
        actual = layer(x)
        assert_close_rel(actual, expected)
        decoded, state = decode_all(layer, x, 9)
        assert_close_rel(decoded, expected)
        assert state.counts.max() > 1  # the cache really merged equal keys into one code
        # a random codebook quantises the keys: the same layer is then no longer exact attention
        layer.codebook.copy_(torch.randn_like(layer.codebook))
        assert rel_rms_error(layer(x), expected) > 1e-3


@pytest.mark.parametrize("block", [1, 5, L, 64])
def test_transformer_vq_equals_full_attention_over_quantised_keys(block):
    layer = make(TransformerVQ, codebook_size=S, block_size=block)
    x = rand_x(T)
    with torch.no_grad():
        q, k, v = (heads(p(x)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        dist = torch.cdist(k, layer.codebook.unsqueeze(0).expand(B, -1, -1, -1))  # [B, H, T, S]
        kq = torch.stack([layer.codebook[h][dist[:, h].argmin(-1)] for h in range(H)], dim=1)
        assert_close_rel(layer(x), output(layer, naive_attention(q, kq, v)))


def test_transformer_vq_gradients_match_full_attention_with_the_straight_through_estimator():
    """The backward of the block-recurrent form equals that of full T x T attention where a key inside the
    query's two-block window is the straight-through key C[z] + k - sg(k) and an older key (in the code cache)
    is the code C[z] itself: the cache passes gradient to the codebook, not to the old keys."""
    block = 5
    layer = make(TransformerVQ, codebook_size=S, block_size=block)
    x = rand_x(T).requires_grad_(True)
    dy = rand_x(T, seed=2)

    def reference(inp):
        q, k, v = (heads(p(inp)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        codes = torch.cdist(k.detach(), layer.codebook.detach().unsqueeze(0).expand(B, -1, -1, -1)).argmin(-1)
        chosen = torch.stack([layer.codebook[h][codes[:, h]] for h in range(H)], dim=1)
        blk = torch.arange(T) // block
        in_window = blk.view(1, T) >= blk.view(T, 1) - 1  # [query, key]
        scores = torch.where(in_window, q @ (chosen + (k - k.detach())).transpose(-1, -2), q @ chosen.transpose(-1, -2))
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        p = (scores / math.sqrt(DH)).masked_fill(~causal, -math.inf).softmax(-1)
        return output(layer, p @ v)

    grads = []
    for fn in (layer, reference):
        layer.zero_grad()
        x.grad = None
        (fn(x) * dy).sum().backward()
        grads.append([x.grad.clone(), *(p.grad.clone() for p in layer.parameters())])
    for actual, expected in zip(*grads, strict=True):
        assert_close_rel(actual, expected)


def test_transformer_vq_probe_reads_the_written_pairs():
    layer = make(TransformerVQ, codebook_size=40, block_size=4)
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(1, H, 30, DH, generator=g, dtype=torch.float64)
    values = torch.randn(1, H, 30, 5, generator=g, dtype=torch.float64)
    queries = torch.randn(1, H, 9, DH, generator=g, dtype=torch.float64)
    exact = torch.softmax(queries @ keys.transpose(-1, -2) / math.sqrt(DH), -1) @ values
    random_reads = layer.probe_memory(keys, values, queries)
    with torch.no_grad():
        layer.codebook[:, :30] = keys[0]
    assert_close_rel(layer.probe_memory(keys, values, queries), exact)
    assert rel_rms_error(random_reads, exact) > 1e-2  # an untrained codebook writes random keys coarsely
    # dk other than head_dim: a fresh codebook of that width, reads still of the written values' width
    other = layer.probe_memory(keys[..., :3], values, queries[..., :3])
    assert other.shape == (1, H, 9, 5) and torch.isfinite(other).all()
    assert layer.probe_memory(keys.bfloat16(), values.bfloat16(), queries.bfloat16()).dtype == torch.float64
    with pytest.raises(ValueError):
        layer.probe_memory(keys[:, :2], values[:, :2], queries[:, :2])


# --- MKA and FastMKA against attention on one level -----------------------------------------------------
def force_router(layer, level):
    """Router weights that put all weight on `level` (exp(-60) ~ 1e-26 on the other)."""
    last = layer.router[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([30.0, -30.0] if level == 0 else [-30.0, 30.0]))


@pytest.mark.parametrize("cls", [MKA, FastMKA])
@pytest.mark.parametrize("level", [0, 1])
def test_one_hot_router_gives_attention_on_that_level(cls, level):
    layer = make(cls, beta=0.8)
    force_router(layer, level)
    x = rand_x(T)
    memory = x if level == 0 else naive_ema(x, 0.8)
    with torch.no_grad():
        expected = output(layer, naive_attention(heads(layer.q_proj(x)), heads(layer.k_proj(memory)),
                                                 heads(layer.v_proj(memory))))
        assert_close_rel(layer(x), expected)


def test_fast_mka_and_mka_agree_only_with_a_one_hot_router():
    mka, fast = make(MKA), make(FastMKA)
    fast.load_state_dict(mka.state_dict())
    x = rand_x(T)
    with torch.no_grad():
        assert rel_rms_error(fast(x), mka(x)) > 1e-3  # soft router: mixing inputs != mixing outputs
        for level in (0, 1):
            force_router(mka, level)
            force_router(fast, level)
            assert_close_rel(fast(x), mka(x))


@pytest.mark.parametrize("cls", [MKA, FastMKA])
def test_mka_probe_is_uniformly_routed_attention(cls):
    layer = make(cls, beta=0.6)
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(2, H, 20, DH, generator=g, dtype=torch.float64)
    values = torch.randn(2, H, 20, 5, generator=g, dtype=torch.float64)
    queries = torch.randn(2, H, 3, DH, generator=g, dtype=torch.float64)

    def read(k, v):
        return torch.softmax(queries @ k.transpose(-1, -2) / math.sqrt(DH), -1) @ v

    def ema(t):
        return naive_ema(t.flatten(0, 1), 0.6).view(t.shape)

    k2, v2 = ema(keys), ema(values)
    expected = (read(keys, values) + read(k2, v2)) / 2 if cls is MKA else read((keys + k2) / 2, (values + v2) / 2)
    assert_close_rel(layer.probe_memory(keys, values, queries), expected)


# --- options, registry, cost -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls,opts,field", [
    (TransformerVQ, {"codebook_size": 0}, "codebook_size"), (TransformerVQ, {"block_size": 0}, "block_size"),
    (TransformerVQ, {"window": 4}, "window"), (MKA, {"beta": 1.0}, "beta"), (MKA, {"beta": 0.0}, "beta"),
    (FastMKA, {"router_hidden": 0}, "router_hidden"), (FastMKA, {"levels": 3}, "levels"),
])
def test_invalid_options_raise_validation_error_naming_the_field(cls, opts, field):
    with pytest.raises(ValidationError) as info:
        cls.Options(**opts)
    assert info.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("name", ["mka", "fast_mka"])
def test_retrieval_level_is_rejected_with_a_config_error(name):
    with pytest.raises(LayerConfigError) as info:
        build_layer(get_layer_type(name), D, H, DH, {"retrieval": True})
    assert info.value.field == "retrieval" and "not implemented" in str(info.value)


@pytest.mark.parametrize("name,cls", [("transformer_vq", TransformerVQ), ("mka", MKA), ("fast_mka", FastMKA)])
def test_registry_builds_each_layer_with_its_options(name, cls):
    assert name in BUILTIN_LAYERS
    layer_type = get_layer_type(name)
    layer = build_layer(layer_type, D, H, DH, {})
    assert type(layer) is cls and layer_type.summary and layer_type.kind == cls.kind
    assert {row[0] for row in layer_type.option_table()} == set(cls.Options.model_fields)
    assert layer.implementation() in ("torch-blocked", "sdpa")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cost_model(name):
    cls, opts = CONFIGS[name]
    layer = make(cls, **opts)
    fwd, bwd = layer.cost("fwd", B, 64), layer.cost("bwd", B, 64)
    assert bwd.flops > fwd.flops > 0 and bwd.bytes > fwd.bytes > layer.weight_bytes()
    with pytest.raises(ValueError):
        layer.cost("train", B, 64)
    if cls is TransformerVQ:
        Lb = layer.block_size
        # decode: constant in the context beyond two blocks; fwd: linear in T for whole blocks
        assert layer.cost("decode", B, 3 * Lb + 1) == layer.cost("decode", B, 1000 * Lb + 1)
        if Lb > 1:  # a step that starts a block folds the previous one into the cache
            assert layer.cost("decode", B, 4 * Lb).flops > layer.cost("decode", B, 4 * Lb + 1).flops
        c1, c2 = layer.cost("fwd", B, 40 * Lb), layer.cost("fwd", B, 80 * Lb)
        assert 1.9 < c2.flops / c1.flops < 2.1
    else:
        assert layer.cost("decode", B, 100).flops < layer.cost("decode", B, 101).flops
        assert layer.cost("fwd", B, 1280).flops > 2.5 * layer.cost("fwd", B, 640).flops


def test_transformer_vq_fwd_flops_counted_key_by_key():
    layer = make(TransformerVQ, codebook_size=S, block_size=L)
    n = 20  # blocks of 8, 8 and 4
    scores = 0
    for t in range(n):  # each query scores its whole block (masked), the previous block and, from block 2, S codes
        blk = t // L
        scores += (min(n, (blk + 1) * L) - blk * L) + (L if blk >= 1 else 0) + (S if blk >= 2 else 0)
    proj = B * n * (2 * D * 3 * H * DH + 2 * H * DH * D)
    quantise = B * n * 2 * H * S * DH
    fold = B * H * L * (DH + 1)  # block 0 folded once, before block 2
    assert layer.cost("fwd", B, n).flops == proj + quantise + 4 * B * H * DH * scores + fold


def test_mka_state_is_kv_caches_plus_one_ema_vector():
    assert make(FastMKA).state_bytes(B, 50) == 2 * B * H * 50 * DH * 8 + B * D * 8
    assert make(MKA).state_bytes(B, 50) == 2 * 2 * B * H * 50 * DH * 8 + B * D * 8


def test_fast_mka_costs_less_than_mka():
    mka, fast = make(MKA), make(FastMKA)
    for mode in ("fwd", "bwd", "decode"):
        assert fast.cost(mode, B, 512).flops < mka.cost(mode, B, 512).flops
    assert fast.state_bytes(B, 512) < mka.state_bytes(B, 512)


# --- the CLI ---------------------------------------------------------------------------------------------
PROFILE = """\
name: rivals-tiny
defaults: {batch: 1, d_model: 32, heads: 2, head_dim: 16, dtype: float32, device: cpu}
layers:
  - {name: tvq, type: transformer_vq, codebook_size: 16, block_size: 16}
  - {name: mka, type: mka}
  - {name: fast_mka, type: fast_mka, beta: 0.8}
sweep: {seq: 128, modes: [fwd], batch: 1, warmup_ms: 1, rep_ms: 5, check_seq: 40}
"""


def test_cli_sweep_of_the_rival_layers(tmp_path):
    profile = tmp_path / "rivals.yaml"
    profile.write_text(PROFILE)
    result = CliRunner().invoke(app, ["sweep", "--profile", str(profile), "--seq", "128", "--modes",
                                      "fwd,bwd,decode", "--format", "csv", "--no-roofline"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {(r["layer"], r["mode"]) for r in rows} == {
        (name, mode) for name in ("tvq", "mka", "fast_mka") for mode in ("fwd", "bwd", "decode")}
    assert all(r["status"] == "ok" and r["check"] == "pass" for r in rows), rows
