"""Softmax-family rivals (issue 5): MLA, CCA / CCGQA and Bank of Values, with the options of issue 22 that
make them run as DeepSeek and ZAYA1 do (held against transformers in test_peers_transformers.py). Decode
against forward in float64 and float32, repeated steps, state bytes against the live state tensors,
gradients, MLA absorbed decode against non-absorbed attention, the CCA conv tail and value shift across the
prefill/step boundary, Bank of Values ids and table, the memory probe, option errors, cost model and one CLI
sweep."""

from __future__ import annotations

import csv
import io
import math

import pytest
import torch
import torch.nn.functional as F
from decode_helpers import decode_all
from pydantic import ValidationError
from typer.testing import CliRunner

from ovqprof.cli import app
from ovqprof.layers.bank_of_values import BankOfValues
from ovqprof.layers.base import LayerConfigError, tensor_bytes
from ovqprof.layers.cca import CompressedConvAttention, CompressedConvGQA
from ovqprof.layers.mla import MultiHeadLatentAttention
from ovqprof.layers.rope import apply_rope, rope_cos_sin
from ovqprof.registry import build_layer, get_layer_type
from ovqprof.tolerances import assert_close_rel

D, H, DH, B = 16, 4, 8, 2
DC, DR = 12, 4  # MLA latent and rope widths: 16 values per token, not 2*H*DH = 64

CONFIGS = {
    "mla": (MultiHeadLatentAttention, {"kv_latent": DC, "rope_dim": DR}),
    "mla_qlatent": (MultiHeadLatentAttention, {"kv_latent": DC, "rope_dim": DR, "q_latent": 10}),
    "mla_norope": (MultiHeadLatentAttention, {"kv_latent": 6, "rope_dim": 0}),
    "mla_deepseek": (MultiHeadLatentAttention, {"kv_latent": DC, "rope_dim": DR, "q_latent": 10,
                                                "latent_norm": True, "rope_layout": "interleaved",
                                                "yarn_factor": 40.0}),
    "cca": (CompressedConvAttention, {}),
    "cca_k3": (CompressedConvAttention, {"kernel_size": 3, "channel_kernel_size": 3}),
    "ccgqa": (CompressedConvGQA, {"compression": 1}),  # 4 latent query heads share 2 kv heads
    "ccgqa_mqa_norope": (CompressedConvGQA, {"compression": 1, "kv_heads": 1, "rope": False}),
    "cca_zaya1": (CompressedConvGQA, {"compression": 1, "kv_heads": 2, "rope_fraction": 0.5,
                                      "rope_theta": 5e6, "value_shift": "whole_heads",
                                      "temperature_init": 0.0}),
    "bov": (BankOfValues, {"vocab_size": 50}),
    "bov_gqa": (BankOfValues, {"vocab_size": 50, "kv_heads": 2}),
}
IDS = list(CONFIGS)
TYPES = {"mla": MultiHeadLatentAttention, "cca": CompressedConvAttention, "ccgqa": CompressedConvGQA,
         "bank_of_values": BankOfValues}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def make(name, dtype=torch.float64, **extra):
    cls, opts = CONFIGS[name]
    torch.manual_seed(0)
    layer = cls(D, H, DH, cls.Options(**{**opts, **extra})).to(dtype)
    if cls in (CompressedConvAttention, CompressedConvGQA):  # a temperature away from 1 catches a missing one
        with torch.no_grad():
            layer.temperature.copy_(torch.linspace(0.7, 1.6, layer.kv_heads, dtype=torch.float64))
    return layer


def rand_x(T, dtype=torch.float64, batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, T, D, generator=g, dtype=dtype)


# --- forward against naive references (explicit T x T softmax, no SDPA) --------------------------------
def causal_softmax(q, k, v, scale):
    """q[B, H, T, d], k[B, H, T, d], v[B, H, T, dv] -> explicit masked softmax attention [B, H, T, dv]."""
    T = q.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return ((q @ k.transpose(-1, -2)) * scale).masked_fill(~mask, -math.inf).softmax(-1) @ v


