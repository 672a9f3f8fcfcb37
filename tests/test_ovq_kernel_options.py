"""The OVQ Triton kernels with the write/read-rule options (assign: chunk_start, init: spread_topm,
count_bias: false, and the public combination) at every chunk size 16 .. 256, against the PyTorch reference.

Chunks of 128 and 256 exercise the kernels' row blocks (64 rows: a chunk's read, local block, assignment and
spawn ranks span several blocks). Without a GPU these run under TRITON_INTERPRET=1 (slow: small heads, and
slot tiles of 64 at the large chunks); the split variant then runs with P = 2 through the stepped path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from decode_helpers import decode_all
from ovq_kernel_inputs import ovq_inputs
from triton_device import kernel_device

from ovqprof.kernels.ovq import OVQConfig, active_after, ovq_chunked, ovq_step
from ovqprof.kernels.ovq.config import triton_unsupported
from ovqprof.kernels.ovq.reference import write
from ovqprof.layers.ovq import OVQAttention, OVQOptions
from ovqprof.tolerances import rel_rms_error, tolerance_for

DEVICE = kernel_device()  # skips this module where the kernels cannot run

from ovqprof.kernels.ovq.backward import ovq_backward_triton  # noqa: E402
from ovqprof.kernels.ovq.backward_split import ovq_backward_split_triton  # noqa: E402
from ovqprof.kernels.ovq.decode import ovq_decode_triton  # noqa: E402
from ovqprof.kernels.ovq.forward import ovq_forward_triton  # noqa: E402
from ovqprof.kernels.ovq.forward_split import ovq_forward_split_triton  # noqa: E402
from ovqprof.kernels.ovq.function import ovq_core_triton  # noqa: E402

ON_GPU = DEVICE == "cuda"
B, H, D = 1, 2, 16
CHUNKS = [16, 32, 64, 128, 256]
OPTIONS = {
    "chunk_start": dict(assign="chunk_start"),
    "spread_topm": dict(init="spread_topm"),
    "no_count_bias": dict(count_bias=False),
    "public": dict(assign="chunk_start", init="spread_topm", normalize_centroids=False, count_bias=True),
}


def _config(option: str, L: int) -> OVQConfig:
    """N = 1.25 L slots. Linear growth (rate 1/2): chunk spawns L/2 (empty dictionary), L/2, L/4, then 0
    (saturated). Full growth at L = 32, 128: the first chunk spawns all L tokens (spread_topm still orders them
    by similarity), the second L/4, then 0."""
    growth = "full" if L in (32, 128) else "linear"
    return OVQConfig(dict_size=L + L // 4, chunk_size=L, growth=growth, rate=0.5, seed=3, **OPTIONS[option])


def _length(L: int) -> int:
    return 4 * L + L // 2 - 3  # four chunks written (the last one into a saturated dictionary), one partial


def _slots(L: int) -> int:
    return 16 if L <= 32 else 64  # slot tiles: several per pass, the last one partly masked (N = 1.25 L)


def reference_assignments(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, cfg: OVQConfig) -> torch.Tensor:
    """z [B, H, Tw]: the slot the reference's `write` gives each written token (float64)."""
    B_, H_, T, dk = k.shape
    keys, values, counts = k.new_zeros(B_, H_, 0, dk), v.new_zeros(B_, H_, 0, v.shape[-1]), k.new_zeros(B_, H_, 0)
    L = cfg.chunk_size
    zs = [k.new_zeros(B_, H_, 0, dtype=torch.long)]
    for c in range(T // L):
        keys, values, counts, z = write(k[:, :, c * L:(c + 1) * L], v[:, :, c * L:(c + 1) * L], keys, values,
                                        counts, cfg, c, beta)
        zs.append(z)
    return torch.cat(zs, dim=-1)


def _forward(variant: str, q, k, v, beta, cfg: OVQConfig):
    if variant == "split":
        return ovq_forward_split_triton(q, k, v, beta, cfg, programs=2, stepped=not ON_GPU,
                                        block_slots=_slots(cfg.chunk_size))
    return ovq_forward_triton(q, k, v, beta, cfg, block_slots=_slots(cfg.chunk_size))


def _backward(variant: str, *args):
    cfg = args[-1]
    if variant == "split":
        return ovq_backward_split_triton(*args, programs=2, stepped=not ON_GPU, block_slots=_slots(cfg.chunk_size))
    return ovq_backward_triton(*args, block_slots=_slots(cfg.chunk_size))


def _check_forward(cfg: OVQConfig, q, k, v, beta) -> None:
    """Both variants against the reference: o, every assignment z, counts and the dictionary's means."""
    T, L = q.shape[2], cfg.chunk_size
    ref, state = ovq_chunked(*(t.double() for t in (q, k, v, beta)), cfg)
    z_ref = reference_assignments(k.double(), v.double(), beta.double(), cfg)
    n = active_after(cfg, T)
    runs = {variant: _forward(variant, q, k, v, beta, cfg) for variant in ("per_head", "split")}
    for variant, (o, _lse, z, sk, sv, cnt) in runs.items():
        assert rel_rms_error(o, ref) <= tolerance_for(torch.float32), variant
        assert z.shape[-1] == (T // L) * L and torch.equal(z.long(), z_ref), variant
        assert torch.equal(cnt.double(), state.counts), variant
        assert int((cnt[0, 0] > 0).sum()) == n == state.active
        assert rel_rms_error(sk[:, :, :n] / cnt[:, :, :n, None], state.keys[:, :, :n]) <= 1e-5, variant
        assert rel_rms_error(sv[:, :, :n] / cnt[:, :, :n, None], state.values[:, :, :n]) <= 1e-5, variant
    assert torch.allclose(runs["split"][1], runs["per_head"][1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("L", CHUNKS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_matches_reference(option, L):
    cfg = _config(option, L)
    _check_forward(cfg, *ovq_inputs(B, H, _length(L), D, torch.float32, seed=L + len(option), device=DEVICE))


def _lattice_keys(T: int, seed: int) -> torch.Tensor:
    """Unit keys [B, H, T, D] with four entries of +-1/2 and the rest 0: every key-key product is a multiple
    of 1/4, exact in float32 whatever the summation order, so similarities tie exactly and often."""
    gen = torch.Generator().manual_seed(seed)
    dims = torch.rand(B, H, T, D, generator=gen).argsort(dim=-1)[..., :4]
    signs = torch.randint(0, 2, (B, H, T, 4), generator=gen).float() * 2 - 1
    return torch.zeros(B, H, T, D).scatter_(-1, dims, 0.5 * signs).to(DEVICE)


@pytest.mark.parametrize(("option", "L"), [("spread_topm", 32), ("spread_topm", 256), ("public", 128),
                                           ("chunk_start", 64), ("no_count_bias", 256)])
def test_exact_ties_break_as_the_reference(option, L):
    """The first chunk (empty dictionary) with lattice keys: spread_topm's similarities to key 0 tie (the lower
    position spawns first, across column blocks at L = 256), and so do farthest-first's distances (the lower
    position first) and a token's similarities to spawned slots (the lowest slot wins)."""
    q, _, v, beta = ovq_inputs(B, H, L + L // 2, D, torch.float32, seed=7 * L, device=DEVICE)
    k = _lattice_keys(L + L // 2, seed=L)
    _check_forward(_config(option, L), q, k, v, beta)


@pytest.mark.parametrize("L", [16, 256])
def test_forward_random_init_with_chunk_start_and_no_count_bias(L):
    """The host's seeded spawn ranks (init: random) with the other two options."""
    cfg = OVQConfig(dict_size=L + L // 4, chunk_size=L, growth="linear", rate=0.5, seed=5, init="random",
                    assign="chunk_start", count_bias=False)
    _check_forward(cfg, *ovq_inputs(B, H, _length(L), D, torch.float32, seed=L + 11, device=DEVICE))


# Every option at L = 256 and at one smaller chunk size; the public combination at every chunk size.
BACKWARD = sorted({(o, 256) for o in OPTIONS} | {("chunk_start", 16), ("spread_topm", 32), ("no_count_bias", 64)}
                  | {("public", L) for L in CHUNKS})


@pytest.mark.parametrize("variant", ["per_head", "split"])
@pytest.mark.parametrize(("option", "L"), BACKWARD)
def test_backward_matches_reference_autograd(option, L, variant):
    cfg = _config(option, L)
    T = _length(L)
    q, k, v, beta = ovq_inputs(B, H, T, D, torch.float32, seed=3 * L + 1, device=DEVICE)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(L)).to(DEVICE)
    o, lse, z, sk, sv, cnt = _forward(variant, q, k, v, beta, cfg)
    grads = _backward(variant, q, k, v, o, do, lse, z, beta, sk, sv, cnt, cfg)
    refs = [t.double().clone().requires_grad_() for t in (q, k, v, beta)]
    ovq_chunked(*refs, cfg)[0].backward(do.double())
    for name, got, want in zip(("q", "k", "v", "beta"), grads, refs, strict=True):
        err = rel_rms_error(got, want.grad)
        assert err <= 1e-4, f"d{name} ({option}, L={L}, {variant}): rel error {err:.2e}"


@pytest.mark.parametrize(("option", "L"), [("public", 256), ("no_count_bias", 128)])
def test_core_function_bf16_within_bf16_tolerance(option, L):
    """Through the autograd Function (q, k normalised inside), bf16 inputs, both variants' defaults."""
    cfg = _config(option, L)
    T = 2 * L + L // 2
    base = ovq_inputs(B, H, T, D, torch.bfloat16, seed=L + 5, device=DEVICE)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(L + 6)).to(DEVICE, torch.bfloat16)
    refs = [t.double().clone().requires_grad_() for t in base]
    ref = ovq_chunked(F.normalize(refs[0], dim=-1), F.normalize(refs[1], dim=-1), refs[2], refs[3], cfg)[0]
    ref.backward(do.double())
    for variant in ("per_head", "split"):
        ins = [t.clone().requires_grad_() for t in base]
        o = ovq_core_triton(*ins, cfg, normalize_qk=True, variant=variant)
        assert rel_rms_error(o, ref) <= tolerance_for(torch.bfloat16), variant
        o.backward(do)
        for name, got, want in zip("qkv", ins[:3], refs[:3], strict=True):
            err = rel_rms_error(got.grad, want.grad)
            assert err <= tolerance_for(torch.bfloat16), f"d{name} ({variant}): rel error {err:.2e}"


@pytest.mark.parametrize(("option", "L"), [("no_count_bias", 16), ("no_count_bias", 256), ("public", 64),
                                           ("chunk_start", 128), ("spread_topm", 32)])
@pytest.mark.parametrize("buffered", [0, -2])  # empty buffer (the token alone) or L - 2 buffered tokens
def test_decode_matches_reference_step(option, L, buffered):
    cfg = _config(option, L)
    prefix = 3 * L + (buffered % L)
    q, k, v, beta = ovq_inputs(B, H, prefix + 1, D, torch.float32, seed=L + 9, device=DEVICE)
    _, st = ovq_chunked(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], beta, cfg)
    step = [t[:, :, prefix:prefix + 1] for t in (q, k, v)]
    want = ovq_step(*step, beta, cfg, st)[0][:, :, 0]

    def decode(count_bias: bool) -> torch.Tensor:
        return ovq_decode_triton(*(t[:, :, 0] for t in step), beta, st.keys, st.values, st.counts, st.active,
                                 st.buf_k, st.buf_v, st.buf_len, cfg.normalize_centroids, block_slots=16,
                                 count_bias=count_bias)

    assert st.buf_len == buffered % L
    assert rel_rms_error(decode(cfg.count_bias), want) <= tolerance_for(torch.float32)
    assert rel_rms_error(decode(not cfg.count_bias), want) > 10 * tolerance_for(torch.float32)  # it is used


@pytest.mark.parametrize(("option", "L", "variant"), [("public", 16, "per_head"), ("no_count_bias", 32, "split")])
def test_layer_streams_with_options_like_the_reference(option, L, variant):
    """The layer on the kernels (forward, prefill through the forward kernel, decode kernel steps across
    flushes) against the layer on the reference."""
    torch.manual_seed(80 + L)
    opts = dict(dict_size=L + L // 4, chunk_size=L, growth="linear", rate=0.5, **OPTIONS[option])
    ref = OVQAttention(64, 2, 16, OVQOptions(impl="reference", **opts)).to(DEVICE)
    tri = OVQAttention(64, 2, 16, OVQOptions(impl="triton", triton_variant=variant, **opts)).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    T = 3 * L + 5
    x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(81)).to(DEVICE)
    with torch.no_grad():
        full = tri(x)
        assert rel_rms_error(full, ref(x)) <= tolerance_for(torch.float32)
        streamed, state = decode_all(tri, x, prefix=L + 3)  # two flushes while streaming
    assert rel_rms_error(streamed, full) <= tolerance_for(torch.float32)
    assert state.written == 3 * L and state.active == active_after(tri.config, T)


def test_block_rows_do_not_change_results():
    """L = 64 in row blocks of 16 (four blocks, as at L = 256 with 64) gives the one-block run's results."""
    cfg = _config("spread_topm", 64)
    q, k, v, beta = ovq_inputs(B, H, _length(64), D, torch.float32, seed=90, device=DEVICE)
    one = ovq_forward_triton(q, k, v, beta, cfg, block_slots=64)
    four = ovq_forward_triton(q, k, v, beta, cfg, block_slots=64, block_rows=16)
    assert torch.equal(one[2], four[2]) and torch.equal(one[5], four[5])
    assert rel_rms_error(four[0], one[0]) <= tolerance_for(torch.float32)
    do = torch.randn(B, H, q.shape[2], D, generator=torch.Generator().manual_seed(91)).to(DEVICE)
    g_one = ovq_backward_triton(q, k, v, one[0], do, one[1], one[2], beta, *one[3:], cfg, block_slots=64)
    g_four = ovq_backward_split_triton(q, k, v, one[0], do, one[1], one[2], beta, *one[3:], cfg, programs=2,
                                       stepped=not ON_GPU, block_slots=64, block_rows=16)
    for got, want in zip(g_four, g_one, strict=True):
        assert rel_rms_error(got, want) <= 1e-5


def test_triton_unsupported_accepts_the_options_and_chunks_up_to_256():
    for option in OPTIONS:
        for L in CHUNKS:
            assert triton_unsupported(_config(option, L), 128, 128) is None, (option, L)
    assert triton_unsupported(OVQConfig(chunk_size=256, init="random"), 256, 256) is None
    assert "256" in triton_unsupported(OVQConfig(chunk_size=512), 128, 128)
    assert "256" in triton_unsupported(OVQConfig(chunk_size=64), 512, 512)
    assert "powers of two" in triton_unsupported(OVQConfig(chunk_size=8), 128, 128)
    assert "powers of two" in triton_unsupported(OVQConfig(chunk_size=96), 128, 128)
    assert "delta" in triton_unsupported(OVQConfig(value_update="delta"), 128, 128)
    assert "constant" in triton_unsupported(OVQConfig(lr="constant"), 128, 128)
