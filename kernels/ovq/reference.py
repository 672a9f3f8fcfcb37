"""OVQ-attention core in PyTorch: the exact reference every kernel is checked against, and the CPU path.

Works on already projected, per-head tensors: q, k [B, H, T, dk] (unit-norm), v [B, H, T, dv], beta [H].
Vectorised over batch and heads; the only Python loops are over chunks (and, for `init: spread`, over the
slots a chunk spawns, which sum to at most N over a whole sequence). Math runs in the dtype of the inputs
(the layer passes float32 for fp16/bf16 models).

Per chunk (positions cL .. cL+L-1), with the dictionary frozen at the chunk start (README, "How OVQ-attention works here"):
1. read: one softmax over the n active slots (logit beta q.D_k[i] + log c[i]) and the chunk's own keys
   j <= t (logit beta q.k_j); output sum_i p_i D_v[i] + sum_j p_j v_j;
2. grow: spawn m = active_after(end) - n slots from the chunk's keys (spread, spread_topm or random init);
3. merge: every other token goes to argmax_i k.D_k[i] over the active slots (all of them, or with
   `assign: chunk_start` only those active at the chunk start); running-mean (or constant-step) update of keys
   and counts; values as running means too, or with `value_update: delta` moved by the residuals of a
   dictionary-only read. `count_bias: false` drops log c[i] from the read's slot logits.
Streaming decode (`ovq_step`) buffers tokens since the last flush and runs 2-3 when L have arrived, so it
reproduces `ovq_chunked` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ovqprof.phases import phase

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
         dict_v: torch.Tensor, counts: torch.Tensor, count_bias: bool = True) -> torch.Tensor:
    """One softmax over the dictionary and the causal local keys.

    q [B, H, lq, dk]; local k [B, H, lk, dk], v [B, H, lk, dv] with lk >= lq, the queries being the last lq
    local positions (query i sees local j <= i + lk - lq); dict_k [B, H, n, dk] (= D_k), dict_v [B, H, n, dv],
    counts [B, H, n] (all > 0); beta [H]. count_bias adds log c[i] to slot i's logit. Returns o [B, H, lq, dv].
    """
    lq, lk = q.shape[2], k.shape[2]
    b = beta.to(q.dtype).view(1, -1, 1, 1)
    local = b * (q @ k.transpose(-1, -2))  # [B, H, lq, lk]
    if lk:
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        local = local.masked_fill(~visible, float("-inf"))
    n = dict_k.shape[2]
    if n == 0:
        return torch.softmax(local, dim=-1) @ v
    slots = b * (q @ dict_k.transpose(-1, -2))  # [B, H, lq, n]
    if count_bias:
        slots = slots + counts.log().unsqueeze(-2)
    p = torch.softmax(torch.cat([slots, local], dim=-1), dim=-1)
    return p[..., :n] @ dict_v + p[..., n:] @ v


def dictionary_read(k: torch.Tensor, beta: torch.Tensor, dict_k: torch.Tensor, dict_v: torch.Tensor,
                    counts: torch.Tensor, count_bias: bool) -> torch.Tensor:
    """R(k): a read of the dictionary alone (no local keys) with the keys k [B, H, L, dk] as queries, the
    prediction `value_update: delta` subtracts; zeros [B, H, L, dv] when the dictionary is empty."""
    B, H, L, _ = k.shape
    if dict_k.shape[2] == 0:
        return k.new_zeros(B, H, L, dict_v.shape[-1])
    none_k, none_v = k.new_zeros(B, H, 0, k.shape[-1]), k.new_zeros(B, H, 0, dict_v.shape[-1])
    return read(k, none_k, none_v, beta, dict_k, dict_v, counts, count_bias)


@torch.no_grad()
def choose_spawn(k: torch.Tensor, dict_k: torch.Tensor, m: int, cfg: OVQConfig, chunk_index: int) -> torch.Tensor:
    """Which of the chunk's L keys k [B, H, L, dk] become new slots: indices [B, H, m], in slot order.

    spread: farthest-first; each pick is the candidate whose highest similarity to the active centroids
    dict_k [B, H, n, dk] and to the keys picked so far is lowest (ties: lowest position); m = L takes the
    tokens in position order.
    spread_topm: one shot; see `_spawn_topm`.
    random: uniform without replacement from a generator seeded by (seed, chunk_index), drawn on the CPU
    so the choice is the same on every device.
    """
    B, H, L, _ = k.shape
    if cfg.init == "spread_topm":
        return _spawn_topm(k, dict_k, m)
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


def _spawn_topm(k: torch.Tensor, dict_k: torch.Tensor, m: int) -> torch.Tensor:
    """`init: spread_topm` picks [B, H, m] (the public implementation's one-shot spawn; no interaction between
    picks). With an active dictionary: the m keys whose best similarity max_i k.D_k[i] is lowest, in increasing
    order of it. With an empty one: key 0, then the m - 1 keys least similar to it (k.k_0), increasing. Ties go
    to the lower position (a stable sort)."""
    B, H, L, _ = k.shape
    if m == 0:
        return torch.zeros(B, H, 0, dtype=torch.long, device=k.device)
    if dict_k.shape[2] > 0:
        best = (k @ dict_k.transpose(-1, -2)).amax(dim=-1)  # [B, H, L]
        return best.sort(dim=-1, stable=True).indices[..., :m]
    to_first = (k[:, :, 1:] @ k[:, :, :1].transpose(-1, -2)).squeeze(-1)  # [B, H, L-1]
    rest = to_first.sort(dim=-1, stable=True).indices[..., : m - 1] + 1
    return torch.cat([torch.zeros(B, H, 1, dtype=torch.long, device=k.device), rest], dim=-1)


def write(k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor,
          cfg: OVQConfig, chunk_index: int, beta: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grow and merge one full chunk k [B, H, L, dk], v [B, H, L, dv] into the active dictionary keys
    [B, H, n, dk], values [B, H, n, dv], counts [B, H, n] (n = slots active at the chunk start). beta [H] is
    needed only by `value_update: delta` (its residuals read the dictionary).

    Returns the new active dictionary (n + m slots) and the slot each token went to, z [B, H, L]. Out of
    place: gradients flow to k, v and the old dictionary through the running means (linear in k, v);
    assignments and spawns are discrete and carry none.
    """
    n, m = spawn_count(cfg, chunk_index)
    if keys.shape[2] != n:
        raise ValueError(f"chunk {chunk_index} expects {n} active slots, the state has {keys.shape[2]}")
    B, H, L, dk = k.shape
    dv = v.shape[-1]
    dict_k = centroid_keys(keys, cfg)
    old_dict_k, old_values, old_counts = dict_k, values, counts
    spawned = torch.zeros(B, H, L, dtype=torch.bool, device=k.device)
    if m > 0:
        picks = choose_spawn(k.detach(), dict_k.detach(), m, cfg, chunk_index)  # [B, H, m]
        spawned.scatter_(-1, picks, True)
        keys = torch.cat([keys, k.gather(2, picks.unsqueeze(-1).expand(B, H, m, dk))], dim=2)
        values = torch.cat([values, v.gather(2, picks.unsqueeze(-1).expand(B, H, m, dv))], dim=2)
        counts = torch.cat([counts, counts.new_ones(B, H, m)], dim=2)
        dict_k = torch.cat([dict_k, centroid_keys(keys[:, :, n:], cfg)], dim=2)
    z = _assignments(k.detach(), dict_k.detach(), n, picks if m > 0 else None, cfg)
    w = (~spawned).to(k.dtype)
    n_new = n + m
    merged = torch.zeros(B, H, n_new, dtype=k.dtype, device=k.device).scatter_add(2, z, w)
    idx_k = z.unsqueeze(-1).expand(B, H, L, dk)
    idx_v = z.unsqueeze(-1).expand(B, H, L, dv)
    sum_k = torch.zeros(B, H, n_new, dk, dtype=k.dtype, device=k.device).scatter_add(2, idx_k, k * w.unsqueeze(-1))
    new_counts = counts + merged
    mc = merged.unsqueeze(-1)
    if cfg.lr == "adaptive":
        c = new_counts.unsqueeze(-1)
        keys = keys + (sum_k - mc * keys) / c
    else:
        hit = mc > 0
        keys = torch.where(hit, keys + cfg.eta * (sum_k / mc.clamp_min(1.0) - keys), keys)
    if cfg.value_update == "delta":
        if beta is None:
            raise ValueError("value_update: delta needs beta (its residuals read the dictionary)")
        # Every token of slot i (its spawner included) adds r_j / c'_i; a spawned slot starts from zero.
        r = v - dictionary_read(k, beta, old_dict_k, old_values, old_counts, cfg.count_bias)
        sum_r = torch.zeros(B, H, n_new, dv, dtype=v.dtype, device=v.device).scatter_add(2, idx_v, r)
        values = F.pad(old_values, (0, 0, 0, m)) + sum_r / new_counts.unsqueeze(-1)
        return keys, values, new_counts, z
    sum_v = torch.zeros(B, H, n_new, dv, dtype=v.dtype, device=v.device).scatter_add(2, idx_v, v * w.unsqueeze(-1))
    if cfg.lr == "adaptive":
        values = values + (sum_v - mc * values) / new_counts.unsqueeze(-1)
    else:
        hit = mc > 0
        values = torch.where(hit, values + cfg.eta * (sum_v / mc.clamp_min(1.0) - values), values)
    return keys, values, new_counts, z


