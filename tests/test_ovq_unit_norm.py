"""unit_norm: the Triton path's q/k normalisation (float32 math, saves only its input)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from autograd_helpers import saved_storage_bytes

from ovqprof.kernels.ovq.unit_norm import unit_norm
from ovqprof.tolerances import rel_rms_error, tolerance_for


def _x(dtype: torch.dtype, shape=(2, 3, 7, 24), seed: int = 0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5).to(dtype)


def test_gradcheck_float64():
    x = _x(torch.float64, (2, 2, 5, 6)).requires_grad_()
    assert torch.autograd.gradcheck(unit_norm, (x,))


def test_gradcheck_where_the_eps_clamp_is_active():
    x = (_x(torch.float64, (3, 4)) * 1e-3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: unit_norm(t, eps=1.0), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_backward_match_float32_normalize(dtype):
    x = _x(dtype).requires_grad_()
    dy = _x(dtype, seed=1)
    y = unit_norm(x)
    assert y.dtype == dtype
    y.backward(dy)
    ref_x = x.detach().float().requires_grad_()
    ref = F.normalize(ref_x, dim=-1)
    ref.backward(dy.float())
    assert rel_rms_error(y, ref) <= tolerance_for(dtype)
    assert x.grad.dtype == dtype and rel_rms_error(x.grad, ref_x.grad) <= tolerance_for(dtype)


def test_out_dtype_is_honoured():
    assert unit_norm(_x(torch.bfloat16), torch.float32).dtype == torch.float32


def test_saves_only_the_bf16_input_not_a_float32_copy():
    x = _x(torch.bfloat16, (1, 4, 256, 64)).requires_grad_()
    ours = sum(saved_storage_bytes(unit_norm, x))
    old = sum(saved_storage_bytes(lambda t: F.normalize(t.float(), dim=-1).to(torch.bfloat16), x))
    assert ours == x.numel() * 2          # the bf16 input, nothing else
    assert old >= x.numel() * 4           # the float32 copy the layer used to keep alive
