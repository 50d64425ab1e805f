"""Sums of squares of shard views, accumulated in fp64 a chunk at a time, and the global ‖g‖."""

from __future__ import annotations

import math

import torch

from .comm import global_sums
from .views import ShardView, chunks


def sumsq(x: torch.Tensor) -> torch.Tensor:
    """Σ x² accumulated in fp64."""
    x = x.to(torch.float64)
    return torch.dot(x, x) if x.numel() else torch.zeros((), dtype=torch.float64, device=x.device)


def local_grad_sumsq(views: list[ShardView]) -> torch.Tensor:
    """This rank's Σ g² over the views, in fp64, a chunk at a time."""
    local = torch.zeros((), dtype=torch.float64)
    for v in views:
        for start, end in chunks(v.numel):
            local += sumsq(v.grad[start:end]).cpu()
    return local


def grad_norm(views: list[ShardView], group=None) -> float:
    """Global ‖g‖ over the views (fp64 accumulation, one all-reduce)."""
    return math.sqrt(float(global_sums([local_grad_sumsq(views)], group)[0]))
