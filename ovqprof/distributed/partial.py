"""Attention's reduction over keys as an associative log-sum-exp reduction (Tree Attention, arXiv 2408.04093).

A query q over a block of keys gives the partial (m, l, num): m the largest logit, l = sum exp(logit - m),
num = sum exp(logit - m) v. Two partials merge exactly by rescaling to the larger max, in any order and any
grouping; the output is num / l. Logits are q.k / sqrt(dh), as SDPA's default scale.

Shapes: q[B, H, dh] (one decode token), a block kv[2, B, G, n, dh] with G kv heads (G divides H; query head h
reads kv head h // (H/G), as SDPA's enable_gqa). A partial holds m, l [B, H] and num [B, H, dh].
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Partial(NamedTuple):
    """m, l [B, H]: running max logit and sum of exponentials below it; num [B, H, dh]: weighted values."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 - the paper's name for the denominator
    num: torch.Tensor


def local_partial(q: torch.Tensor, kv: torch.Tensor) -> Partial:
    """The partial of q[B, H, dh] over kv[2, B, G, n, dh]; an empty block (n = 0) gives m = -inf, l = 0."""
    B, H, dh = q.shape
    G, n = kv.shape[2], kv.shape[3]
    if n == 0:
        return empty_partial(q)
    qg = q.view(B, G, H // G, dh)  # query heads grouped under the kv head they read
    logits = torch.matmul(qg, kv[0].transpose(-1, -2)) * dh ** -0.5  # [B, G, H/G, n]
    m = logits.amax(dim=-1, keepdim=True)
    p = torch.exp(logits - m)
    num = torch.matmul(p, kv[1])  # [B, G, H/G, dh]
    return Partial(m.view(B, H), p.sum(dim=-1).view(B, H), num.view(B, H, dh))


def empty_partial(q: torch.Tensor) -> Partial:
    """The neutral partial of no keys: merging it changes nothing."""
    B, H, dh = q.shape
    return Partial(q.new_full((B, H), -torch.inf), q.new_zeros(B, H), q.new_zeros(B, H, dh))


def merge(a: Partial, b: Partial) -> Partial:
    """The partial of the union of both key sets (the online-softmax update)."""
    m = torch.maximum(a.m, b.m)
    # exp(-inf - finite) = 0; a max of -inf on both sides means both are empty: keep zeros, not NaN
    safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    sa, sb = torch.exp(a.m - safe), torch.exp(b.m - safe)
    return Partial(m, a.l * sa + b.l * sb, a.num * sa.unsqueeze(-1) + b.num * sb.unsqueeze(-1))


def finish(p: Partial) -> torch.Tensor:
    """o[B, H, dh] = num / l."""
    return p.num / p.l.unsqueeze(-1)


def reference_attention(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Single-device SDPA of q[B, H, dh] over the whole cache kv[2, B, G, T, dh] -> o[B, H, dh]: what every
    strategy must equal."""
    import torch.nn.functional as F

    H, G = q.shape[1], kv.shape[2]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kv[0], kv[1], enable_gqa=G < H)
    return o.squeeze(2)
