r"""FSAM: sharpness-aware minimisation with a Fisher mask, over local shard views.

Zhong et al., "Improving Sharpness-Aware Minimization with Fisher Mask for Better
Generalization on Language Models", EMNLP Findings 2022 (arXiv 2210.05497); DESIGN.md §1.

Per optimizer step :math:`t`, radius :math:`\rho`, keep ratio :math:`\kappa`, refresh interval
:math:`T_m`:

.. code-block:: text

    pass 1:  g = ∇L(w)                                   (reduced over data parallel)
    if no mask yet or t % T_m == 0:
             F = fisher(g)             'batch': g²; 'empirical': Σ_i (∇ log p(y_i|x_i))²
             m = top-k(F over eligible entries),  k = round(κ · N_eligible)     (global)
    n = ‖g‖ over all trainable entries ('full')  or  ‖m ⊙ g‖ ('masked')
    e = ρ · m ⊙ g / (n + ε)  on eligible entries;  ρ · g / (n + ε) or 0 on excluded ones
        adaptive (ASAM): g ← |w|² ⊙ g in e, and n = ‖|w| ⊙ g‖
    w ← w + e;  pass 2: g₂ = ∇L(w + e);  w ← w − e exactly (saved values restored)
    B.step(g₂)

Refreshing the mask never cancels the step's perturbation. Every global quantity (norms, the
eligible count, the top-k) is computed from local shards with :mod:`.comm` and :mod:`.select`,
so the answer does not depend on how the parameters are sharded.

This module holds the functional pieces (:func:`grad_norm_partials`, :func:`fisher_scores`,
:func:`compute_mask`, :func:`perturb`, :func:`restore`) and a thin stateful :class:`FSAM`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .comm import global_sums
from .select import global_topk_mask
from .views import ShardView

NORMS = ("full", "masked")
EXCLUDED_MODES = ("dense", "none")
FISHERS = ("batch", "empirical")


def _key(view: ShardView) -> tuple[str, int]:
    return (view.name, view.position)


def count_nonfinite(tensors: list[torch.Tensor]) -> int:
    """Local count of tensors holding a NaN or inf (reduce it before acting on it)."""
    return sum(int(not bool(torch.isfinite(t).all())) for t in tensors if t.numel())


def grad_norm(views: list[ShardView], group=None) -> float:
    """Global ‖g‖ over the views (fp64 accumulation, one all-reduce)."""
    local = sum((v.grad.double().square().sum() for v in views), torch.zeros((), dtype=torch.float64))
    return math.sqrt(float(global_sums([local], group)[0]))


def direction(view: ShardView, adaptive: bool) -> torch.Tensor:
    """The ascent direction of one view in fp32: g, or |w|² ⊙ g for ASAM."""
    g = view.grad.to(torch.float32)
    if adaptive:
        w = view.weights.to(torch.float32)
        return w * w * g
    return g


def fisher_scores(views: list[ShardView]) -> list[torch.Tensor]:
    """'batch' Fisher (the official code): the squared reduced gradient of each eligible view."""
    return [view.grad.to(torch.float32).square() for view in views if view.eligible]


def compute_mask(views: list[ShardView], scores: list[torch.Tensor], keep_ratio: float,
                 group=None) -> tuple[dict[tuple[str, int], torch.Tensor], float]:
    """Global top-k mask over the eligible views, ``k = round(keep_ratio · N_eligible)``.

    ``scores`` holds one tensor per *eligible* view, in order. Returns a bool mask per eligible
    view keyed by (name, position), and the global density k / N_eligible.
    """
    eligible = [v for v in views if v.eligible]
    if len(scores) != len(eligible):
        raise ValueError(f"compute_mask: {len(scores)} score tensors for {len(eligible)} eligible views")
    n_eligible = int(global_sums([torch.tensor(float(sum(v.numel for v in eligible)))], group)[0])
    k = round(keep_ratio * n_eligible)
    masks = global_topk_mask(scores, [v.position for v in eligible], k, group)
    density = k / n_eligible if n_eligible else 0.0
    return {_key(v): m.reshape(-1) for v, m in zip(eligible, masks)}, density


@dataclass
class Perturbation:
    """What :func:`perturb` changed, so :func:`restore` can undo it exactly."""

    saved: dict[tuple[str, int], tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)
    """Per view: (indices or None for all entries, the original values there)."""
    grad_norm: float = 0.0
    """‖g‖ over all trainable entries (the full norm, whatever ``norm`` is)."""
    scale_norm: float = 0.0
    """n, the norm e is divided by."""
    perturbation_norm: float = 0.0
    """‖e‖."""


def perturb(views: list[ShardView], masks: dict, *, rho: float, eps: float, norm: str,
            excluded_mode: str, adaptive: bool, group=None, save: bool = True) -> Perturbation:
    """Add e to each view's weights in place (DESIGN.md §1) and return what restores them.

    One all-reduce of two fp64 sums: ‖g‖² (or ‖|w|⊙g‖² for ASAM) over all trainable entries, and
    the squared norm of the entries that are perturbed.
    """
    pieces = []   # (view, indices or None, direction values at those entries)
    full_sumsq = torch.zeros((), dtype=torch.float64)
    masked_sumsq = torch.zeros((), dtype=torch.float64)
    perturbed_sumsq = torch.zeros((), dtype=torch.float64)
    for view in views:
        d = direction(view, adaptive)
        # ASAM's normaliser is ‖|w| ⊙ g‖, not ‖|w|² ⊙ g‖.
        normed = (view.weights.to(torch.float32).abs() * view.grad.to(torch.float32)) if adaptive else d
        full_sumsq += normed.double().square().sum()
        if view.eligible:
            idx = masks[_key(view)].nonzero().reshape(-1)
            masked_sumsq += normed[idx].double().square().sum()
            pieces.append((view, idx, d[idx]))
        elif excluded_mode == "dense":
            pieces.append((view, None, d))
    for _, _, values in pieces:
        perturbed_sumsq += values.double().square().sum()
    full, masked, perturbed = (float(x) for x in global_sums([full_sumsq, masked_sumsq, perturbed_sumsq], group))
    n = math.sqrt(full if norm == "full" else masked)
    scale = rho / (n + eps)
    result = Perturbation(grad_norm=math.sqrt(full), scale_norm=n, perturbation_norm=scale * math.sqrt(perturbed))
    with torch.no_grad():
        for view, idx, values in pieces:
            w = view.weights
            e = (values * scale).to(w.dtype)
            if idx is None:
                if save:
                    result.saved[_key(view)] = (None, w.clone())
                w.add_(e)
            else:
                original = w[idx]
                if save:
                    result.saved[_key(view)] = (idx, original)
                w[idx] = original + e
    return result


def restore(views: list[ShardView], perturbation: Perturbation) -> None:
    """Put back the exact values :func:`perturb` saved (no w + e − e rounding)."""
    by_key = {_key(v): v for v in views}
    with torch.no_grad():
        for key, (idx, original) in perturbation.saved.items():
            w = by_key[key].weights
            if idx is None:
                w.copy_(original)
            else:
                w[idx] = original


class FSAM:
    """FSAM state across steps: the mask, when it was refreshed, and the pending perturbation.

    Args:
        rho: perturbation radius ρ (≥ 0). ρ = 0 makes the step the base optimizer's.
        keep_ratio: κ in (0, 1], fraction of eligible entries perturbed; 1 is SAM.
        mask_interval: refresh the mask every this many optimizer steps (≥ 1).
        fisher: 'batch' (g², the official code) or 'empirical' (caller passes scores).
        norm: 'full' (‖g‖ over all trainable entries) or 'masked' (‖m ⊙ g‖).
        excluded_mode: 'dense' (excluded entries get ρ·g/(n+ε)) or 'none' (not perturbed).
        adaptive: ASAM's |w|-scaled perturbation.
        eps: ε added to the norm (> 0).

    Call :meth:`ascend` after pass 1 and :meth:`descend` after pass 2 (before the base step).
    """

    def __init__(self, *, rho: float = 0.05, keep_ratio: float = 0.1, mask_interval: int = 100,
                 fisher: str = "batch", norm: str = "full", excluded_mode: str = "dense",
                 adaptive: bool = False, eps: float = 1e-12) -> None:
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"Invalid rho: {rho!r} (must be a finite number >= 0)")
        if not (isinstance(keep_ratio, (int, float)) and 0 < keep_ratio <= 1):
            raise ValueError(f"Invalid keep_ratio: {keep_ratio!r} (must be in (0, 1])")
        if isinstance(mask_interval, bool) or not isinstance(mask_interval, int) or mask_interval < 1:
            raise ValueError(f"Invalid mask_interval: {mask_interval!r} (must be an int >= 1)")
        if fisher not in FISHERS:
            raise ValueError(f"Invalid fisher: {fisher!r} (one of {FISHERS})")
        if norm not in NORMS:
            raise ValueError(f"Invalid norm: {norm!r} (one of {NORMS})")
        if excluded_mode not in EXCLUDED_MODES:
            raise ValueError(f"Invalid excluded_mode: {excluded_mode!r} (one of {EXCLUDED_MODES})")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"Invalid eps: {eps!r} (must be > 0)")
        self.rho, self.keep_ratio, self.mask_interval = float(rho), float(keep_ratio), mask_interval
        self.fisher, self.norm, self.excluded_mode = fisher, norm, excluded_mode
        self.adaptive, self.eps = bool(adaptive), float(eps)
        self.masks: dict[tuple[str, int], torch.Tensor] | None = None
        self.mask_step: int | None = None
        self._pending: Perturbation | None = None

    def refresh_due(self, step: int) -> bool:
        """Whether the mask is (re)computed at optimizer step ``step``."""
        return self.masks is None or (step % self.mask_interval == 0 and self.mask_step != step)

    def ascend(self, views: list[ShardView], step: int, group=None, scores: list[torch.Tensor] | None = None,
               save: bool = True) -> dict:
        """After pass 1 (gradients known to be finite): refresh the mask if due, perturb in place.

        ``scores``: the 'empirical' Fisher, one tensor per eligible view (required then).
        Returns statistics for logging.
        """
        if self._pending is not None:
            raise RuntimeError("FSAM.ascend called twice without descend: weights are still perturbed")
        stats: dict = {}
        if self.refresh_due(step):
            if scores is None:
                if self.fisher == "empirical":
                    raise ValueError("fisher='empirical' needs the caller's Fisher scores at a refresh")
                scores = fisher_scores(views)
            previous = self.masks
            self.masks, density = compute_mask(views, scores, self.keep_ratio, group)
            self.mask_step = step
            stats.update(mask_refreshed=1, mask_density=density)
            if previous is not None and previous.keys() == self.masks.keys():
                inter = sum((previous[k] & m).sum() for k, m in self.masks.items())
                union = sum((previous[k] | m).sum() for k, m in self.masks.items())
                inter, union = global_sums([torch.as_tensor(inter), torch.as_tensor(union)], group).tolist()
                stats["mask_jaccard"] = inter / union if union else 1.0
        self._pending = perturb(views, self.masks, rho=self.rho, eps=self.eps, norm=self.norm,
                                excluded_mode=self.excluded_mode, adaptive=self.adaptive, group=group, save=save)
        stats.update(grad_norm=self._pending.grad_norm, perturbation_norm=self._pending.perturbation_norm)
        return stats

    def descend(self, views: list[ShardView]) -> None:
        """After pass 2: restore the weights exactly. Safe to call when nothing is perturbed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            restore(views, pending)

    @property
    def perturbed(self) -> bool:
        return self._pending is not None

    def state_dict(self) -> dict:
        """Local (per-rank) state: mask shards and the step of the last refresh."""
        return {"mask_step": self.mask_step,
                "masks": None if self.masks is None else
                [(name, pos, m.clone()) for (name, pos), m in self.masks.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.mask_step = state["mask_step"]
        self.masks = None if state["masks"] is None else {(n, p): m for n, p, m in state["masks"]}
