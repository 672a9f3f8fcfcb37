"""OVQ-attention (Zyphra, arXiv 2602.03922): attention over a dictionary of key/value centroids learned online.

The layer is projections around the core in `ovqprof.kernels.ovq`: q, k, v = x W_q, x W_k, x W_v split into H
heads, q and k L2-normalised per head (no positional encoding), the core's output merged and projected by W_o.
The algorithm, and every choice this project made where the paper is silent, is in the README's "How
OVQ-attention works here"; the core's options are `OVQConfig`'s own (generated from it, so they cannot drift),
beside the layer's (beta, the implementation). The defaults are this project's
variant; `assign: chunk_start`, `init: spread_topm`, `normalize_centroids: false` (and, as switches of that
code, `count_bias: false`, `value_update: delta`) run the public implementation's (recursal/KVM-paper).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, create_model
from torch import nn

from ovqprof.kernels.ovq import OVQConfig, OVQState, active_after, ovq_chunked, ovq_step, spawn_count
from ovqprof.kernels.ovq.chunked_cpu import ovq_chunked_fast
from ovqprof.kernels.ovq.config import option_specs, triton_unsupported
from ovqprof.kernels.ovq.reference import advance, centroid_keys, read, tail_buffer, write
from ovqprof.kernels.ovq.unit_norm import unit_norm
from ovqprof.phases import phase

from .base import Cost, LayerConfigError, LayerOptions, SequenceLayer, tensor_bytes

_HALF = (torch.float16, torch.bfloat16)


def _core_options_model() -> type[LayerOptions]:
    """A LayerOptions model with one field per OVQConfig option: same name, type, default, bounds and
    description (declared once, in kernels/ovq/config.py)."""
    fields = {spec.name: (spec.annotation, Field(spec.default, description=spec.description, **spec.bounds))
              for spec in option_specs()}
    return create_model("OVQCoreOptions", __base__=LayerOptions, __module__=__name__, **fields)


OVQCoreOptions = _core_options_model()


class OVQOptions(OVQCoreOptions):
    """OVQConfig's options (the core's, listed first) and the layer's own: beta and the implementation."""

    beta: float | None = Field(None, gt=0, description="inverse temperature of the read; default sqrt(head_dim)")
    learn_beta: bool = Field(False, description="make beta a learned parameter per head")
    impl: Literal["auto", "reference", "triton"] = Field(
        "auto", description="core implementation: auto (Triton kernels on CUDA when supported, else the PyTorch "
                            "reference), reference, or triton (on CPU only under TRITON_INTERPRET=1)")
    triton_variant: Literal["per_head", "split"] = Field(
        "per_head", description="Triton kernels' work split: per_head (one program per batch and head) or split "
                                "(each head's slots over several programs, synchronised per chunk; same results)")
    dict_precision: Literal["tf32", "bf16x2", "bf16"] = Field(
        "tf32", description="Triton kernels' products with the float32 dictionary for bf16/fp16 layers: tf32, "
                            "bf16x2 (keys as bf16 hi + lo, values in bf16) or bf16 (all bf16: fastest, least "
                            "accurate); float32 layers always use exact float32 products")

    def core_config(self) -> OVQConfig:
        """The OVQConfig these options select (raises ValueError for a combination OVQConfig refuses)."""
        return OVQConfig(**self.model_dump(include=set(OVQCoreOptions.model_fields)))