def rope(t, theta=10000.0, inv=None, interleaved=False):
    """RoPE on t[..., T, d] at positions 0..T-1, pairs (i, i + d/2) or (2i, 2i + 1) (interleaved, left in that
    layout), written out with sin/cos of each pair; frequencies theta^(-2i/d) unless given (inv[d/2])."""
    T, d = t.shape[-2], t.shape[-1]
    if inv is None:
        inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    if interleaved:
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], dim=-1).flatten(-2)
    a, b = t[..., : d // 2], t[..., d // 2:]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], dim=-1)


def rms_norm(t, weight, eps=1e-6):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


def naive_mla(layer, x):
    """MLA by its formula; with the DeepSeek options: latent RMSNorms, interleaved pairs, YaRN frequencies
    (the layer's, checked against transformers in test_peers_transformers.py), mscale^2 on the softmax
    scale."""
    opts = layer.options
    Bx, T, _ = x.shape
    if opts.q_latent is None:
        q = layer.q_proj(x)
    else:
        q_lat = layer.q_proj[0](x)
        q = layer.q_proj[-1](rms_norm(q_lat, layer.q_proj[1].weight) if opts.latent_norm else q_lat)
    q = q.view(Bx, T, H, DH + layer.rope_dim).transpose(1, 2)
    c, k_r = layer.kv_down(x).split([layer.kv_latent, layer.rope_dim], dim=-1)
    if opts.latent_norm:
        c = rms_norm(c, layer.kv_norm.weight)
    k_nope = layer.k_up(c).view(Bx, T, H, DH).transpose(1, 2)
    inv = None if opts.yarn_factor is None else layer._inv_freq
    interleaved = opts.rope_layout == "interleaved"
    k_r = rope(k_r, inv=inv, interleaved=interleaved).unsqueeze(1).expand(Bx, H, T, layer.rope_dim)
    q = torch.cat([q[..., :DH], rope(q[..., DH:], inv=inv, interleaved=interleaved)], dim=-1)
    v = layer.v_up(c).view(Bx, T, H, DH).transpose(1, 2)
    scale = 1 / math.sqrt(DH + layer.rope_dim)
    if opts.yarn_factor is not None:  # yarn_mscale = yarn_mscale_all_dim: cos/sin unscaled
        scale *= (0.1 * opts.yarn_mscale_all_dim * math.log(opts.yarn_factor) + 1) ** 2
    o = causal_softmax(q, torch.cat([k_nope, k_r], dim=-1), v, scale)
    return layer.o_proj(o.transpose(1, 2).reshape(Bx, T, H * DH))


def naive_cca(layer, x):
    """CCA by its recipe with torch's own Conv1d modules (left zero padding), RoPE on the first rope_fraction
    of each head and per-head value halves (value_shift per_head) or halves of the whole value vector."""
    Bx, T, _ = x.shape
    Hl, G, s = layer.latent_heads, layer.kv_heads, layer.shift_dim
    q_raw, k_raw = layer.q_proj(x), layer.k_proj(x)
    qh, kh = q_raw.view(Bx, T, Hl, DH), k_raw.view(Bx, T, G, DH)
    r_q = (qh + kh.repeat_interleave(Hl // G, dim=2)) / 2  # mean of pre-conv q and k
    r_k = r_q.view(Bx, T, G, Hl // G, DH).mean(dim=3)
    qk = F.pad(torch.cat([q_raw, k_raw], dim=-1).transpose(1, 2), (layer.tail, 0))
    mixed = layer.conv_head(layer.conv_time(qk)).transpose(1, 2)
    q = mixed[..., : Hl * DH].reshape(Bx, T, Hl, DH) + r_q
    k = mixed[..., Hl * DH:].reshape(Bx, T, G, DH) + r_k
    q = F.normalize(q, dim=-1) * math.sqrt(DH)
    k = F.normalize(k, dim=-1) * math.sqrt(DH) * layer.temperature.view(1, 1, G, 1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if layer.options.rope:
        r, theta = int(DH * layer.options.rope_fraction), layer.options.rope_theta
        q = torch.cat([rope(q[..., :r], theta), q[..., r:]], dim=-1)
        k = torch.cat([rope(k[..., :r], theta), k[..., r:]], dim=-1)
    if layer.options.value_shift == "per_head":
        v = torch.zeros(Bx, T, G, DH, dtype=x.dtype)
        v[..., : DH - s] = layer.v_current(x).view(Bx, T, G, DH - s)
        v[:, 1:, :, DH - s:] = layer.v_shifted(x[:, :-1]).view(Bx, T - 1, G, s)  # token t-1, zeros at t = 0
    else:
        v = torch.zeros(Bx, T, G * DH, dtype=x.dtype)
        v[..., : G * DH // 2] = layer.v_current(x)
        v[:, 1:, G * DH // 2:] = layer.v_shifted(x[:, :-1])
        v = v.view(Bx, T, G, DH)
    rep = Hl // G
    o = causal_softmax(q, k.repeat_interleave(rep, dim=1), v.transpose(1, 2).repeat_interleave(rep, dim=1),
                       1 / math.sqrt(DH))
    return layer.o_proj(o.transpose(1, 2).reshape(Bx, T, Hl * DH))


def naive_bov(layer, x):
    Bx, T, _ = x.shape
    G = layer.kv_heads
    ids = ((x > 0).long() * layer.hash_multipliers).sum(-1) % layer.options.vocab_size
    v = (layer.gamma * layer.value_table.weight[ids]).view(Bx, T, G, DH).transpose(1, 2)
    q = layer.q_proj(x).view(Bx, T, H, DH).transpose(1, 2)
    k = layer.k_proj(x).view(Bx, T, G, DH).transpose(1, 2)
    o = causal_softmax(q, k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1), 1 / math.sqrt(DH))
    return layer.o_proj(o.transpose(1, 2).reshape(Bx, T, H * DH))


NAIVE = {MultiHeadLatentAttention: naive_mla, CompressedConvAttention: naive_cca, CompressedConvGQA: naive_cca,
         BankOfValues: naive_bov}


@pytest.mark.parametrize("name", IDS)
def test_forward_matches_naive_reference(name):
    layer = make(name)
    x = rand_x(9)
    with torch.no_grad():
        assert_close_rel(layer(x), NAIVE[CONFIGS[name][0]](layer, x))


# --- decode against forward ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_matches_forward(name, dtype):
    layer = make(name, dtype)
    T = 15
    x = rand_x(T, dtype)
    with torch.no_grad():
        expected = layer(x)
        for prefix, capacity in [(7, T), (1, T), (3, None)]:  # odd prefixes; None: grown by step
            actual, state = decode_all(layer, x, prefix, capacity)
            assert_close_rel(actual, expected)
            assert state.length == T


@pytest.mark.parametrize("name", IDS)
def test_repeated_step_gives_identical_output(name):
    layer = make(name)
    x = rand_x(9)
    with torch.no_grad():
        for capacity in (None, 9):  # a full cache (grown by the step) and a preallocated one
            _, state = layer.prefill(x[:, :7], capacity)
            before = {f: _live(f, t, 7).clone() for f, t in _tensors(state)}
            y1, _ = layer.step(x[:, 7:8], state)
            y_other, _ = layer.step(x[:, 8:9], state)  # another token from the same state in between
            y2, _ = layer.step(x[:, 7:8], state)
            assert torch.equal(y1, y2) and not torch.allclose(y1, y_other)
            assert_close_rel(y1, layer(x[:, :8])[:, -1:])
            # the live part of the input state is untouched (slots beyond `length` may be written)
            for f, t in _tensors(state):
                assert torch.equal(before[f], _live(f, t, 7)), f


TIME_DIM = {"ckv": 1, "ids": 1, "k": 2, "v": 2}  # cache fields by their time axis; others are fixed-size


def _tensors(state):
    return [(f, getattr(state, f)) for f in state.__dataclass_fields__ if isinstance(getattr(state, f), torch.Tensor)]


def _live(field, t, length):
    """The first `length` positions of a cache field; a fixed-size field (conv tail, v_prev) whole."""
    return t.narrow(TIME_DIM[field], 0, length) if field in TIME_DIM else t


# --- state bytes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("T", [1, 6])
def test_state_bytes_match_state_tensors(name, T):
    layer = make(name, torch.float32)
    with torch.no_grad():
        _, state = layer.prefill(rand_x(T, torch.float32), capacity=T)
    assert layer.state_bytes(B, T) == tensor_bytes(state) > 0


def test_state_bytes_per_token():
    mla = make("mla", torch.float32)
    with torch.no_grad():
        _, state = mla.prefill(rand_x(5, torch.float32), capacity=5)
    assert state.ckv.shape == (B, 5, DC + DR)  # the latent and the shared rope key: nothing per head
    assert mla.state_bytes(B, 5) == B * 5 * (DC + DR) * 4 != B * 5 * 2 * H * DH * 4
    with torch.device("meta"):  # published sizes, no weights allocated
        deepseek = MultiHeadLatentAttention(2048, 16, 128).to(torch.bfloat16)
        zaya = CompressedConvGQA(2048, 16, 128).to(torch.bfloat16)  # 8 latent query heads, 2 kv heads
    assert deepseek.state_bytes(1, 1) == 576 * 2
    for name in ("cca", "ccgqa", "ccgqa_mqa_norope"):
        cca = make(name, torch.float32)
        assert cca.state_bytes(B, 8) - cca.state_bytes(B, 7) == B * 2 * cca.kv_heads * DH * 4
    assert zaya.state_bytes(1, 101) - zaya.state_bytes(1, 100) == 512 * 2  # 512 values per token, 8x below MHA
    bov = make("bov_gqa", torch.float32)
    with torch.no_grad():
        _, state = bov.prefill(rand_x(5, torch.float32), capacity=5)
    assert state.ids.dtype == torch.int32 and state.ids.shape == (B, 5)
    assert bov.state_bytes(B, 8) - bov.state_bytes(B, 7) == B * (2 * DH * 4 + 4)  # K of 2 kv heads + an id


# --- gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
def test_gradients_reach_every_parameter(name):
    layer = make(name)
    x = rand_x(10).requires_grad_(True)
    (layer(x) * rand_x(10, seed=2)).sum().backward()
    for pname, p in [*layer.named_parameters(), ("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


# --- MLA -----------------------------------------------------------------------------------------------
def test_mla_absorbed_decode_equals_non_absorbed_attention():
    layer = make("mla_qlatent")
    dh, T = DH, 9
    x = rand_x(T)
    with torch.no_grad():
        _, state = layer.prefill(x[:, :T - 1], capacity=T)
        y_abs, new = layer.step(x[:, T - 1:], state)
        assert layer.implementation() == "absorbed-sdpa"
        # non-absorbed: up-project every cached latent to per-head K and V, explicit softmax
        c, k_rope = new.ckv[:, :T, :DC], new.ckv[:, :T, DC:]
        k = torch.cat([layer.k_up(c).view(B, T, H, dh), k_rope.unsqueeze(2).expand(B, T, H, DR)], dim=-1)
        v = layer.v_up(c).view(B, T, H, dh)
        q = layer.q_proj(x[:, T - 1:]).view(B, 1, H, dh + DR)
        cos, sin = rope_cos_sin(torch.tensor([T - 1]), DR, 10000.0, torch.float64)
        q = torch.cat([q[..., :dh], apply_rope(q[..., dh:].transpose(1, 2), cos, sin).transpose(1, 2)], dim=-1)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh + DR)
        o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, 1, H * dh)
        assert_close_rel(y_abs, layer.o_proj(o))
        # the cached rope key is the rotated W_kr h of each position
        _, k_r = layer.kv_down(x).split([DC, DR], dim=-1)
        cos, sin = rope_cos_sin(torch.arange(T), DR, 10000.0, torch.float64)
        assert_close_rel(k_rope, apply_rope(k_r, cos, sin))
    layer(x)
    assert layer.implementation() == "sdpa-vpad"  # v padded to the qk head dim: SDPA's CPU flash kernel
    no_rope = make("mla_norope")
    no_rope(x)
    assert no_rope.implementation() == "sdpa"


def test_mla_rope_makes_attention_position_dependent():
    """The same keys at shifted positions give different scores only through RoPE."""
    x = rand_x(6)
    with_rope, no_rope = make("mla"), make("mla_norope")
    with torch.no_grad():
        _, s1 = with_rope.prefill(x[:, :3], capacity=6)
        shifted = with_rope._latents(x[:, :3], 2)
        assert not torch.allclose(s1.ckv[:, :3, DC:], shifted[..., DC:])
        assert torch.equal(s1.ckv[:, :3, :DC], shifted[..., :DC])  # the latent itself carries no position
        assert torch.equal(no_rope._latents(x, 0), no_rope._latents(x, 5))


# --- CCA -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,prefix", [("cca_k3", 1), ("cca_k3", 2), ("cca_k3", 5), ("ccgqa", 3)])
def test_cca_conv_tail_and_value_shift_across_the_boundary(name, prefix):
    layer = make(name)
    x = rand_x(8)
    L = layer.tail
    with torch.no_grad():
        _, state = layer.prefill(x[:, :prefix], capacity=8)
        raw = torch.cat([layer.q_proj(x), layer.k_proj(x)], dim=-1).transpose(1, 2)  # [B, Cqk, T]
        padded = F.pad(raw, (L, 0))  # zeros before position 0
        assert_close_rel(state.qk_tail, padded[..., prefix:prefix + L])  # the last L raw columns
        assert_close_rel(state.v_prev, layer.v_shifted(x[:, prefix - 1]))
        # cached values: first dh - dh//2 channels from token t, last dh//2 from token t-1 (zeros at t = 0)
        _, full = layer.prefill(x)
        s = layer.shift_dim
        cur = layer.v_current(x).view(B, 8, layer.kv_heads, DH - s).transpose(1, 2)
        prev = F.pad(layer.v_shifted(x)[:, :-1], (0, 0, 1, 0)).view(B, 8, layer.kv_heads, s).transpose(1, 2)
        assert_close_rel(full.v[..., : DH - s], cur)
        assert_close_rel(full.v[..., DH - s:], prev)
        # and step by step from this prefix
        actual, stepped = decode_all(layer, x, prefix, capacity=8)
        assert_close_rel(actual, layer(x))
        assert_close_rel(stepped.v, full.v)
        assert_close_rel(stepped.k, full.k)
        assert_close_rel(stepped.qk_tail, padded[..., 8:8 + L])


def test_cca_latent_width_and_kv_sharing():
    cca, ccgqa = make("cca"), make("ccgqa")
    assert (cca.latent_heads, cca.kv_heads) == (H // 2, H // 2)  # compression 2, CCA: kv = latent heads
    assert (ccgqa.latent_heads, ccgqa.kv_heads) == (H, 2)
    assert cca.q_proj.out_features == H // 2 * DH and cca.o_proj.in_features == H // 2 * DH


def test_cca_keys_are_normalised_and_tempered():
    layer = make("ccgqa_mqa_norope")
    with torch.no_grad():
        tail = torch.zeros(B, layer.qk_channels, layer.tail, dtype=torch.float64)
        q, k, _ = layer._qk(rand_x(5), tail, 0)
    assert_close_rel(q.norm(dim=-1), torch.full_like(q.norm(dim=-1), math.sqrt(DH)))
    assert_close_rel(k.norm(dim=-1), torch.full_like(k.norm(dim=-1), math.sqrt(DH) * 0.7))  # temperature 0.7


# --- Bank of Values ------------------------------------------------------------------------------------
def test_bov_token_ids_deterministic_and_in_range():
    layer = make("bov")
    x = rand_x(200, batch=1)
    ids = layer.token_ids(x)
    assert ids.shape == (1, 200) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 50
    assert len(ids.unique()) > 40  # spread over the vocabulary
    assert torch.equal(ids, layer.token_ids(x.clone()))
    assert torch.equal(ids, layer.token_ids(x.float())) and torch.equal(ids, layer.token_ids(x.bfloat16()))
    torch.manual_seed(123)  # another layer instance, another global seed: the same hash
    other = BankOfValues(D, H, DH, BankOfValues.Options(vocab_size=50))
    assert torch.equal(ids, other.token_ids(x))
    # the hash of the class docstring: (sum_j [x_j > 0] m_j) mod |V|
    expected = ((x > 0).long() * layer.hash_multipliers).sum(-1) % 50
    assert torch.equal(ids, expected)
    with torch.no_grad():
        _, state = layer.prefill(x[:, :120], capacity=200)
        _, state = layer.step(x[:, 120:121], state)
    assert torch.equal(state.ids[:, :121].long(), ids[:, :121])


def test_bov_values_come_from_the_table():
    layer = make("bov_gqa")
    x = rand_x(12)
    ids = layer.token_ids(x)
    with torch.no_grad():
        y = layer(x)
        unused = next(i for i in range(50) if i not in set(ids.flatten().tolist()))
        layer.value_table.weight[unused] += 1.0
        assert torch.equal(layer(x), y)  # a row no position uses changes nothing
        layer.value_table.weight[ids[0, 0]] += 1.0
        assert not torch.allclose(layer(x), y)
        layer.gamma.fill_(0.0)
        assert torch.equal(layer(x), torch.zeros_like(y))  # v = gamma * E_v[id]
        layer.gamma.fill_(1.0)
        _, state = layer.prefill(x[:, :5], capacity=12)
        y_step, _ = layer.step(x[:, 5:6], state)
        layer.value_table.weight.mul_(2.0)  # values are read from the table at step time, not cached
        y_step2, _ = layer.step(x[:, 5:6], state)
    assert_close_rel(y_step2, 2 * y_step)


# --- memory probe --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mla", "cca", "bov"])
def test_probe_retrieves_gaussian_keys(name):
    layer = make(name, torch.float32)
    dk, N = 64, 256  # N = 4 * dk
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 2, N, dk, generator=g)
    values = torch.eye(N).expand(1, 2, N, N)  # one-hot values: the read's argmax is the retrieved index
    reads = layer.probe_memory(keys, values, keys)
    assert reads.shape == (1, 2, N, N) and reads.dtype == torch.float32
    accuracy = (reads.argmax(-1) == torch.arange(N)).float().mean().item()
    assert accuracy == 1.0
    if name == "cca":  # logits sqrt(dk) * cos(q, k) at the default temperature 1
        kn = F.normalize(keys, dim=-1)
        expected = (math.sqrt(dk) * kn @ kn.transpose(-1, -2)).softmax(-1)
    else:
        expected = (keys @ keys.transpose(-1, -2) / math.sqrt(dk)).softmax(-1)
    assert_close_rel(reads, expected)


def test_probe_keeps_float64_and_reads_half_in_float32():
    layer = make("bov")
    k = torch.randn(1, 1, 8, 4, dtype=torch.float64)
    assert layer.probe_memory(k, k, k).dtype == torch.float64
    assert layer.probe_memory(k.bfloat16(), k.bfloat16(), k.bfloat16()).dtype == torch.float32


# --- options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,opts,field", [
    (MultiHeadLatentAttention, {"rope_dim": 3}, "rope_dim"),
    (CompressedConvAttention, {"compression": 3}, "compression"),
    (CompressedConvAttention, {"compression": 1, "kv_heads": 3}, "kv_heads"),
    (CompressedConvGQA, {"compression": 4}, "kv_heads"),  # 1 latent head cannot share among 2 kv heads
    (BankOfValues, {"kv_heads": 3}, "kv_heads"),
])
def test_impossible_options_name_their_field(cls, opts, field):
    with pytest.raises(LayerConfigError) as info:
        cls(D, H, DH, cls.Options(**opts))
    assert info.value.field == field and info.value.value == opts.get(field, 2)


@pytest.mark.parametrize("cls,opts", [
    (MultiHeadLatentAttention, {"kv_latent": 0}), (MultiHeadLatentAttention, {"q_latent": 0}),
    (MultiHeadLatentAttention, {"window": 4}), (CompressedConvAttention, {"kernel_size": 0}),
    (CompressedConvAttention, {"compression": 0}), (BankOfValues, {"vocab_size": 0}),
    (BankOfValues, {"token_ids": "argmax"}),
])
def test_invalid_options_raise_validation_error(cls, opts):
    with pytest.raises(ValidationError):
        cls.Options(**opts)


def test_registry_builds_every_rival():
    for type_name, cls in TYPES.items():
        layer_type = get_layer_type(type_name)
        assert layer_type.cls is cls and layer_type.kind == "softmax" and layer_type.summary
        assert {row[0] for row in layer_type.option_table()} == set(cls.Options.model_fields)
        layer = build_layer(layer_type, 32, 4, 8, {})
        assert isinstance(layer, cls)
    assert CompressedConvGQA.Options().kv_heads == 2 and CompressedConvAttention.Options().kv_heads is None
    mla = MultiHeadLatentAttention.Options()
    assert (mla.kv_latent, mla.rope_dim, mla.q_latent) == (512, 64, None)
    assert BankOfValues.Options().vocab_size == 32000


# --- cost model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
def test_cost_model(name):
    layer = make(name, torch.float32)
    fwd, bwd = layer.cost("fwd", B, 64), layer.cost("bwd", B, 64)
    assert bwd.flops > fwd.flops > 0 and bwd.bytes > fwd.bytes > 0
    assert layer.cost("fwd", B, 128).flops > 2.5 * layer.cost("fwd", B, 64).flops  # quadratic attention
    d100, d101 = layer.cost("decode", B, 100), layer.cost("decode", B, 101)
    assert d101.flops > d100.flops
    # one more cached token: its state is read once more (Bank of Values also gathers its table row)
    extra_gather = B * layer.kv_heads * DH * 4 if isinstance(layer, BankOfValues) else 0
    assert d101.bytes - d100.bytes == layer.state_bytes(B, 101) - layer.state_bytes(B, 100) + extra_gather
    with pytest.raises(ValueError):
        layer.cost("train", B, 64)


def test_mla_fwd_flops_formula():
    layer = make("mla", torch.float32)
    T = 7
    pairs = T * (T + 1) // 2
    proj = B * T * (2 * D * H * (DH + DR) + 2 * D * (DC + DR) + 2 * 2 * DC * H * DH + 2 * H * DH * D)
    attn = 2 * B * H * pairs * (DH + DR) + 2 * B * H * pairs * DH
    assert layer.cost("fwd", B, T).flops == proj + attn


# --- the CLI -------------------------------------------------------------------------------------------
PROFILE = """\
name: rivals-tiny
defaults: {batch: 1, d_model: 32, heads: 4, head_dim: 8, dtype: float32, device: cpu}
layers:
  - {name: mla, type: mla, kv_latent: 16, rope_dim: 4, q_latent: 24}
  - {name: cca, type: cca, compression: 2}
  - {name: ccgqa, type: ccgqa, compression: 1, kv_heads: 2}
  - {name: bov, type: bank_of_values, vocab_size: 512, kv_heads: 2}
sweep: {seq: [128], modes: [fwd], batch: 1, warmup_ms: 1, rep_ms: 1, check_seq: 12}
"""


def test_cli_sweep_runs_every_rival(tmp_path):
    profile = tmp_path / "rivals.yaml"
    profile.write_text(PROFILE)
    result = CliRunner().invoke(app, ["sweep", "--profile", str(profile), "--seq", "128", "--modes",
                                      "fwd,bwd,decode", "--format", "csv", "--no-roofline"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {(r["layer"], r["mode"]) for r in rows} == {
        (name, mode) for name in ("mla", "cca", "ccgqa", "bov") for mode in ("fwd", "bwd", "decode")}
    assert all(r["status"] == "ok" and r["check"] == "pass" for r in rows), rows


@pytest.mark.parametrize("kernels", [(1, 1), (2, 2), (3, 4)])
def test_cca_tap_loop_convs_equal_conv1d(kernels):
    layer = make("ccgqa", kernel_size=kernels[0], channel_kernel_size=kernels[1])
    seq = torch.randn(B, layer.qk_channels, 9, dtype=torch.float64)
    assert_close_rel(layer._conv_time(seq), layer.conv_time(seq))
    assert_close_rel(layer._conv_head(seq), layer.conv_head(seq))


# --- GPU (skipped without CUDA) ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("type_name,opts,impl", [
    ("mla", {"q_latent": 384}, "sdpa-flash-vpad"), ("cca", {}, "sdpa-latent"),
    ("ccgqa", {"kv_heads": 1}, "sdpa-latent"), ("bank_of_values", {"kv_heads": 2}, "sdpa+embedding-gather")])
def test_gpu_bf16_forward_and_decode_match_float64_cpu(type_name, opts, impl):
    """Published-like widths (head_dim 128, rope 64, latent 512) in bf16 on CUDA, where SDPA's fused backends
    run: forward and absorbed / cached decode against the same weights in float64 on the CPU."""
    torch.manual_seed(0)
    ref = build_layer(get_layer_type(type_name), 512, 4, 128, opts).to(torch.float64)
    gpu = build_layer(get_layer_type(type_name), 512, 4, 128, opts)
    gpu.load_state_dict(ref.state_dict())
    gpu = gpu.to("cuda", torch.bfloat16)
    x = torch.randn(2, 300, 512, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x)
        y = gpu(x.to("cuda", torch.bfloat16))
        assert gpu.implementation() == impl
        assert_close_rel(y.cpu(), expected, dtype=torch.bfloat16)
        streamed, _ = decode_all(gpu, x.to("cuda", torch.bfloat16), 151, capacity=300)
        assert_close_rel(streamed.cpu(), expected, dtype=torch.bfloat16)