@torch.no_grad()
def _assignments(k: torch.Tensor, dict_k: torch.Tensor, n: int, picks: torch.Tensor | None,
                 cfg: OVQConfig) -> torch.Tensor:
    """Slot z [B, H, L] of each key of a chunk: a spawning token owns its new slot n + j (j its pick order);
    every other token its nearest slot (argmax k.D_k, ties to the lowest) among all n + m active slots
    (`assign: with_spawned`) or among the n active at the chunk start (`chunk_start`; slot 0 when n = 0).
    dict_k [B, H, n + m, dk]: D_k of the old slots then of the spawned ones."""
    B, H, L, _ = k.shape
    if cfg.assign == "chunk_start":
        if n == 0:
            z = torch.zeros(B, H, L, dtype=torch.long, device=k.device)
        else:
            z = (k @ dict_k[:, :, :n].transpose(-1, -2)).argmax(dim=-1)
    else:
        z = (k @ dict_k.transpose(-1, -2)).argmax(dim=-1)
    if picks is not None:
        m = picks.shape[-1]
        z.scatter_(-1, picks, torch.arange(n, n + m, device=k.device).expand(B, H, m))
    return z


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
    if state is None:
        state = empty_state(B, H, dk, v.shape[-1], cfg, dtype=q.dtype, device=q.device)
    if state.buf_len:
        raise ValueError("ovq_chunked continues only from a state with an empty buffer (written % L == 0)")

    def write_chunk(kc, vc, keys, values, counts, chunk_index):
        with phase("write"):
            return write(kc, vc, keys, values, counts, cfg, chunk_index, beta)[:3]

    return chunk_loop(q, k, v, beta, cfg, state, read, write_chunk)


