"""The OVQ-attention core's fast PyTorch path (the layer's CPU path): the reference's chunk loop, with each
chunk's read as one fused `scaled_dot_product_attention` call and the write on flat index_add_ updates.

Same inputs, outputs and state as `reference.ovq_chunked` (q, k [B, H, T, dk] unit-norm, v [B, H, T, dv],
beta [H]) and equal to it up to float rounding (tests/test_ovq_write_rules.py); differentiable. Why it is
faster than the reference, which materialises the [L, n + L] logits, a concatenated copy and a separate
softmax per chunk:
- the read's count bias is folded into the keys as one extra column (q' = [beta q, 1], D_k' = [D_k, log c],
  local k' = [k, 0], so q'.D_k' = beta q.D_k + log c; v gets a zero column to keep head dims equal, as the
  fused kernel requires), so SDPA's fused (flash) CPU kernel needs only one causal mask [l, n + l] shared by
  every batch and head;
- the write scatters with index_add_ into flat [B*H*n, d] rows (one call per tensor), and the
  `spread_topm` / `chunk_start` rules need one similarity matmul per chunk;
- without autograd (inference, prefill, `value_update: mean`) the dictionary lives in preallocated buffers in
  SDPA's layout, updated in place: a chunk then costs its two matmuls plus O(L d), not several copies of the
  whole dictionary (which at L = 64 took as long as the matmuls).
The `spread` init's farthest-first loop and `value_update: delta` use the reference's own helpers.
Measured against the public implementation: `python -m ovqprof.kernels.ovq.bench_public`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ovqprof.phases import phase

from .config import OVQConfig, spawn_count
from .reference import (
    OVQState,
    centroid_keys,
    choose_spawn,
    chunk_loop,
    dictionary_read,
    empty_state,
    tail_buffer,
)


def _read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, dict_k: torch.Tensor,
          dict_v: torch.Tensor, counts: torch.Tensor, count_bias: bool) -> torch.Tensor:
    """One chunk's read (reference.read with lq = lk = l) through SDPA: q, k [B, H, l, dk], v [B, H, l, dv],
    dict_k [B, H, n, dk] (= D_k), dict_v [B, H, n, dv], counts [B, H, n]. Returns o [B, H, l, dv]."""
    B, H, l, dk = q.shape  # noqa: E741 (l as in the reference's docstrings)
    n, dv = dict_k.shape[2], v.shape[-1]
    bias = count_bias and n > 0
    # SDPA's fused CPU kernel needs equal head dims for q, k and v: zero columns change no logit or output.
    width = max(dk + bias, dv)
    qs = q.new_zeros(B, H, l, width)
    keys = q.new_zeros(B, H, n + l, width)
    values = q.new_zeros(B, H, n + l, width)
    qs[..., :dk] = q * beta.to(q.dtype).view(1, H, 1, 1)
    keys[:, :, :n, :dk] = dict_k
    keys[:, :, n:, :dk] = k
    values[:, :, :n, :dv] = dict_v
    values[:, :, n:, :dv] = v
    if bias:
        qs[..., dk] = 1.0
        keys[:, :, :n, dk] = counts.log()
    return F.scaled_dot_product_attention(qs, keys, values, attn_mask=_causal_mask(l, n, q.dtype, q.device),
                                          scale=1.0)[..., :dv]


@functools.lru_cache(maxsize=64)
def _causal_mask(rows: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows, n + rows] additive mask for a chunk of `rows` queries: 0 over the n slots and the local keys j <= i, -inf above. A float mask: with a
    boolean one, SDPA on the CPU takes its unfused math path."""
    hidden = torch.ones(rows, n + rows, dtype=torch.bool, device=device).triu(diagonal=n + 1)
    return torch.zeros(rows, n + rows, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))


