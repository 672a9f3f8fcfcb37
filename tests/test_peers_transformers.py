"""The rival layers against the public implementations they follow, from Hugging Face transformers (the
optional extra `ovqprof[peers]`; skipped without it): CCA / CCGQA (layers/cca.py) against ZAYA1's
`ZayaAttention` and MLA (layers/mla.py) against `DeepseekV3Attention` and `DeepseekV2Attention`, with our
weights copied into theirs.

With the public settings (the profiles' cca_zaya1 and mla_deepseek entries), forward and cached decode equal
transformers' within 1e-10 relative RMS in float64. Two steps of transformers run in float32 whatever the
dtype, and the float64 tests route around them: its rotary-embedding modules build cos/sin in float32 (cos/sin
are an input of the attention's forward, so we pass float64 ones, from frequencies checked against
transformers' own to float32 precision), and its RMSNorm casts to float32 (the DeepSeek latent norms run the
same formula at the input precision). Untouched, in float32 with transformers' own rotary embeddings, the same
layers agree to float32 precision; DeepSeek-V2, whose RoPE runs in complex64 whatever the dtype, is checked
that way only.
"""

from __future__ import annotations

import itertools
import sys
import types
from pathlib import Path

import pytest
import torch
from decode_helpers import decode_all

from ovqprof.layers.cca import CompressedConvAttention, CompressedConvGQA
from ovqprof.layers.mla import MultiHeadLatentAttention
from ovqprof.layers.rope import YARN_BETA_FAST, YARN_BETA_SLOW, cos_sin, rope_inv_freq
from ovqprof.registry import build_layer, get_layer_type
from ovqprof.spec import load_spec
from ovqprof.tolerances import assert_close_rel, rel_rms_error

REPO_ROOT = Path(__file__).resolve().parents[1]
FLOAT64_MATCH = 0.1  # times the float64 tolerance 1e-9: the 1e-10 the public settings must reach


def _import_transformers() -> types.SimpleNamespace:
    """transformers >= 5.25 imports the `kernels` distribution (Hugging Face hub kernels), and `python -m
    pytest` puts the repository root first on sys.path, where our kernels/ folder (installed as
    ovqprof.kernels) would be found instead: import with the root left out, so the distribution is the
    `kernels` module cached."""
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]
    try:
        pytest.importorskip("transformers", minversion="5.24",
                            reason="needs Hugging Face transformers >= 5.24: pip install -e '.[peers]'")
        from transformers.cache_utils import DynamicCache
        from transformers.models.deepseek_v2 import configuration_deepseek_v2, modeling_deepseek_v2
        from transformers.models.deepseek_v3 import configuration_deepseek_v3, modeling_deepseek_v3
        from transformers.models.zaya import configuration_zaya, modeling_zaya
    finally:
        sys.path[:] = saved
    return types.SimpleNamespace(
        DynamicCache=DynamicCache,
        ZayaConfig=configuration_zaya.ZayaConfig, ZayaAttention=modeling_zaya.ZayaAttention,
        ZayaRotaryEmbedding=modeling_zaya.ZayaRotaryEmbedding,
        DeepseekV3Config=configuration_deepseek_v3.DeepseekV3Config,
        DeepseekV3Attention=modeling_deepseek_v3.DeepseekV3Attention,
        DeepseekV3RotaryEmbedding=modeling_deepseek_v3.DeepseekV3RotaryEmbedding,
        DeepseekV2Config=configuration_deepseek_v2.DeepseekV2Config,
        DeepseekV2Attention=modeling_deepseek_v2.DeepseekV2Attention,
        DeepseekV2RotaryEmbedding=modeling_deepseek_v2.DeepseekV2RotaryEmbedding)


hf = _import_transformers()

D, H, DH, B, T, PREFIX = 32, 4, 8, 2, 13, 5
DC, DR, DQ = 12, 8, 10  # MLA latent, rope and query-latent widths; 4 rotary pairs span YaRN's whole ramp