class OVQAttention(SequenceLayer):
    """OVQ-attention: dense read over N online k-means centroids plus the causal chunk; linear time, constant state.

    Defaults: N = 1024 slots, L = 64, beta = sqrt(head_dim), saturating growth N t / (N + t), spread init,
    adaptive (running-mean) updates, normalised centroids, gradients through the state. Math and the decode
    state run in float32 for fp16/bf16 layers (running means in half precision drift).

    Cost model (per call; B batch, T tokens, H heads, dk = dv = dh, D d_model, el / ea bytes per element of
    the layer / of the math, n_c active slots at the start of chunk c, m_c slots it spawns, Tp = T rounded up
    to a multiple of L):
    - fwd: proj 8*B*T*D*H*dh; read per chunk 2*L*(n_c + L)*(dk + dv) (scores and weighted sum over the
      dictionary and the full L x L local block); assignment 2*L*(n_c + m_c)*dk; merge 2*L*(dk + dv).
      bytes = weights + x, y + q, k, v, o written and read once (8*B*T*H*dh*el) + the active dictionary read
      once per chunk (B*H*n_c*(dk + dv + 1)*ea: a fused kernel's floor, since it does not fit on chip).
    - bwd (forward + backward): 3 x fwd flops and bytes (an estimate, as for the other layers).
    - decode at context T: proj 8*B*D*H*dh + read 2*B*H*(n + j + 1)*(dk + dv) with n = active slots after T
      tokens and j = T mod L buffered; bytes = weights + dictionary and buffer read (state_bytes) + x_t, y_t.
      The flush every L tokens is not in the timed step unless T mod L = L - 1.
    """

    kind = "ovq"
    Options = OVQOptions
    supports_decode = True
    # A step at a given state has fixed shapes and no host sync, so it can be captured and replayed; a step
    # that flushes (every L-th token) draws host-side random picks for `init: random`, and then the timer
    # falls back to eager timing and says so in the row.
    supports_cuda_graph = True

    def __init__(self, d_model: int, heads: int, head_dim: int, options: OVQOptions | None = None):
        super().__init__(d_model, heads, head_dim, options)
        o = self.options
        inner = heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        beta = torch.full((heads,), o.beta if o.beta is not None else math.sqrt(head_dim))
        if o.learn_beta:
            self.beta = nn.Parameter(beta)
        else:
            self.register_buffer("beta", beta, persistent=False)
        try:
            self.config = o.core_config()
        except ValueError as exc:  # options validate their own ranges; this is a safety net
            raise LayerConfigError("options", str(exc), o.model_dump(), "see `ovqprof layers`") from exc
        self._triton_problem = triton_unsupported(self.config, head_dim, head_dim)
        if o.impl == "triton" and self._triton_problem:
            raise LayerConfigError("impl", f"the Triton kernels do not support this layer: {self._triton_problem}",
                                   o.impl, "auto or reference")

    # --- helpers -------------------------------------------------------------------------------------
    @property
    def accum_dtype(self) -> torch.dtype:
        """dtype of the core's math and of the decode state: float32 for fp16/bf16 layers."""
        return torch.float32 if self.dtype in _HALF else self.dtype

    def active_slots(self, tokens: int) -> int:
        """Active dictionary slots after `tokens` tokens (partial chunks are not yet written)."""
        return active_after(self.config, tokens)

    def _projected_heads(self, x: torch.Tensor, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x[B, T, D] -> raw q, k, v [B, H, T, dh] in `dtype` (transposed views of the projections)."""
        B, T, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.heads, self.head_dim).transpose(1, 2).to(dtype)

        return heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x[B, T, D] -> unit-norm q, k and v [B, H, T, dh] in the math dtype."""
        q, k, v = self._projected_heads(x, self.accum_dtype)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    def _output(self, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """o[B, H, T, dh] -> y[B, T, D] in the input dtype."""
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim).to(dtype))

    def _beta(self) -> torch.Tensor:
        return self.beta.to(self.accum_dtype)

    @property
    def uses_triton(self) -> bool:
        """Whether the core runs the Triton kernels on the layer's current device."""
        if self.options.impl == "reference" or self._triton_problem:
            return False
        return self.options.impl == "triton" or self.device.type == "cuda"

    def _kernel_inputs(self, x: torch.Tensor, normalize: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, T, dh] for the kernels in the layer dtype (bf16 operands, float32 accumulation and
        dictionary inside the kernels). q, k are normalised in float32 by `unit_norm` (prefill and decode),
        or left raw when normalize is False (the training forward: OVQCoreFunction normalises them itself
        and keeps one copy of each)."""
        q, k, v = self._projected_heads(x, self.dtype)
        if not normalize:
            return q, k, v.contiguous()
        return unit_norm(q).contiguous(), unit_norm(k).contiguous(), v.contiguous()

    # --- the interface -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[B, T, D] -> y[B, T, D]."""
        if self.uses_triton:
            from ovqprof.kernels.ovq.function import ovq_core_triton

            with phase("projections"):
                qkv = self._kernel_inputs(x, normalize=False)
            with phase("core"):
                o = ovq_core_triton(*qkv, self.beta.float(), self.config, normalize_qk=True,
                                    variant=self.options.triton_variant, dict_precision=self.options.dict_precision)
        else:
            with phase("projections"):
                qkv = self.project(x)
            with phase("core"):
                o, _ = self._chunked(*qkv)
        with phase("output projection"):
            return self._output(o, x.dtype)

    def _chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, OVQState]:
        """The PyTorch core (no Triton): the fast chunk loop (SDPA reads, flat writes) for `lr: adaptive`,
        the reference itself for `lr: constant`; both equal the reference (tests/test_ovq_write_rules.py)."""
        core = ovq_chunked_fast if self.config.lr == "adaptive" else ovq_chunked
        return core(q, k, v, self._beta(), self.config)

    def prefill(self, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, OVQState]:
        """Run the prompt x[B, T, D]; return y[B, T, D] and the detached state (floor(T/L) chunks written,
        T mod L tokens buffered). `capacity` is irrelevant: the state has a fixed size."""
        if self.uses_triton:
            return self._prefill_triton(x)
        o, state = self._chunked(*self.project(x))
        state = OVQState(state.keys.detach().clone(), state.values.detach().clone(), state.counts.detach().clone(),
                         state.active, state.written, state.buf_k, state.buf_v, state.buf_len)
        return self._output(o, x.dtype), state

    @torch.no_grad()
    def _prefill_triton(self, x: torch.Tensor) -> tuple[torch.Tensor, OVQState]:
        from ovqprof.kernels.ovq.function import kernels_for

        q, k, v = self._kernel_inputs(x)
        forward, _ = kernels_for(self.options.triton_variant)
        o, _, _, sk, sv, cnt = forward(q, k, v, self.beta.float(), self.config,
                                       dict_precision=self.options.dict_precision)
        T = q.shape[2]
        mean = cnt.clamp_min(1.0).unsqueeze(-1)  # the kernel keeps sums; the state holds running means
        ad = self.accum_dtype
        buf_k, buf_v, tail = tail_buffer(k, v, self.config.chunk_size, ad)
        state = OVQState((sk / mean).to(ad), (sv / mean).to(ad), cnt.to(ad), self.active_slots(T), T - tail,
                         buf_k, buf_v, tail)
        return self._output(o, x.dtype), state

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: OVQState) -> tuple[torch.Tensor, OVQState]:
        """Consume one token x_t[B, 1, D]; return y_t[B, 1, D] and the next state (the input is not changed)."""
        if not self.uses_triton:
            with phase("projections"):
                qkv = self.project(x_t)
            o, state = ovq_step(*qkv, self._beta(), self.config, state)  # marks its read and state update
            with phase("output projection"):
                return self._output(o, x_t.dtype), state
        from ovqprof.kernels.ovq.decode import ovq_decode_triton

        with phase("projections"):
            # Rounded through the layer dtype like the forward kernel's inputs, so decode sees the same keys.
            q, k, v = (t.to(self.dtype).to(self.accum_dtype) for t in self.project(x_t))  # [B, H, 1, dh]
        with phase("read"):
            o = ovq_decode_triton(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.beta.float(), state.keys,
                                  state.values, state.counts, state.active, state.buf_k, state.buf_v,
                                  state.buf_len, self.config.normalize_centroids,
                                  count_bias=self.config.count_bias)
        with phase("state update"):
            state = advance(k, v, self.config, state, self.beta.float())
        with phase("output projection"):
            return self._output(o.unsqueeze(2), x_t.dtype), state

    @torch.no_grad()
    def probe_memory(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Associative-memory probe (see SequenceLayer.probe_memory) through the PyTorch reference core.

        Keys and queries are L2-normalised as the layer's projection does. The pairs are written chunk by
        chunk with the reference `write`, exactly as `ovq_chunked` (the prefill path) writes them, minus its
        per-chunk reads: floor(N/L) chunks merged into the dictionary, the N mod L tail left as the buffer.
        Each query then reads the final dictionary and buffer with the reference `read`, the buffer rows
        entering as slots of count 1 (log 1 = 0: the same logit beta q.k as the local part of a read), and
        is not written itself. beta: the layer's (default sqrt(head_dim)); a probe whose
        dk or head count differs from the layer's uses options.beta or sqrt(dk).
        keys[B, H, N, dk], values[B, H, N, dv], queries[B, H, M, dk] -> reads[B, H, M, dv] in the math dtype.
        """
        ad = self.accum_dtype
        k, q, v = F.normalize(keys.to(ad), dim=-1), F.normalize(queries.to(ad), dim=-1), values.to(ad)
        B, H, _, dk = k.shape
        if (H, dk) == (self.heads, self.head_dim):
            beta = self._beta()
        else:
            beta = k.new_full((H,), self.options.beta if self.options.beta is not None else math.sqrt(dk))
        L, dv = self.config.chunk_size, v.shape[-1]
        written = k.shape[2] - k.shape[2] % L
        keys, values, counts = k.new_zeros(B, H, 0, dk), v.new_zeros(B, H, 0, dv), k.new_zeros(B, H, 0)
        for c in range(written // L):
            chunk = slice(c * L, (c + 1) * L)
            keys, values, counts, _ = write(k[:, :, chunk], v[:, :, chunk], keys, values, counts, self.config, c,
                                            beta)
        slots_k = torch.cat([centroid_keys(keys, self.config), k[:, :, written:]], dim=2)
        slots_v = torch.cat([values, v[:, :, written:]], dim=2)
        counts = torch.cat([counts, counts.new_ones(B, H, k.shape[2] - written)], dim=2)
        no_local_k, no_local_v = k.new_zeros(B, H, 0, dk), v.new_zeros(B, H, 0, dv)
        return read(q, no_local_k, no_local_v, beta, slots_k, slots_v, counts, self.config.count_bias)

    def state_bytes(self, batch: int, seq: int) -> int:
        """B * H * (N * (dk + dv + 1) + (L - 1) * (dk + dv)) * math bytes: dictionary, counts and buffer,
        preallocated, so independent of `seq`."""
        N, L, dh = self.config.dict_size, self.config.chunk_size, self.head_dim
        per_head = N * (2 * dh + 1) + (L - 1) * 2 * dh
        return batch * self.heads * per_head * torch.empty((), dtype=self.accum_dtype).element_size()

    def state_tensor_bytes(self, state: OVQState) -> int:
        """Bytes actually held by a decode state (what `state_bytes` predicts)."""
        return tensor_bytes(state)

    def _chunk_work(self, seq: int) -> tuple[float, float]:
        """(core FLOPs, dictionary elements read) per batch element and head over a forward of `seq` tokens."""
        cfg, dh = self.config, self.head_dim
        L = cfg.chunk_size
        flops = 0.0
        dict_elems = 0.0
        for c in range(-(-seq // L)):
            n, m = spawn_count(cfg, c)
            flops += 2 * L * (n + L) * 2 * dh
            if (c + 1) * L <= seq:  # a full chunk is also written (the last partial one only reads)
                flops += 2 * L * (n + m) * dh + 2 * L * 2 * dh
                if cfg.value_update == "delta":  # the residuals' dictionary-only read at every key
                    flops += 2 * L * n * 2 * dh
            dict_elems += n * (2 * dh + 1)
        return flops, dict_elems

    def cost(self, mode: str, batch: int, seq: int) -> Cost:
        B, T, D, H, dh = batch, seq, self.d_model, self.heads, self.head_dim
        el, weights = self.element_size, self.weight_bytes()
        ea = torch.empty((), dtype=self.accum_dtype).element_size()
        proj_per_token = 8 * D * H * dh
        if mode in ("fwd", "bwd"):
            core_flops, dict_elems = self._chunk_work(T)
            flops = B * T * proj_per_token + B * H * core_flops
            nbytes = weights + 2 * B * T * D * el + 8 * B * T * H * dh * el + B * H * dict_elems * ea
            scale = 1 if mode == "fwd" else 3
            return Cost(float(scale * flops), float(scale * nbytes))
        if mode == "decode":
            n, j = self.active_slots(T), T % self.config.chunk_size
            flops = B * proj_per_token + 2 * B * H * (n + j + 1) * 2 * dh
            read_bytes = B * H * (n * (2 * dh + 1) + j * 2 * dh) * ea
            nbytes = weights + read_bytes + 2 * B * D * el
            return Cost(float(flops), float(nbytes))
        raise ValueError(f"unknown mode {mode!r}; allowed: fwd, bwd, decode")

    def implementation(self) -> str:
        if not self.uses_triton:
            # On a GPU, say why the kernels did not run (e.g. value_update: delta), so a row is never mistaken
            # for a kernel measurement.
            if self.device.type == "cuda" and self.options.impl == "auto" and self._triton_problem:
                return f"torch-chunked ({self._triton_problem})"
            return "torch-chunked"
        impl = "triton" if self.options.triton_variant == "per_head" else "triton-split"
        precision = self.options.dict_precision
        return impl if precision == "tf32" else f"{impl}-{precision}"
