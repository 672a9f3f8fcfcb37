"""ovqprof's OVQ-attention against its only public implementation (recursal/KVM-paper, `model/ovq_mixer.py`).

That code is not part of this repository (its code stays out of it), so the comparison runs only where a copy
is at hand: `OVQPROF_PUBLIC_OVQ=path/to/KVM-paper/model/ovq_mixer.py python -m pytest tests/test_ovq_public.py`.
With the public settings (assign: chunk_start, init: spread_topm, raw centroids) and each of its switches
(count bias on/off, delta-rule values on/off), the cores agree to the public code's float32 counts (1e-7
relative in float64; 1e-15 once those counts are float64, checked by hand), and so do the layers with shared
projections.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from ovqprof.kernels.ovq import OVQConfig, ovq_chunked
from ovqprof.kernels.ovq.bench_public import PUBLIC_OPTIONS, load_public_core, public_layer_forward
from ovqprof.layers.ovq import OVQAttention, OVQOptions

PUBLIC_FILE = os.environ.get("OVQPROF_PUBLIC_OVQ")
needs_public = pytest.mark.skipif(
    not PUBLIC_FILE, reason="the public OVQ code is not vendored: set OVQPROF_PUBLIC_OVQ to a copy of "
                            "recursal/KVM-paper's model/ovq_mixer.py to compare against it")


def test_loading_a_missing_public_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="ovq_mixer.py: no such file"):
        load_public_core(tmp_path / "ovq_mixer.py")


@needs_public
@pytest.mark.parametrize(("L", "N", "T"), [(16, 40, 203), (64, 96, 512), (256, 1024, 700)])
@pytest.mark.parametrize(("count_bias", "delta"), list(itertools.product([True, False], [False, True])))
def test_core_equals_the_public_core(L, N, T, count_bias, delta):
    core = load_public_core(PUBLIC_FILE)
    g = torch.Generator().manual_seed(L + T)
    q, k = (F.normalize(torch.randn(2, 3, T, 64, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(2, 3, T, 64, generator=g, dtype=torch.float64)
    b = 0.5 + torch.rand(3, generator=g, dtype=torch.float64)
    want, d_k, d_v, counts = core(q, k, v, None, None, None, beta=b, chunk_size=L, max_centroids=N,
                                  normalize_centroids=False, use_min_state_size=False,
                                  use_counts_for_lr_only=not count_bias, use_delta_rule=delta)
    cfg = OVQConfig(dict_size=N, chunk_size=L, count_bias=count_bias, value_update="delta" if delta else "mean",
                    **{k_: v_ for k_, v_ in PUBLIC_OPTIONS.items() if k_ != "count_bias" and k_ != "value_update"})
    got, state = ovq_chunked(q, k, v, b * math.sqrt(64), cfg)
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    if T % L == 0:  # the public code also writes a partial last chunk; compare the dictionary when there is none
        n = state.active
        assert torch.equal(state.counts[..., :n], counts[..., :n, 0].to(torch.float64))
        assert torch.allclose(state.keys[..., :n, :], d_k[..., :n, :], atol=1e-6)
        assert torch.allclose(state.values[..., :n, :], d_v[..., :n, :], atol=1e-6)


@needs_public
@pytest.mark.parametrize("L", [64, 256])
def test_layer_equals_the_public_core_between_the_same_projections(L):
    core = load_public_core(PUBLIC_FILE)
    torch.manual_seed(0)
    layer = OVQAttention(128, 2, 64, OVQOptions(dict_size=128, chunk_size=L, learn_beta=True,
                                                **PUBLIC_OPTIONS)).double()
    x = torch.randn(1, 3 * L + 5, 128, dtype=torch.float64)
    with torch.no_grad():
        want = public_layer_forward(core, layer, x)
        assert ((layer(x) - want).norm() / want.norm()).item() <= 1e-6