ZAYA1 = {"rope_fraction": 0.5, "rope_theta": 5e6, "value_shift": "whole_heads", "temperature_init": 0.0}
# cls, options: G = 1 (4 query heads share it), G = 2 (sharing and not), and longer convs
CCA_CONFIGS = {
    "ccgqa_g1": (CompressedConvGQA, {"compression": 1, "kv_heads": 1}),
    "ccgqa_g2": (CompressedConvGQA, {"compression": 1, "kv_heads": 2}),
    "cca_g2": (CompressedConvAttention, {"compression": 2}),
    "cca_g2_k3": (CompressedConvAttention, {"compression": 2, "kernel_size": 3, "channel_kernel_size": 2}),
}
DEEPSEEK_V3 = {"latent_norm": True, "rope_layout": "interleaved", "yarn_factor": 40.0,
               "yarn_original_context": 4096, "yarn_mscale": 1.0, "yarn_mscale_all_dim": 1.0}
DEEPSEEK_V2 = {**DEEPSEEK_V3, "yarn_mscale": 0.707, "yarn_mscale_all_dim": 0.707}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def rand_x(dtype=torch.float64, d_model=D, length=T):
    return torch.randn(B, length, d_model, generator=torch.Generator().manual_seed(1), dtype=dtype)


def run_hf(attn, x, position_embeddings, cache_config=None, prefix=PREFIX):
    """transformers' attention over x[B, T, D]: one forward (cache_config None), or a prefill of `prefix`
    tokens into a DynamicCache(config=cache_config) and then one token at a time.
    position_embeddings(positions) gives what its forward takes for positions[n]."""
    if cache_config is None:
        return attn(x, attention_mask=None, cache=None, position_embeddings=position_embeddings(
            torch.arange(x.shape[1])))[0]
    cache = hf.DynamicCache(config=cache_config)
    bounds = [0, prefix, *range(prefix + 1, x.shape[1] + 1)]
    outs = [attn(x[:, a:b], attention_mask=None, cache=cache,
                 position_embeddings=position_embeddings(torch.arange(a, b)))[0]
            for a, b in itertools.pairwise(bounds)]
    return torch.cat(outs, dim=1)


def profile_entry(profile, name):
    return next(s for s in load_spec(REPO_ROOT / "profiles" / f"{profile}.yaml").layers if s.name == name)


def cos_sin_input(inv_freq, scale=1.0, dtype=torch.float64):
    """positions -> (cos, sin) [1, n, r] as transformers' rotary-embedding modules give them, at `dtype`."""
    return lambda positions: tuple(t[None] for t in cos_sin(positions, inv_freq, dtype, scale))


# --- CCA / CCGQA against ZAYA1 ------------------------------------------------------------------------------
def make_cca(name, dtype=torch.float64, **extra):
    cls, opts = CCA_CONFIGS[name]
    torch.manual_seed(0)
    layer = cls(D, H, DH, cls.Options(**{**opts, **ZAYA1, **extra})).to(dtype)
    with torch.no_grad():  # a trained temperature: at 0 every key is zero and attention is uniform
        layer.temperature.copy_(torch.linspace(0.7, 1.6, layer.kv_heads, dtype=torch.float64))
    return layer


def zaya_from(layer):
    """ZayaAttention with `layer`'s weights, and its config (ZAYA's heads are our latent heads)."""
    opts = layer.options
    config = hf.ZayaConfig(hidden_size=layer.d_model, num_attention_heads=layer.latent_heads,
                           num_key_value_heads=layer.kv_heads, head_dim=layer.head_dim, num_hidden_layers=1,
                           cca_time0=opts.kernel_size, cca_time1=opts.channel_kernel_size)
    config._attn_implementation = "sdpa"  # eager's softmax runs in float32
    attn = hf.ZayaAttention(config, layer_idx=0).to(layer.dtype)
    proj = attn.qkv_proj
    with torch.no_grad():
        for theirs, ours in [(proj.q_proj, layer.q_proj), (proj.k_proj, layer.k_proj),
                             (proj.v_proj_current, layer.v_current), (proj.v_proj_delayed, layer.v_shifted),
                             (proj.conv_qk_depthwise, layer.conv_time),
                             (proj.conv_qk_grouped, layer.conv_head), (attn.o_proj, layer.o_proj)]:
            theirs.load_state_dict(ours.state_dict())
        attn.qk_norm.temp.copy_(layer.temperature)
    return attn, config


