"""Sums of squares of shard views (fp32 per chunk, the chunks' partials summed in fp64), and the global ‖g‖."""

from __future__ import annotations

import math

import torch

from .comm import global_sums
from .views import ShardView, chunks


def sumsq(x: torch.Tensor) -> torch.Tensor:
    """Σ x² accumulated in fp64."""
    x = x.to(torch.float64)
    return torch.dot(x, x) if x.numel() else torch.zeros((), dtype=torch.float64, device=x.device)


def fp64_total(partials: list[torch.Tensor]) -> float:
    """Σ of per-chunk fp64 partials, added on their device in one reduction: one host sync for
    the lot (not one per chunk), and the same rounding wherever the same partials are summed."""
    return float(torch.stack(partials).sum()) if partials else 0.0


def local_grad_sumsq(views: list[ShardView]) -> torch.Tensor:
    """This rank's Σ g² over the views: one fp32 dot per chunk (read once, no fp64 copy), the
    partials summed in fp64 on the gradients' device (no host sync)."""
    parts = []
    for v in views:
        for start, end in chunks(v.numel):
            g = v.grad[start:end].to(torch.float32)
            parts.append(torch.dot(g, g))
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(parts).to(torch.float64).sum()


def grad_norm(views: list[ShardView], group=None) -> float:
    """Global ‖g‖ over the views (fp64 accumulation, one all-reduce)."""
    return math.sqrt(float(global_sums([local_grad_sumsq(views)], group)[0]))
