"""OVQ-attention core in PyTorch: the exact reference every kernel is checked against, and the CPU path.

Works on already projected, per-head tensors: q, k [B, H, T, dk] (unit-norm), v [B, H, T, dv], beta [H].
Vectorised over batch and heads; the only Python loops are over chunks (and, for `init: spread`, over the
slots a chunk spawns, which sum to at most N over a whole sequence). Math runs in the dtype of the inputs
(the layer passes float32 for fp16/bf16 models).

Per chunk (positions cL .. cL+L-1), with the dictionary frozen at the chunk start (design doc section B):
1. read: one softmax over the n active slots (logit beta q.D_k[i] + log c[i]) and the chunk's own keys
   j <= t (logit beta q.k_j); output sum_i p_i D_v[i] + sum_j p_j v_j;
2. grow: spawn m = active_after(end) - n slots from the chunk's keys (spread or random init);
3. merge: every other token goes to argmax_i k.D_k[i] over the active slots; running-mean (or constant-step)
   update of keys, values and counts.
Streaming decode (`ovq_step`) buffers tokens since the last flush and runs 2-3 when L have arrived, so it
reproduces `ovq_chunked` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .config import OVQConfig, spawn_count


@dataclass
class OVQState:
    """Per-sequence dictionary and buffer; sizes are fixed (N slots, L-1 buffer rows) so decode never
    reallocates. Tensors are in the math dtype (float32 for fp16/bf16 layers).

    keys:   Mk [B, H, N, dk]  running mean of the keys assigned to each slot (rows >= active are zero)
    values: Mv [B, H, N, dv]  running mean of their values
    counts: c  [B, H, N]      tokens assigned to each slot (float; 0 for inactive slots)
    active: n, slots in use (the same for every sequence and head: it depends only on `written`)
    written: tokens merged into the dictionary so far (a multiple of L)
    buf_k [B, H, L-1, dk], buf_v [B, H, L-1, dv], buf_len: tokens since the last flush (< L)
    """

    keys: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    active: int
    written: int
    buf_k: torch.Tensor
    buf_v: torch.Tensor
    buf_len: int

    @property
    def tokens(self) -> int:
        """Tokens this state has seen: written plus buffered."""
        return self.written + self.buf_len


def empty_state(batch: int, heads: int, dk: int, dv: int, cfg: OVQConfig, *, dtype: torch.dtype,
                device: torch.device | str) -> OVQState:
    """A state with no tokens: zero dictionary, empty buffer."""
    N, L = cfg.dict_size, cfg.chunk_size
    z = dict(dtype=dtype, device=device)
    return OVQState(torch.zeros(batch, heads, N, dk, **z), torch.zeros(batch, heads, N, dv, **z),
                    torch.zeros(batch, heads, N, **z), 0, 0,
                    torch.zeros(batch, heads, L - 1, dk, **z), torch.zeros(batch, heads, L - 1, dv, **z), 0)


def centroid_keys(keys: torch.Tensor, cfg: OVQConfig) -> torch.Tensor:
    """D_k: the key centroids used for scoring and assignment, [..., n, dk]."""
    return F.normalize(keys, dim=-1) if cfg.normalize_centroids else keys


def read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, dict_k: torch.Tensor,
         dict_v: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One softmax over the dictionary and the causal local keys.

    q [B, H, lq, dk]; local k [B, H, lk, dk], v [B, H, lk, dv] with lk >= lq, the queries being the last lq
    local positions (query i sees local j <= i + lk - lq); dict_k [B, H, n, dk] (= D_k), dict_v [B, H, n, dv],
    counts [B, H, n] (all > 0); beta [H]. Returns o [B, H, lq, dv].
    """
    lq, lk = q.shape[2], k.shape[2]
    b = beta.to(q.dtype).view(1, -1, 1, 1)
    local = b * (q @ k.transpose(-1, -2))  # [B, H, lq, lk]
    visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    local = local.masked_fill(~visible, float("-inf"))
    n = dict_k.shape[2]
    if n == 0:
        return torch.softmax(local, dim=-1) @ v
    slots = b * (q @ dict_k.transpose(-1, -2)) + counts.log().unsqueeze(-2)  # [B, H, lq, n]
    p = torch.softmax(torch.cat([slots, local], dim=-1), dim=-1)
    return p[..., :n] @ dict_v + p[..., n:] @ v