def zaya_cos_sin(config):
    """ZAYA1's RoPE of its config in float64: the frequencies of its rotary embedding, at full precision."""
    rope = config.rope_parameters["hybrid"]
    rotated = int(config.head_dim * rope["partial_rotary_factor"])
    return cos_sin_input(rope_inv_freq(rotated, rope["rope_theta"]))


@pytest.mark.parametrize("name", list(CCA_CONFIGS))
def test_cca_equals_zaya_attention_forward_and_decode_float64(name):
    layer = make_cca(name)
    attn, config = zaya_from(layer)
    x = rand_x()
    with torch.no_grad():
        expected = run_hf(attn, x, zaya_cos_sin(config))
        assert_close_rel(layer(x), expected, factor=FLOAT64_MATCH)
        streamed, state = decode_all(layer, x, PREFIX)
        assert_close_rel(streamed, expected, factor=FLOAT64_MATCH)
        assert_close_rel(run_hf(attn, x, zaya_cos_sin(config), config), expected, factor=FLOAT64_MATCH)
    assert layer.state_bytes(B, T) == sum(t.numel() * t.element_size() for t in (
        state.k[:, :, :T], state.v[:, :, :T], state.qk_tail, state.v_prev))


@pytest.mark.parametrize("name", ["ccgqa_g1", "cca_g2"])
def test_cca_equals_zaya_attention_untouched_float32(name):
    """transformers' own rotary embedding (float32 frequencies and angles), in float32."""
    layer = make_cca(name, torch.float32)
    attn, config = zaya_from(layer)
    rotary = hf.ZayaRotaryEmbedding(config)
    x = rand_x(torch.float32)

    def position_embeddings(positions):
        return rotary(x, positions[None], "hybrid")

    with torch.no_grad():
        expected = run_hf(attn, x, position_embeddings)
        assert_close_rel(layer(x), expected, factor=0.01)
        assert_close_rel(decode_all(layer, x, PREFIX)[0], run_hf(attn, x, position_embeddings, config),
                         factor=0.01)


def test_zaya1_settings_are_transformers_defaults():
    """The ZAYA1 options here and in the profiles are what ZayaConfig and ZayaAttention start from."""
    config = hf.ZayaConfig(num_hidden_layers=1)
    rope = config.rope_parameters["hybrid"]
    assert ZAYA1["rope_theta"] == rope["rope_theta"]
    assert ZAYA1["rope_fraction"] == rope["partial_rotary_factor"]
    temperature = hf.ZayaAttention(config, layer_idx=0).qk_norm.temp
    assert torch.equal(temperature, torch.full_like(temperature, ZAYA1["temperature_init"]))
    for profile in ("quick", "rivals"):
        entry = profile_entry(profile, "cca_zaya1")
        assert {k: entry.options[k] for k in ZAYA1} == ZAYA1, profile


def test_cca_defaults_depart_from_zaya1():
    """Without the ZAYA1 options (today's defaults) the same weights give another layer: they matter."""
    layer = make_cca("ccgqa_g2")
    attn, config = zaya_from(layer)
    x = rand_x()
    defaults = make_cca("ccgqa_g2", rope_fraction=1.0, rope_theta=1e4, value_shift="per_head")
    defaults.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert rel_rms_error(defaults(x), run_hf(attn, x, zaya_cos_sin(config))) > 1e-2


def test_quick_profile_cca_zaya1_equals_zaya_attention():
    """The profile's own entry, at its CPU sizes, in float64."""
    entry = profile_entry("quick", "cca_zaya1")
    torch.manual_seed(0)
    layer = build_layer(get_layer_type(entry.type), entry.d_model, entry.heads, entry.head_dim,
                        entry.options).to(torch.float64)
    with torch.no_grad():
        layer.temperature.uniform_(0.5, 1.5)
    attn, config = zaya_from(layer)
    x = rand_x(d_model=entry.d_model, length=24)
    with torch.no_grad():
        expected = run_hf(attn, x, zaya_cos_sin(config))
        assert_close_rel(layer(x), expected, factor=FLOAT64_MATCH)
        assert_close_rel(decode_all(layer, x, 17)[0], expected, factor=FLOAT64_MATCH)