def _flat_add(base: torch.Tensor, z: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """base [B, H, n, ...] plus, for every token t, src[b, h, t] added to row z[b, h, t] (z [B, H, L]); out of
    place, differentiable in base and src."""
    B, H, n = base.shape[:3]
    rows = (z + n * torch.arange(B * H, device=z.device).view(B, H, 1)).reshape(-1)
    tail = base.shape[3:]
    out = base.reshape(B * H * n, *tail).index_add(0, rows, src.reshape(-1, *tail))
    return out.view(base.shape)


@torch.no_grad()
def _slots(k: torch.Tensor, dict_k: torch.Tensor, m: int, cfg: OVQConfig, chunk_index: int) -> torch.Tensor:
    """reference.write's slot choice, z [B, H, L] for the keys k [B, H, L, dk] of a full chunk against the
    active D_k [B, H, n, dk]: spawners own slots n, n+1, ... in pick order, the others join their nearest
    slot under `cfg.assign` (ties to the lowest slot). One similarity matmul against the old slots serves the
    assignment and the `spread_topm` picks."""
    B, H, L, dk = k.shape
    n = dict_k.shape[2]
    old = k @ dict_k.transpose(-1, -2) if n else None  # [B, H, L, n]
    best, z = old.max(dim=-1) if n else (None, torch.zeros(B, H, L, dtype=torch.long, device=k.device))
    if m == 0:
        return z
    if cfg.init == "spread_topm" and n:
        picks = best.sort(dim=-1, stable=True).indices[..., :m]
    else:
        picks = choose_spawn(k, dict_k, m, cfg, chunk_index)
    if cfg.assign == "with_spawned":
        spawned_k = k.gather(2, picks.unsqueeze(-1).expand(B, H, m, dk))
        nbest, nz = (k @ centroid_keys(spawned_k, cfg).transpose(-1, -2)).max(dim=-1)  # [B, H, L] each
        z = torch.where(nbest > best, nz + n, z) if n else nz  # strict: the lower (old) slot wins ties
    return z.scatter_(-1, picks, torch.arange(n, n + m, device=k.device).expand(B, H, m))


def _write(k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor,
           cfg: OVQConfig, chunk_index: int, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """reference.write for `lr: adaptive`, differentiable, with every slot's update as one flat index_add_:
    the new slots start at zero, every token (spawners included) is added to its slot, and the running mean is
    M' = (M c + sum) / c' (for a spawned slot, M = 0 and c = 0: the mean of its tokens)."""
    m = spawn_count(cfg, chunk_index)[1]
    dict_k = centroid_keys(keys, cfg)
    with phase("assign and spawn"):
        z = _slots(k.detach(), dict_k.detach(), m, cfg, chunk_index)
    with phase("merge"):
        return _merge(k, v, keys, values, counts, dict_k, z, m, cfg, beta)


def _merge(k, v, keys, values, counts, dict_k, z, m: int, cfg: OVQConfig, beta: torch.Tensor):
    """The running-mean (or delta) update of `_write` once the slots z [B, H, L] are known."""
    B, H, L, _ = k.shape
    n = keys.shape[2]
    hits = _flat_add(k.new_zeros(B, H, n + m), z, k.new_ones(B, H, L))
    counts0 = F.pad(counts, (0, m))
    new_counts = counts0 + hits
    c = new_counts.unsqueeze(-1)
    new_keys = _flat_add(F.pad(keys, (0, 0, 0, m)) * counts0.unsqueeze(-1), z, k) / c
    values0 = F.pad(values, (0, 0, 0, m))
    if cfg.value_update == "delta":
        r = v - dictionary_read(k, beta, dict_k, values, counts, cfg.count_bias)
        return new_keys, values0 + _flat_add(torch.zeros_like(values0), z, r) / c, new_counts
    return new_keys, _flat_add(values0 * counts0.unsqueeze(-1), z, v) / c, new_counts


class _InPlaceDictionary:
    """The dictionary of a forward without autograd (inference, prefill), updated in place so a chunk costs
    O(L d) besides its matmuls instead of several copies of the whole dictionary.

    Sums S_k [B, H, N, dk], S_v [B, H, N, dv] and counts [B, H, N] as the Triton kernels keep them (a running
    mean is S / c), and the read's operands in SDPA's layout, rows [0, n) the active slots and [n, n + l) the
    current chunk: keys [B, H, N + L, width] (D_k, then log c in column dk with the count bias) and values
    [B, H, N + L, width] (D_v). A write refreshes only the rows its tokens touched.
    """

    def __init__(self, B: int, H: int, dk: int, dv: int, width: int, cfg: OVQConfig, like: torch.Tensor):
        N, L = cfg.dict_size, cfg.chunk_size
        self.cfg, self.dk, self.dv, self.n = cfg, dk, dv, 0
        self.sum_k, self.sum_v = like.new_zeros(B, H, N, dk), like.new_zeros(B, H, N, dv)
        self.counts = like.new_zeros(B, H, N)
        self.keys, self.values = like.new_zeros(B, H, N + L, width), like.new_zeros(B, H, N + L, width)

    def read(self, qx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """o [B, H, l, dv] for one chunk: qx [B, H, l, width] (beta q, then 1 with the count bias), k, v its
        keys and values."""
        n, l = self.n, k.shape[2]  # noqa: E741
        self.keys[:, :, n:n + l, :self.dk] = k
        self.keys[:, :, n:n + l, self.dk:] = 0.0
        self.values[:, :, n:n + l, :self.dv] = v
        return F.scaled_dot_product_attention(qx, self.keys[:, :, :n + l], self.values[:, :, :n + l],
                                              attn_mask=_causal_mask(l, n, qx.dtype, qx.device),
                                              scale=1.0)[..., :self.dv]

    def write(self, k: torch.Tensor, v: torch.Tensor, chunk_index: int) -> None:
        """Merge one full chunk k [B, H, L, dk], v [B, H, L, dv] (`value_update: mean`)."""
        cfg, n = self.cfg, self.n
        m = spawn_count(cfg, chunk_index)[1]
        with phase("assign and spawn"):
            z = _slots(k, self.keys[:, :, :n, :self.dk], m, cfg, chunk_index)
        with phase("merge"):
            self._merge(k, v, z, n + m)

    def _merge(self, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor, n_new: int) -> None:
        """Add the chunk's tokens into their slots z [B, H, L] and refresh the touched rows."""
        cfg = self.cfg
        B, H, L, dk = k.shape
        self.n = n_new
        N = self.counts.shape[2]
        rows = (z + N * torch.arange(B * H, device=k.device).view(B, H, 1)).reshape(-1)
        flat_counts = self.counts.view(-1)
        flat_counts.index_add_(0, rows, k.new_ones(B * H * L))
        sum_k = self.sum_k.view(B * H * N, dk).index_add_(0, rows, k.reshape(-1, dk))
        sum_v = self.sum_v.view(B * H * N, self.dv).index_add_(0, rows, v.reshape(-1, self.dv))
        # Refresh the touched rows of the read's operands (a row touched twice is written twice, alike).
        c = flat_counts[rows].unsqueeze(-1)
        s_k = sum_k[rows]
        d_k = F.normalize(s_k, dim=-1) if cfg.normalize_centroids else s_k / c
        slot_rows = (z + (N + L) * torch.arange(B * H, device=k.device).view(B, H, 1)).reshape(-1)
        keys, values = self.keys.view(-1, self.keys.shape[-1]), self.values.view(-1, self.values.shape[-1])
        keys[slot_rows, :dk] = d_k
        if cfg.count_bias:
            keys[slot_rows, dk] = c.squeeze(-1).log()
        values[slot_rows, :self.dv] = sum_v[rows] / c

    def state_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference state's running means and counts [B, H, N, ...] (zero beyond the active slots)."""
        c = self.counts.clamp_min(1.0).unsqueeze(-1)
        return self.sum_k / c, self.sum_v / c, self.counts.clone()


def _extended_queries(q: torch.Tensor, beta: torch.Tensor, width: int, count_bias: bool) -> torch.Tensor:
    """[B, H, T, width]: beta q, then a 1 that meets the log-count column of the keys (zeros beyond)."""
    B, H, T, dk = q.shape
    qx = q.new_zeros(B, H, T, width)
    qx[..., :dk] = q * beta.to(q.dtype).view(1, H, 1, 1)
    if count_bias:
        qx[..., dk] = 1.0
    return qx


def ovq_chunked_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, cfg: OVQConfig
                     ) -> tuple[torch.Tensor, OVQState]:
    """reference.ovq_chunked from an empty dictionary (`lr: adaptive`): o [B, H, T, dv] and the state after the
    sequence (floor(T / L) chunks written, T mod L tokens buffered), with the autograd graph."""
    if cfg.lr != "adaptive":
        raise ValueError("the fast path runs lr: adaptive; use reference.ovq_chunked for lr: constant")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, beta))
    if not grad and cfg.value_update == "mean":
        return _chunked_in_place(q, k, v, beta, cfg)
    B, H, _, dk = q.shape
    state = empty_state(B, H, dk, v.shape[-1], cfg, dtype=q.dtype, device=q.device)

    def write_chunk(kc, vc, keys, values, counts, chunk_index):
        return _write(kc, vc, keys, values, counts, cfg, chunk_index, beta)

    return chunk_loop(q, k, v, beta, cfg, state, _read, write_chunk)


@torch.no_grad()
def _chunked_in_place(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, cfg: OVQConfig
                      ) -> tuple[torch.Tensor, OVQState]:
    """ovq_chunked_fast without autograd for `value_update: mean`, on an `_InPlaceDictionary`."""
    B, H, T, dk = q.shape
    dv, L = v.shape[-1], cfg.chunk_size
    width = max(dk + cfg.count_bias, dv)
    qx = _extended_queries(q, beta, width, cfg.count_bias)
    d = _InPlaceDictionary(B, H, dk, dv, width, cfg, q)
    o = q.new_empty(B, H, T, dv)
    for start in range(0, T, L):
        end = min(start + L, T)
        with phase("read"):
            o[:, :, start:end] = d.read(qx[:, :, start:end], k[:, :, start:end], v[:, :, start:end])
        if end - start == L:
            d.write(k[:, :, start:end], v[:, :, start:end], start // L)
    buf_k, buf_v, tail = tail_buffer(k, v, L, q.dtype)
    keys, values, counts = d.state_tensors()
    return o, OVQState(keys, values, counts, d.n, T - tail, buf_k, buf_v, tail)