def chunk_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, cfg: OVQConfig,
               state: OVQState, read_chunk, write_chunk) -> tuple[torch.Tensor, OVQState]:
    """The chunked forward's loop, shared by the reference and the fast CPU core (chunked_cpu.py): every
    chunk is read against the dictionary written before it, with `read_chunk(q, k, v, beta, D_k, D_v, counts,
    count_bias)` (as `read`), and every full chunk is then written with `write_chunk(k, v, keys, values,
    counts, chunk_index) -> (keys, values, counts)`. Starts from `state` (empty buffer); returns o [B, H, T, dv]
    and the state after the sequence, the last T mod L tokens buffered, with the autograd graph."""
    B, H, T, _ = q.shape
    dv = v.shape[-1]
    L, N = cfg.chunk_size, cfg.dict_size
    n = state.active
    keys, values, counts = state.keys[:, :, :n], state.values[:, :, :n], state.counts[:, :, :n]
    written = state.written
    outs = []
    for start in range(0, T, L):
        end = min(start + L, T)
        if not cfg.grad_through_state:
            keys, values, counts = keys.detach(), values.detach(), counts.detach()
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        with phase("read"):
            outs.append(read_chunk(qc, kc, vc, beta, centroid_keys(keys, cfg), values, counts, cfg.count_bias))
        if end - start == L:
            keys, values, counts = write_chunk(kc, vc, keys, values, counts, written // L)
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
    with phase("read"):
        o = read(q, local_k, local_v, beta, centroid_keys(keys, cfg), values, counts, cfg.count_bias)
    with phase("state update"):  # the buffer append, or every L-th token the flush (a chunk write)
        return o, advance(k, v, cfg, state, beta)


def advance(k: torch.Tensor, v: torch.Tensor, cfg: OVQConfig, state: OVQState,
            beta: torch.Tensor | None = None) -> OVQState:
    """The state after one more token k [B, H, 1, dk], v [B, H, 1, dv]: appended to the buffer (row
    `buf_len`, beyond what `state` holds, so `state` itself is unchanged), or, when that makes L tokens,
    written into the dictionary as one chunk (new tensors) with the buffer emptied. beta [H]: only
    `value_update: delta` needs it (see `write`)."""
    L, N = cfg.chunk_size, cfg.dict_size
    n, j = state.active, state.buf_len
    if j + 1 < L:
        state.buf_k[:, :, j : j + 1] = k
        state.buf_v[:, :, j : j + 1] = v
        return replace(state, buf_len=j + 1)
    local_k = torch.cat([state.buf_k[:, :, :j], k], dim=2)
    local_v = torch.cat([state.buf_v[:, :, :j], v], dim=2)
    keys, values, counts = state.keys[:, :, :n], state.values[:, :, :n], state.counts[:, :, :n]
    keys, values, counts, _ = write(local_k, local_v, keys, values, counts, cfg, state.written // L, beta)
    return replace(state, keys=_pad_slots(keys, N), values=_pad_slots(values, N), counts=_pad_slots(counts, N),
                   active=keys.shape[2], written=state.written + L, buf_len=0)
