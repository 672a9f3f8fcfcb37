"""The training-free associative-memory probe (`ovqprof capacity --method probe`).

For each N in `pairs`, write N key-value pairs into a layer's core with `SequenceLayer.probe_memory`, query
every stored key and score what comes back:
- keys: `gaussian`, standard normal in R^dk (norm about sqrt(dk), what 1/sqrt(dk)-scaled attention
  expects; layers that L2-normalise keys do it in their own probe_memory); or `clustered`, CLUSTERS centres
  drawn standard normal per head, each key sqrt(1 - s^2) * (a random centre) + s * noise with
  s = CLUSTER_NOISE (so every coordinate still has variance 1 and two keys of one cluster have cosine about
  1 - s^2 = 0.75);
- values standard normal in R^dv; dk = dv = the layer's head_dim unless `dims` is given;
- `gap` filler pairs (same distributions) are written after the N pairs, before the reads;
- the layer's heads are independent trials (B = 1), each with its own keys and values;
- everything is drawn on the CPU in float32 from a torch.Generator seeded with the seed alone, then moved to
  the layer's device and dtype, so a seed gives the same pairs on every device.
Metrics per N, averaged over heads, queries and seeds:
- accuracy: fraction of reads whose nearest stored value by cosine (dot product of unit vectors, so a
  value's norm earns it nothing) among the N is the right one;
- cosine: mean cosine(read, stored value); rel_error: mean ||read - v|| / ||v||.
capacity@tau = the largest N with accuracy >= tau. Queries are read in blocks so that no call holds more
than `block_elements` query x pair x head scores (default BLOCK_ELEMENTS by device type).

What theory predicts (tests/test_capacity_probe.py holds the layers to the first four): softmax attention
retrieves almost perfectly far beyond dk pairs. The plain linear memory S = sum_i v_i k_i^T reads key j as
dk v_j plus crosstalk of variance (N - 1) dk per value coordinate, so its mean cosine is about
1 / sqrt(1 + (N - 1) / dk) and top-1 retrieval among N values needs dk^2 of order N log N (arXiv 2605.05189).
Positive feature maps (elu + 1) share a common direction and do far worse. OVQ with `growth: full` is exact
while N <= dict_size and degrades beyond. An untrained static codebook (Transformer-VQ) is poor on random keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ovqprof.capacity.rows import INTERRUPTED_NOTE, capacity_of, empty_row
from ovqprof.capacity.settings import ProbeSettings
from ovqprof.cell import build_cell_layer, classify_failure, failure_note
from ovqprof.layers.base import SequenceLayer
from ovqprof.spec import LayerSpec

CLUSTERS = 8
CLUSTER_NOISE = 0.5
# Default bound on query x pair x head scores per probe call: 64 MiB of float32 on CPU, 1 GiB on a GPU.
# Every call rewrites the pairs, so larger blocks mean fewer rewrites (what OVQ's chunk loop pays for).
BLOCK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}


def draw_keys(gen: torch.Generator, heads: int, n: int, dk: int, kind: str) -> torch.Tensor:
    """Keys [1, heads, n, dk] (float32, CPU) of distribution `kind` (gaussian or clustered)."""
    if kind == "gaussian":
        return torch.randn(1, heads, n, dk, generator=gen)
    centres = torch.randn(1, heads, CLUSTERS, dk, generator=gen)
    pick = torch.randint(CLUSTERS, (1, heads, n), generator=gen)
    noise = torch.randn(1, heads, n, dk, generator=gen)
    chosen = centres.gather(2, pick.unsqueeze(-1).expand(1, heads, n, dk))
    return math.sqrt(1 - CLUSTER_NOISE**2) * chosen + CLUSTER_NOISE * noise


def draw_pairs(seed: int, heads: int, n: int, gap: int, dk: int, dv: int, kind: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The written keys [1, H, n + gap, dk] and values [1, H, n + gap, dv]: n stored pairs, then gap fillers."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = draw_keys(gen, heads, n, dk, kind), torch.randn(1, heads, n, dv, generator=gen)
    if gap:
        keys = torch.cat([keys, draw_keys(gen, heads, gap, dk, kind)], dim=2)
        values = torch.cat([values, torch.randn(1, heads, gap, dv, generator=gen)], dim=2)
    return keys, values


@dataclass(frozen=True)
class Scores:
    """Metrics of one probe (sums over reads, and the number of reads)."""

    correct: float
    cosine: float
    rel_error: float
    reads: int

    def __add__(self, other: Scores) -> Scores:
        return Scores(self.correct + other.correct, self.cosine + other.cosine,
                      self.rel_error + other.rel_error, self.reads + other.reads)


class NonFiniteReads(ArithmeticError):
    """A read held NaN or inf (e.g. a half-precision overflow): the row is an error, not a number."""


def probe_once(layer: SequenceLayer, keys: torch.Tensor, values: torch.Tensor, n: int,
               block_elements: int) -> Scores:
    """Write keys/values [1, H, n + gap, d] through `layer.probe_memory`, read the first n keys back in
    blocks, and score each read against the n stored values."""
    H, written = keys.shape[1], keys.shape[2]
    stored = F.normalize(values[:, :, :n].float(), dim=-1)
    block = max(1, block_elements // (H * max(written, n)))
    total = Scores(0.0, 0.0, 0.0, 0)
    for start in range(0, n, block):
        end = min(start + block, n)
        reads = layer.probe_memory(keys, values, keys[:, :, start:end]).float()  # [1, H, m, dv]
        if not torch.isfinite(reads).all():
            raise NonFiniteReads(f"non-finite reads at pairs={n}")
        target = values[:, :, start:end].float()
        unit = F.normalize(reads, dim=-1)
        nearest = (unit @ stored.transpose(-1, -2)).argmax(dim=-1)  # [1, H, m]
        right = torch.arange(start, end, device=reads.device)
        total = total + Scores(
            correct=(nearest == right).sum().item(),
            cosine=(unit * stored[:, :, start:end]).sum(dim=-1).sum().item(),
            rel_error=((reads - target).norm(dim=-1) / target.norm(dim=-1)).sum().item(),
            reads=H * (end - start))
    return total


def _probe_row(layer: SequenceLayer, n: int, settings: ProbeSettings, dk: int, dv: int,
               device: torch.device, base: dict) -> dict:
    started = time.perf_counter()
    block_elements = settings.block_elements or BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"])
    row = empty_row(**base, pairs=n, state_bytes=_state_bytes(layer, n + settings.gap))
    try:
        total = Scores(0.0, 0.0, 0.0, 0)
        for seed in settings.seeds:
            keys, values = draw_pairs(seed, layer.heads, n, settings.gap, dk, dv, settings.keys)
            keys, values = (t.to(device=device, dtype=layer.dtype) for t in (keys, values))
            total = total + probe_once(layer, keys, values, n, block_elements)
        row.update(accuracy=total.correct / total.reads, cosine=total.cosine / total.reads,
                   rel_error=total.rel_error / total.reads, status="ok")
    except NotImplementedError:
        raise
    except Exception as exc:  # a failing cell is a row, never a crash of the whole run
        row.update(status=classify_failure(exc), note=failure_note(exc))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["wall_s"] = time.perf_counter() - started
    return row


def _state_bytes(layer: SequenceLayer, seq: int) -> int | None:
    try:
        return int(layer.state_bytes(1, seq))
    except Exception:  # a layer without a state formula: unknown, not a failure of the probe
        return None


def probe_layer(spec: LayerSpec, settings: ProbeSettings, device: torch.device,
                on_row: Callable[[dict], None], on_start: Callable[[str, int], None] | None = None) -> None:
    """Probe one layer at every N of `settings.pairs`; its rows go to `on_row` once the layer is done (so
    each carries the layer's capacity). An interrupt (KeyboardInterrupt) still hands over the finished rows,
    with capacity None and a note, before it propagates."""
    if settings.dtype is not None:
        spec = spec.replace(dtype=settings.dtype)
    dk = dv = settings.dims or spec.head_dim
    base = dict(method="probe", layer=spec.name, type=spec.type, kind=None, dtype=spec.dtype, device=str(device),
                keys=settings.keys, gap=settings.gap, seeds=",".join(str(s) for s in settings.seeds), dk=dk,
                dv=dv, tau=settings.tau)
    try:
        layer = build_cell_layer(spec, device)
    except Exception as exc:
        on_row(empty_row(**base, status=classify_failure(exc), note=f"cannot build the layer: {failure_note(exc)}"))
        return
    base.update(kind=getattr(layer, "kind", None), dtype=str(layer.dtype).removeprefix("torch."))
    rows: list[dict] = []
    try:
        for n in settings.pairs:
            if on_start is not None:
                on_start(spec.name, n)
            try:
                rows.append(_probe_row(layer, n, settings, dk, dv, device, base))
            except NotImplementedError as exc:
                reason = str(exc) or f"{type(layer).__name__} has no associative-memory probe"
                on_row(empty_row(**base, status="skipped", note=reason))
                return
    except KeyboardInterrupt:
        for row in rows:
            on_row({**row, "note": row["note"] or INTERRUPTED_NOTE})
        raise
    capacity = capacity_of(rows, settings.tau)
    for row in rows:
        on_row({**row, "capacity": capacity})


def run_probe(layers: list[LayerSpec], settings: ProbeSettings, device: torch.device,
              on_row: Callable[[dict], None], on_start: Callable[[str, int], None] | None = None) -> None:
    """Probe every layer in order (see `probe_layer`)."""
    for spec in layers:
        probe_layer(spec, settings, device, on_row, on_start)