@torch.no_grad()
def choose_spawn(k: torch.Tensor, dict_k: torch.Tensor, m: int, cfg: OVQConfig, chunk_index: int) -> torch.Tensor:
    """Which of the chunk's L keys k [B, H, L, dk] become new slots: indices [B, H, m], in slot order.

    spread: farthest-first; each pick is the candidate whose highest similarity to the active centroids
    dict_k [B, H, n, dk] and to the keys picked so far is lowest (ties: lowest position).
    random: uniform without replacement from a generator seeded by (seed, chunk_index), drawn on the CPU
    so the choice is the same on every device.
    """
    B, H, L, _ = k.shape
    if m == L:
        return torch.arange(L, device=k.device).expand(B, H, L)
    if cfg.init == "random":
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + chunk_index)
        r = torch.rand(B, H, L, generator=gen).to(k.device)
        return r.topk(m, dim=-1, largest=False).indices
    if dict_k.shape[2] > 0:
        best = (k @ dict_k.transpose(-1, -2)).amax(dim=-1)  # [B, H, L]
    else:
        best = torch.full((B, H, L), float("-inf"), dtype=k.dtype, device=k.device)
    kk = k @ k.transpose(-1, -2)  # [B, H, L, L]; a spawned slot's centroid is its key
    taken = torch.zeros(B, H, L, dtype=torch.bool, device=k.device)
    picks = []
    for _ in range(m):
        p = best.masked_fill(taken, float("inf")).argmin(dim=-1)  # [B, H]
        picks.append(p)
        taken.scatter_(-1, p.unsqueeze(-1), True)
        sim_to_p = kk.gather(-1, p.view(B, H, 1, 1).expand(B, H, L, 1)).squeeze(-1)
        best = torch.maximum(best, sim_to_p)
    return torch.stack(picks, dim=-1)