# --- MLA against DeepSeek-V3 and V2 -------------------------------------------------------------------------
def make_mla(q_latent, dtype=torch.float64, public=DEEPSEEK_V3, **extra):
    torch.manual_seed(0)
    opts = MultiHeadLatentAttention.Options(kv_latent=DC, rope_dim=DR, q_latent=q_latent,
                                            **{**public, **extra})
    layer = MultiHeadLatentAttention(D, H, DH, opts).to(dtype)
    with torch.no_grad():  # trained norm scales: at 1 a swapped or missing scale would go unseen
        for norm in (m for m in layer.modules() if isinstance(m, torch.nn.RMSNorm)):
            norm.weight.uniform_(0.5, 1.5)
    return layer


def deepseek_from(layer, version=3):
    """DeepseekV3Attention (or V2) with `layer`'s weights, and its config."""
    opts = layer.options
    rope = {"rope_type": "default", "rope_theta": opts.rope_theta}
    if opts.yarn_factor is not None:
        rope.update(rope_type="yarn", factor=opts.yarn_factor,
                    original_max_position_embeddings=opts.yarn_original_context, beta_fast=YARN_BETA_FAST,
                    beta_slow=YARN_BETA_SLOW, mscale=opts.yarn_mscale,
                    mscale_all_dim=opts.yarn_mscale_all_dim)
    sizes = dict(hidden_size=layer.d_model, num_attention_heads=layer.heads, num_key_value_heads=layer.heads,
                 kv_lora_rank=opts.kv_latent, q_lora_rank=opts.q_latent, qk_rope_head_dim=opts.rope_dim,
                 qk_nope_head_dim=layer.head_dim, v_head_dim=layer.head_dim, num_hidden_layers=1,
                 rope_parameters=rope,
                 max_position_embeddings=int(opts.yarn_original_context * (opts.yarn_factor or 1)))
    if version == 3:
        config = hf.DeepseekV3Config(**sizes, rope_interleave=opts.rope_layout == "interleaved")
        attn = hf.DeepseekV3Attention(config, layer_idx=0)
    else:
        config = hf.DeepseekV2Config(**sizes)
        attn = hf.DeepseekV2Attention(config, layer_idx=0)
    config._attn_implementation = "sdpa"  # eager's softmax runs in float32
    attn = attn.to(layer.dtype)
    H, dh, dc = layer.heads, layer.head_dim, layer.kv_latent
    with torch.no_grad():
        if opts.q_latent is None:
            attn.q_proj.load_state_dict(layer.q_proj.state_dict())
        else:
            attn.q_a_proj.load_state_dict(layer.q_proj[0].state_dict())
            attn.q_a_layernorm.weight.copy_(layer.q_proj[1].weight)
            attn.q_b_proj.load_state_dict(layer.q_proj[2].state_dict())
        attn.kv_a_proj_with_mqa.load_state_dict(layer.kv_down.state_dict())
        attn.kv_a_layernorm.weight.copy_(layer.kv_norm.weight)
        # kv_b_proj holds [k_nope; v] per head
        k_up, v_up = layer.k_up.weight.view(H, dh, dc), layer.v_up.weight.view(H, dh, dc)
        attn.kv_b_proj.weight.copy_(torch.cat([k_up, v_up], dim=1).reshape(2 * H * dh, dc))
        attn.o_proj.load_state_dict(layer.o_proj.state_dict())
    return attn, config


