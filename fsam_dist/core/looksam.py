"""LookSAM's reused direction (Liu et al., CVPR 2022) over local shard views.

After a perturbed step, g_v = g₂ − (⟨g, g₂⟩/‖g‖²) g is the part of the perturbed gradient
orthogonal to g: what the perturbation added. The plain steps that follow (``interval`` > 1) use
g + α · ‖g‖/‖g_v‖ · g_v instead of g. Every norm and dot product is a global sum (one all-reduce
each), so the result does not depend on the sharding. Driven by :class:`~fsam_dist.core.fsam.FSAM`
(``reuse_direction``).
"""

from __future__ import annotations

import math

import torch

from .comm import global_sums
from .norms import fp64_total, local_grad_sumsq, sumsq
from .views import ShardView, chunks


def _dots(views: list[ShardView], others: dict) -> torch.Tensor:
    """Local fp64 [⟨o, g⟩, ⟨o, o⟩, ⟨g, g⟩] of each view's gradient g and its tensor o in ``others``:
    per-chunk fp64 partials, summed on their device (no host sync; the caller's all-reduce and
    ``.tolist()`` are the one wait)."""
    parts = []
    for v in views:
        other = others[v.key]
        for start, end in chunks(v.numel):
            g = v.grad[start:end].to(torch.float64)
            o = other[start:end].to(torch.float64)
            parts.append(torch.stack([torch.dot(o, g), torch.dot(o, o), torch.dot(g, g)]))
    return torch.stack(parts).sum(0) if parts else torch.zeros(3, dtype=torch.float64)


def sharpness_component(views: list[ShardView], first: dict, group=None) -> tuple[float, float, float]:
    """LookSAM's g_v = g_s − (⟨g, g_s⟩ / ‖g‖²) · g, written in place over ``first``.

    ``first``: per view key, a copy of the pass-1 gradient g; the views hold g_s (pass 2, at
    w + e). One all-reduce of 3 fp64. Returns (this rank's Σ g_v², reduced later with the next
    step's ‖g‖²; the global ‖g‖; the global ‖g_v‖ / ‖g‖, from the reduced sums, for logging)."""
    dot, first_sumsq, second_sumsq = global_sums(_dots(views, first), group).tolist()
    coef = dot / first_sumsq if first_sumsq > 0 else 0.0
    partials = []
    with torch.no_grad():
        for v in views:
            g = first[v.key]
            for start, end in chunks(v.numel):
                piece = g[start:end]
                piece.mul_(-coef).add_(v.grad[start:end])
                partials.append(sumsq(piece))
    local = fp64_total(partials)
    ratio = math.sqrt(max(0.0, second_sumsq - coef * dot) / first_sumsq) if first_sumsq > 0 else 0.0
    return local, math.sqrt(first_sumsq), ratio


def add_sharpness_component(views: list[ShardView], component: dict, component_sumsq: float,
                            alpha: float | None, look_grad_norm: float, group=None) -> dict:
    """LookSAM's plain step: g ← g + α · ‖g‖ / ‖g_v‖ · g_v on each view's gradient, in place.

    ``alpha`` None: α = ‖g_v‖ / ‖g_look‖, the size g_v had next to the gradient it was measured
    with (``look_grad_norm``), i.e. g ← g + ‖g‖ / ‖g_look‖ · g_v. One all-reduce of [‖g‖², ‖g_v‖²]
    (``component_sumsq``: this rank's Σ g_v²). Nothing is added when g_v is 0."""
    grad_sumsq, component_sumsq = global_sums([local_grad_sumsq(views),
                                               torch.tensor(component_sumsq, dtype=torch.float64)],
                                              group).tolist()
    if component_sumsq <= 0 or look_grad_norm <= 0:
        scale = 0.0
    elif alpha is None:
        scale = math.sqrt(grad_sumsq) / look_grad_norm
    else:
        scale = alpha * math.sqrt(grad_sumsq / component_sumsq)
    if scale:
        with torch.no_grad():
            for v in views:
                v.grad.add_(component[v.key].to(v.grad.dtype), alpha=scale)
    return {"grad_norm": math.sqrt(grad_sumsq), "reuse_scale": scale}
