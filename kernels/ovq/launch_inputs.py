"""Host-side inputs every OVQ kernel launch shares (per-head and split, forward and backward): the growth
schedule (active slots at each chunk start, slots each chunk spawns), `init: random`'s spawn ranks drawn as
the reference draws them, the write's scratch vectors, and the write- and read-rule constexprs."""

from __future__ import annotations

import torch

from .assign import init_mode
from .config import OVQConfig, spawn_count


def schedule_tensors(cfg: OVQConfig, n_chunks: int, n_write: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Active slots at each chunk start [n_chunks] and slots each written chunk spawns [max(n_write, 1)]."""
    starts, spawns = [], []
    for c in range(n_chunks):
        n, m = spawn_count(cfg, c)
        starts.append(n)
        spawns.append(m)
    nact = torch.tensor(starts or [0], dtype=torch.int32, device=device)
    msp = torch.tensor(spawns[:n_write] or [0], dtype=torch.int32, device=device)
    return nact, msp


def random_ranks(cfg: OVQConfig, B: int, H: int, n_write: int, device: torch.device) -> torch.Tensor:
    """For `init: random`: rank [n_write, B, H, L] of each token in its chunk's spawn order (the j-th pick has
    rank j, tokens not picked rank L), drawn exactly as the reference draws them."""
    L = cfg.chunk_size
    ranks = torch.full((max(n_write, 1), B, H, L), L, dtype=torch.int32)
    for c in range(n_write):
        m = spawn_count(cfg, c)[1]
        if m == L:
            ranks[c] = torch.arange(L, dtype=torch.int32)
        elif m > 0:
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + c)
            picks = torch.rand(B, H, L, generator=gen).topk(m, dim=-1, largest=False).indices
            ranks[c].scatter_(-1, picks, torch.arange(m, dtype=torch.int32).expand(B, H, m).contiguous())
    return ranks.to(device)


def write_scratch(programs: int, L: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The write's per-program scratch vectors (assign.py): best, best_idx, spawn keys, ranks [programs, L]."""
    f32 = dict(dtype=torch.float32, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return (torch.empty(programs, L, **f32), torch.empty(programs, L, **i32), torch.empty(programs, L, **f32),
            torch.empty(programs, L, **i32))


def write_options(cfg: OVQConfig) -> dict:
    """The write- and read-rule constexprs of the forward kernels for `cfg` (init checked)."""
    return dict(INIT=init_mode(cfg.init), CHUNK_START=cfg.assign == "chunk_start", COUNT_BIAS=cfg.count_bias,
                NORMALIZE=cfg.normalize_centroids)


def spawn_ranks_input(cfg: OVQConfig, B: int, H: int, n_write: int, device: torch.device) -> torch.Tensor:
    """RANK, the host's spawn ranks for `init: random` (a placeholder for the other inits)."""
    if cfg.init == "random":
        return random_ranks(cfg, B, H, n_write, device)
    return torch.empty(1, dtype=torch.int32, device=device)