def rms_norm_at_input_precision(norm):
    """Make a transformers RMSNorm run its formula, weight * x / sqrt(mean(x^2) + eps), at the input dtype."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    norm.forward = types.MethodType(forward, norm)


@pytest.mark.parametrize("yarn", [40.0, None], ids=["yarn", "plain_rope"])
@pytest.mark.parametrize("q_latent", [None, DQ], ids=["direct_q", "q_latent"])
@pytest.mark.parametrize("rope_layout", ["interleaved", "rotate_half"])
def test_mla_equals_deepseek_v3_attention_forward_and_decode_float64(q_latent, yarn, rope_layout):
    layer = make_mla(q_latent, yarn_factor=yarn, rope_layout=rope_layout)
    attn, config = deepseek_from(layer)
    for norm in (attn.kv_a_layernorm, attn.q_a_layernorm):
        if norm is not None:
            rms_norm_at_input_precision(norm)
    assert attn.scaling == pytest.approx(layer.scale, rel=1e-15)  # YaRN's mscale^2 on the softmax scale
    x = rand_x()
    position_embeddings = cos_sin_input(layer._inv_freq, layer.rope_scale)
    with torch.no_grad():
        expected = run_hf(attn, x, position_embeddings)
        assert_close_rel(layer(x), expected, factor=FLOAT64_MATCH)
        streamed, state = decode_all(layer, x, PREFIX)
        assert_close_rel(streamed, expected, factor=FLOAT64_MATCH)
        assert_close_rel(run_hf(attn, x, position_embeddings, config), expected, factor=FLOAT64_MATCH)
    assert layer.state_bytes(B, T) == state.ckv[:, :T].numel() * state.ckv.element_size()


@pytest.mark.parametrize("yarn", [40.0, None], ids=["yarn", "plain_rope"])
def test_mla_rope_frequencies_equal_deepseek_v3(yarn):
    """Our float64 frequencies and cos/sin scale against transformers' rotary embedding (float32)."""
    layer = make_mla(None, yarn_factor=yarn)
    _, config = deepseek_from(layer)
    rotary = hf.DeepseekV3RotaryEmbedding(config)
    torch.testing.assert_close(layer._inv_freq, rotary.inv_freq.to(torch.float64), rtol=1e-6, atol=0)
    assert layer.rope_scale == pytest.approx(rotary.attention_scaling, rel=1e-12)
    if yarn is not None:
        plain = rope_inv_freq(DR, layer.options.rope_theta)
        assert layer._inv_freq[0] == plain[0] and layer._inv_freq[-1] < plain[-1] / 10  # kept, interpolated


@pytest.mark.parametrize("version,public", [(3, DEEPSEEK_V3), (2, DEEPSEEK_V2)], ids=["v3", "v2"])
@pytest.mark.parametrize("q_latent", [None, DQ], ids=["direct_q", "q_latent"])
def test_mla_equals_deepseek_attention_untouched_float32(version, public, q_latent):
    """transformers' own rotary embedding and RMSNorm, in float32 (V2's RoPE is complex64 at any dtype)."""
    layer = make_mla(q_latent, torch.float32, public)
    attn, config = deepseek_from(layer, version)
    rotary = (hf.DeepseekV3RotaryEmbedding if version == 3 else hf.DeepseekV2RotaryEmbedding)(config)
    x = rand_x(torch.float32)

    def position_embeddings(positions):
        return rotary(x, positions[None])

    with torch.no_grad():
        expected = run_hf(attn, x, position_embeddings)
        assert_close_rel(layer(x), expected, factor=0.01)
        assert_close_rel(decode_all(layer, x, PREFIX)[0], run_hf(attn, x, position_embeddings, config),
                         factor=0.01)


def test_mla_defaults_depart_from_deepseek():
    """Each DeepSeek option set back to today's default gives another layer on the same weights."""
    layer = make_mla(DQ)
    attn, _ = deepseek_from(layer)
    for norm in (attn.kv_a_layernorm, attn.q_a_layernorm):
        rms_norm_at_input_precision(norm)
    x = rand_x()
    with torch.no_grad():
        expected = run_hf(attn, x, cos_sin_input(layer._inv_freq, layer.rope_scale))
        for departure in ({"rope_layout": "rotate_half"}, {"yarn_factor": None}):
            other = make_mla(DQ, **departure)
            other.load_state_dict(layer.state_dict())
            assert rel_rms_error(other(x), expected) > 1e-3, departure


def test_profiles_mla_deepseek_settings():
    for profile in ("quick", "rivals"):
        entry = profile_entry(profile, "mla_deepseek")
        assert {k: entry.options[k] for k in DEEPSEEK_V3} == DEEPSEEK_V3, profile
    assert hf.DeepseekV3Config(num_hidden_layers=1).rope_interleave  # transformers' default layout
