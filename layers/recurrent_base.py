"""What the linear-recurrent rivals (GLA, Mamba2, DeltaNet, Gated DeltaNet, RetNet) share: the decode state,
the accumulation dtype, the dispatch between fla kernels and the PyTorch core, and the cost model's skeleton.

Each layer supplies its projections and its per-token mixing FLOPs; the chunked/recurrent math lives in
`gated_linear_core` (CPU, reference) and `fla_ops` (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Cost, SequenceLayer
from .fla_ops import fla_decay, fla_delta, use_fla
from .gated_linear_core import decay_chunked, decay_recurrent, delta_chunked, delta_recurrent

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class RecurrentState:
    """Decode state: S[B, H, dk, dv] (float32 for fp16/bf16 layers, else the layer dtype) and, for layers with
    a short causal convolution, conv[B, K-1, channels]: its last K-1 inputs, in the layer dtype."""

    S: torch.Tensor
    conv: torch.Tensor | None = None


class RecurrentLayer(SequenceLayer):
    """Base of the linear-recurrent rivals; not registered itself.

    Subclasses set `dk`, `dv` (per-head key and value widths of the state), `conv_channels` and
    `conv_size` (0 channels: no convolution), `out_proj` (the last Linear, D_inner -> D), and implement
    `_mix_flops_per_token(C)` (chunked forward) and `_decode_mix_flops()` (one step), both per head.
    """

    kind = "linear"
    supports_cuda_graph = True
    dk: int
    dv: int
    conv_channels: int = 0
    conv_size: int = 1

    @property
    def accum_dtype(self) -> torch.dtype:
        """dtype of the recurrence and of S: float32 for fp16/bf16 layers, else the layer dtype."""
        return torch.float32 if self.dtype in _HALF else self.dtype

    def _heads(self, t: torch.Tensor, width: int) -> torch.Tensor:
        """[B, T, H*width] -> [B, H, T, width] in the accumulation dtype."""
        B, T, _ = t.shape
        return t.reshape(B, T, self.heads, width).transpose(1, 2).to(self.accum_dtype)

    def _merge(self, o: torch.Tensor) -> torch.Tensor:
        """[B, H, T, w] -> [B, T, H*w]."""
        B, H, T, w = o.shape
        return o.transpose(1, 2).reshape(B, T, H * w)

    # --- the core, dispatched -------------------------------------------------------------------------------
    def _decay(self, q, k, v, g, scale: float, state: torch.Tensor | None, recurrent: bool):
        if use_fla(q):
            o, S = fla_decay(q.to(self.dtype), k.to(self.dtype), v.to(self.dtype), g, scale, state, recurrent)
            return o.to(self.accum_dtype), S.to(self.accum_dtype)
        if recurrent:
            return decay_recurrent(q, k, v, g, scale, state)
        return decay_chunked(q, k, v, g, scale, self.options.chunk_size, state)

    def _delta(self, q, k, v, beta, g, scale: float, state: torch.Tensor | None, recurrent: bool):
        if use_fla(q):
            o, S = fla_delta(q.to(self.dtype), k.to(self.dtype), v.to(self.dtype), beta, g, scale, state,
                             recurrent)
            return o.to(self.accum_dtype), S.to(self.accum_dtype)
        if recurrent:
            return delta_recurrent(q, k, v, beta, g, scale, state)
        return delta_chunked(q, k, v, beta, g, scale, self.options.chunk_size, state)

    def implementation(self) -> str:
        probe = torch.empty(0, device=self.device, dtype=self.accum_dtype)
        return "fla-chunk" if use_fla(probe) else "torch-chunked"

    # --- the interface, on top of one `_run` per layer ---------------------------------------------------
    def _run(self, x: torch.Tensor, state: RecurrentState | None, recurrent: bool
             ) -> tuple[torch.Tensor, RecurrentState]:
        """x[B, T, D] from `state` (None: the empty state) -> y[B, T, D] and the state after x; `recurrent`
        picks the token-by-token form (decode) over the chunked one."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, T, D] -> y[B, T, D] (chunked form)."""
        return self._run(x, None, recurrent=False)[0]

    def prefill(self, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, RecurrentState]:
        """Run the prompt x[B, T, D]; return y[B, T, D] and the state after it (`capacity` is irrelevant: the
        state has a fixed size)."""
        y, state = self._run(x, None, recurrent=False)
        return y, RecurrentState(state.S.detach(), None if state.conv is None else state.conv.detach())

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
        """Consume one token x_t[B, 1, D]; return y_t[B, 1, D] and a new state (the input is never
        written)."""
        return self._run(x_t, state, recurrent=True)

    # --- capacity probe ----------------------------------------------------------------------------------
    def _probe_decay(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                     log_decay: torch.Tensor) -> torch.Tensor:
        """Write (k_i, v_i) through S <- exp(log_decay) S + k v^T (log_decay [H] or a scalar, one value per
        head for every write), then read q^T S (no score scale). Runs the PyTorch chunked core."""
        k, v, q = (t.to(self.accum_dtype) for t in (keys, values, queries))
        B, H, N, _ = k.shape
        g = log_decay.to(k).reshape(1, -1, 1).expand(B, H, N)
        _, S = decay_chunked(k, k, v, g, 1.0, 64)
        return q @ S

    def _probe_delta(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, beta: float,
                     log_decay: float | None) -> torch.Tensor:
        """Write (k_i, v_i) through the (gated) delta rule with L2-normalised keys, a fixed beta and a fixed
        decay (None: none), then read q^T S with L2-normalised queries (no score scale)."""
        k, v, q = (t.to(self.accum_dtype) for t in (keys, values, queries))
        k, q = F.normalize(k, dim=-1), F.normalize(q, dim=-1)
        B, H, N, _ = k.shape
        b = k.new_full((B, H, N), beta)
        g = None if log_decay is None else k.new_full((B, H, N), log_decay)
        _, S = delta_chunked(k, k, v, b, g, 1.0, 64)
        return q @ S

    # --- decode state -------------------------------------------------------------------------------------
    def state_bytes(self, batch: int, seq: int) -> int:
        """batch * (H * dk * dv * accumulation bytes + (K-1) * conv channels * layer bytes); independent of
        `seq` (a zero-filled conv tail stands for positions before the prompt)."""
        ea = torch.empty((), dtype=self.accum_dtype).element_size()
        conv = (self.conv_size - 1) * self.conv_channels * self.element_size
        return batch * (self.heads * self.dk * self.dv * ea + conv)

    # --- cost model ---------------------------------------------------------------------------------------
    def _mix_flops_per_token(self, C: int) -> float:
        raise NotImplementedError

    def _decode_mix_flops(self) -> float:
        raise NotImplementedError

    def _proj_flops_per_token(self) -> float:
        """2 FLOPs per weight of every Linear (each weight meets each token once) + the convolution."""
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 2.0 * linear + 2.0 * self.conv_size * self.conv_channels

    def _activation_width(self) -> int:
        """Elements per token written by the input projections and read back (all Linears but out_proj,
        plus the mixer output that out_proj reads)."""
        widths = sum(m.out_features for m in self.modules()
                     if isinstance(m, nn.Linear) and m is not self.out_proj)
        return widths + self.out_proj.in_features

    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        """fwd: B*T*proj + B*H*Tp*mix(C) FLOPs (Tp = T padded to the chunk size); bytes = weights + x read and
        y written + the projected activations written and read once + one state per chunk written and read.
        bwd: 3x fwd (an estimate: backward ~ 2x forward). decode: B*proj + B*H*decode_mix FLOPs; bytes =
        weights + state read and written + x_t, y_t."""
        B, T, D, H = batch, seq, self.d_model, self.heads
        el, weights = self.element_size, self.weight_bytes()
        ea = torch.empty((), dtype=self.accum_dtype).element_size()
        if mode in ("fwd", "bwd"):
            C = self.options.chunk_size
            nb = -(-T // C)
            flops = B * T * self._proj_flops_per_token() + B * H * nb * C * self._mix_flops_per_token(C)
            nbytes = (weights + 2 * B * T * D * el + 2 * B * T * self._activation_width() * el
                      + 2 * B * H * nb * self.dk * self.dv * ea)
            scale = 1 if mode == "fwd" else 3
            return Cost(float(scale * flops), float(scale * nbytes))
        if mode == "decode":
            flops = B * self._proj_flops_per_token() + B * H * self._decode_mix_flops()
            nbytes = weights + 2 * self.state_bytes(B, seq) + 2 * B * D * el
            return Cost(float(flops), float(nbytes))
        raise ValueError(f"unknown mode {mode!r}; allowed: fwd, bwd, decode")