def write(k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor,
          cfg: OVQConfig, chunk_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grow and merge one full chunk k [B, H, L, dk], v [B, H, L, dv] into the active dictionary keys
    [B, H, n, dk], values [B, H, n, dv], counts [B, H, n] (n = slots active at the chunk start).

    Returns the new active dictionary (n + m slots) and the slot each token went to, z [B, H, L]. Out of
    place: gradients flow to k, v and the old dictionary through the running means (linear in k, v);
    assignments and spawns are discrete and carry none.
    """
    n, m = spawn_count(cfg, chunk_index)
    if keys.shape[2] != n:
        raise ValueError(f"chunk {chunk_index} expects {n} active slots, the state has {keys.shape[2]}")
    B, H, L, dk = k.shape
    dict_k = centroid_keys(keys, cfg)
    spawned = torch.zeros(B, H, L, dtype=torch.bool, device=k.device)
    if m > 0:
        picks = choose_spawn(k.detach(), dict_k.detach(), m, cfg, chunk_index)  # [B, H, m]
        spawned.scatter_(-1, picks, True)
        keys = torch.cat([keys, k.gather(2, picks.unsqueeze(-1).expand(B, H, m, dk))], dim=2)
        values = torch.cat([values, v.gather(2, picks.unsqueeze(-1).expand(B, H, m, v.shape[-1]))], dim=2)
        counts = torch.cat([counts, counts.new_ones(B, H, m)], dim=2)
        dict_k = torch.cat([dict_k, centroid_keys(keys[:, :, n:], cfg)], dim=2)
    with torch.no_grad():
        z = (k @ dict_k.transpose(-1, -2)).argmax(dim=-1)  # [B, H, L]
        if m > 0:  # a spawning token owns its new slot (its own key is already the centroid)
            slot_of_pick = torch.arange(n, n + m, device=k.device).expand(B, H, m)
            z.scatter_(-1, picks, slot_of_pick)
    w = (~spawned).to(k.dtype)
    n_new = n + m
    merged = torch.zeros(B, H, n_new, dtype=k.dtype, device=k.device).scatter_add(2, z, w)
    idx_k = z.unsqueeze(-1).expand(B, H, L, dk)
    idx_v = z.unsqueeze(-1).expand(B, H, L, v.shape[-1])
    sum_k = torch.zeros(B, H, n_new, dk, dtype=k.dtype, device=k.device).scatter_add(2, idx_k, k * w.unsqueeze(-1))
    sum_v = torch.zeros(B, H, n_new, v.shape[-1], dtype=v.dtype, device=v.device).scatter_add(
        2, idx_v, v * w.unsqueeze(-1))
    new_counts = counts + merged
    mc = merged.unsqueeze(-1)
    if cfg.lr == "adaptive":
        c = new_counts.unsqueeze(-1)
        keys = keys + (sum_k - mc * keys) / c
        values = values + (sum_v - mc * values) / c
    else:
        hit = mc > 0
        denom = mc.clamp_min(1.0)
        keys = torch.where(hit, keys + cfg.eta * (sum_k / denom - keys), keys)
        values = torch.where(hit, values + cfg.eta * (sum_v / denom - values), values)
    return keys, values, new_counts, z


def _pad_slots(t: torch.Tensor, N: int) -> torch.Tensor:
    """Pad the slot dimension (dim 2) of an active-only tensor with zeros to N slots."""
    pad = N - t.shape[2]
    if pad == 0:
        return t
    widths = (0, 0) * (t.dim() - 3) + (0, pad)
    return F.pad(t, widths)


def ovq_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, cfg: OVQConfig,
                state: OVQState | None = None) -> tuple[torch.Tensor, OVQState]:
    """Chunked forward over q, k [B, H, T, dk], v [B, H, T, dv] (q, k unit-norm), beta [H].

    Starts from `state` (which must have an empty buffer) or from an empty dictionary. Returns o [B, H, T, dv]
    and the state after the sequence: the floor(T / L) full chunks written, the last T mod L tokens buffered.
    The returned state keeps the autograd graph; detach it for decode.
    """
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    L, N = cfg.chunk_size, cfg.dict_size
    if state is None:
        state = empty_state(B, H, dk, dv, cfg, dtype=q.dtype, device=q.device)
    if state.buf_len:
        raise ValueError("ovq_chunked continues only from a state with an empty buffer (written % L == 0)")
    n = state.active
    keys, values, counts = state.keys[:, :, :n], state.values[:, :, :n], state.counts[:, :, :n]
    written = state.written
    outs = []
    for start in range(0, T, L):
        end = min(start + L, T)
        if not cfg.grad_through_state:
            keys, values, counts = keys.detach(), values.detach(), counts.detach()
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        outs.append(read(qc, kc, vc, beta, centroid_keys(keys, cfg), values, counts))
        if end - start == L:
            keys, values, counts, _ = write(kc, vc, keys, values, counts, cfg, written // L)
            written += L
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(B, H, 0, dv)
    buf_k, buf_v, tail = tail_buffer(k, v, L, q.dtype)
    new_state = OVQState(_pad_slots(keys, N), _pad_slots(values, N), _pad_slots(counts, N), keys.shape[2],
                         written, buf_k, buf_v, tail)
    return o, new_state


def tail_buffer(k: torch.Tensor, v: torch.Tensor, chunk_size: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The decode buffer after a prompt k [B, H, T, dk], v [B, H, T, dv]: its last T mod L tokens (detached,
    in `dtype`) in rows 0.. of buffers [B, H, L-1, d], and that count."""
    B, H, T, _ = k.shape
    tail = T % chunk_size
    buf_k = torch.zeros(B, H, chunk_size - 1, k.shape[-1], dtype=dtype, device=k.device)
    buf_v = torch.zeros(B, H, chunk_size - 1, v.shape[-1], dtype=dtype, device=v.device)
    if tail:
        buf_k[:, :, :tail] = k[:, :, T - tail:].detach()
        buf_v[:, :, :tail] = v[:, :, T - tail:].detach()
    return buf_k, buf_v, tail


def ovq_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, cfg: OVQConfig,
             state: OVQState) -> tuple[torch.Tensor, OVQState]:
    """One decode token q, k [B, H, 1, dk], v [B, H, 1, dv] -> o [B, H, 1, dv] and the next state.

    Reads the dictionary, the buffer and the token itself; appends the token to the buffer, and when that
    makes L tokens, writes them as one chunk (exactly what `ovq_chunked` does at that position). The input
    state is never changed: the token goes to buffer row `buf_len`, beyond what the state holds, and a flush
    builds new dictionary tensors.
    """
    n, j = state.active, state.buf_len
    local_k = torch.cat([state.buf_k[:, :, :j], k], dim=2)
    local_v = torch.cat([state.buf_v[:, :, :j], v], dim=2)
    keys, values, counts = state.keys[:, :, :n], state.values[:, :, :n], state.counts[:, :, :n]
    o = read(q, local_k, local_v, beta, centroid_keys(keys, cfg), values, counts)
    return o, advance(k, v, cfg, state)


def advance(k: torch.Tensor, v: torch.Tensor, cfg: OVQConfig, state: OVQState) -> OVQState:
    """The state after one more token k [B, H, 1, dk], v [B, H, 1, dv]: appended to the buffer (row
    `buf_len`, beyond what `state` holds, so `state` itself is unchanged), or, when that makes L tokens,
    written into the dictionary as one chunk (new tensors) with the buffer emptied."""
    L, N = cfg.chunk_size, cfg.dict_size
    n, j = state.active, state.buf_len
    if j + 1 < L:
        state.buf_k[:, :, j : j + 1] = k
        state.buf_v[:, :, j : j + 1] = v
        return replace(state, buf_len=j + 1)
    local_k = torch.cat([state.buf_k[:, :, :j], k], dim=2)
    local_v = torch.cat([state.buf_v[:, :, :j], v], dim=2)
    keys, values, counts = state.keys[:, :, :n], state.values[:, :, :n], state.counts[:, :, :n]
    keys, values, counts, _ = write(local_k, local_v, keys, values, counts, cfg, state.written // L)
    return replace(state, keys=_pad_slots(keys, N), values=_pad_slots(values, N), counts=_pad_slots(counts, N),
                   active=keys.shape[2], written=state.written + L, buf_len=0)
