r"""FSAM: sharpness-aware minimisation with a Fisher mask, over local shard views.

Zhong et al., "Improving Sharpness-Aware Minimization with Fisher Mask for Better Generalization
on Language Models", EMNLP Findings 2022 (arXiv 2210.05497). The algorithm, per optimizer step
:math:`t` (docs/design.md §1):

.. code-block:: text

    input: weights w, base optimizer B, radius ρ, keep ratio κ, mask interval T_m,
           perturbation interval k, norm ∈ {full, masked}, excluded ∈ {dense, none}, ε
    pass 1:  g = ∇L(w)                                   (reduced over data parallel)
    if t % k != 0:
             B.step(g)       -- a plain step (with LookSAM: g + α ‖g‖/‖g_v‖ · g_v, looksam.py)
             continue
    if no mask yet, or t is the first perturbing step at or after a multiple of T_m:
             F = fisher(g)             'batch': g²;  'empirical': Σ_i (∇ log p(y_i|x_i))²
             m = top-k(F over eligible entries),  k = round(κ · N_eligible)      (global, select.py)
    n = ‖g‖ over all trainable entries ('full')  or  ‖m ⊙ g‖ ('masked')          (one all-reduce)
    e = ρ · m ⊙ g / (n + ε)  on eligible entries
        ρ · g / (n + ε) ('dense', only where g ≠ 0) or 0 ('none') on excluded entries
        adaptive (ASAM): g ← |w|² ⊙ g in e, and n = ‖|w| ⊙ g‖
    w ← w + e                  (the exact restore data is kept: restore.py)
    pass 2:  g₂ = ∇L(w + e)
    w ← w                      (put back bit for bit, not w + e − e)
    B.step(g₂)

Refreshing the mask never cancels the step's perturbation. κ = 1 with nothing excluded is SAM;
ρ = 0 is B. Every global quantity (norms, the eligible count, the top-k) is computed from local
shards with :mod:`.comm` and :mod:`.select`, so the answer does not depend on how the parameters
are sharded. State kept per rank: the mask (:mod:`.masks`, 1/8 byte per eligible entry at
κ = 0.1) and, between the perturbation and the restore only, the restore data (:mod:`.restore`).

Functional pieces: :func:`compute_mask`, :func:`perturb`, :func:`restore`; the stateful driver:
:class:`FSAM` (:meth:`~FSAM.ascend` after pass 1, :meth:`~FSAM.descend` after pass 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .comm import communicates, global_sums
from .looksam import add_sharpness_component, sharpness_component
from .masks import Mask, with_positions
from .norms import fp64_total, grad_norm, sumsq
from .reshard import GLOBAL, place_masks, place_tensors
from .restore import SMALL, Saved, restored, save
from .select import topk_masks
from .views import ShardView, chunks

__all__ = ["FSAM", "Perturbation", "compute_mask", "count_nonfinite", "fisher_scores", "grad_norm", "perturb",
           "restore"]

NORMS = ("full", "masked")
EXCLUDED_MODES = ("dense", "none")
FISHERS = ("batch", "empirical")


def count_nonfinite(tensors: list[torch.Tensor]) -> int:
    """Local count of tensors holding a NaN or inf (reduce it before acting on it).

    One min/max pass per tensor (NaN propagates through both, an inf is one of them): ~10x faster
    on CPU than ``isfinite(t).all()``, which writes a bool per entry."""
    flags = []
    for t in tensors:
        if t.numel():
            low, high = torch.aminmax(t.detach())
            flags.append(~(torch.isfinite(low) & torch.isfinite(high)))
    return int(torch.stack(flags).sum()) if flags else 0   # one host sync, not one per tensor


def _direction(grad: torch.Tensor, weights: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """The ascent direction in fp32: g, or |w|² ⊙ g for ASAM."""
    g = grad.to(torch.float32)
    if adaptive:
        w = weights.to(torch.float32)
        return w * w * g
    return g


def _normed(grad: torch.Tensor, weights: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """What the norm is taken of: g, or |w| ⊙ g for ASAM (not |w|² ⊙ g)."""
    g = grad.to(torch.float32)
    return weights.to(torch.float32).abs() * g if adaptive else g


def fisher_scores(views: list[ShardView]) -> list[torch.Tensor]:
    """'batch' Fisher (the official code): the squared reduced gradient of each eligible view.

    (:func:`compute_mask` does not call this: it selects on the squares chunk by chunk without
    storing them. Kept for callers that want the scores.)"""
    return [view.grad.to(torch.float32).square() for view in views if view.eligible]


def compute_mask(views: list[ShardView], scores: list[torch.Tensor] | None, keep_ratio: float,
                 group=None) -> tuple[dict[tuple[str, int], Mask], float]:
    """Global top-k mask over the eligible views, ``k = round(keep_ratio · N_eligible)``.

    ``scores``: one tensor per *eligible* view, in order; None = the 'batch' Fisher g² (squared
    chunk by chunk inside the select, never stored). Returns a compact
    :class:`~fsam_dist.core.masks.Mask` per eligible view keyed by :attr:`ShardView.key`, and the
    global density k / N_eligible. Collectives: those of the select (N_eligible comes from its
    first all-reduce); none at ``keep_ratio == 1`` (every eligible entry is kept).
    """
    eligible = [v for v in views if v.eligible]
    if scores is not None and len(scores) != len(eligible):
        raise ValueError(f"compute_mask: {len(scores)} score tensors for {len(eligible)} eligible views")
    if keep_ratio >= 1:
        return {v.key: Mask.full(v.numel, v.grad.device) for v in eligible}, 1.0
    sources, square = ([v.grad for v in eligible], True) if scores is None else (scores, False)
    masks, k, n_eligible = topk_masks(sources, [v.position for v in eligible],
                                      lambda total: round(keep_ratio * total), group, square=square)
    density = k / n_eligible if n_eligible else 0.0
    return with_positions({v.key: m for v, m in zip(eligible, masks)}), density


def _as_mask(mask, numel: int) -> Mask:
    if isinstance(mask, Mask):
        if mask.numel != numel:
            raise ValueError(f"mask over {mask.numel} entries for a view of {numel}")
        return mask
    mask = mask.reshape(-1)
    if mask.numel() != numel:
        raise ValueError(f"mask over {mask.numel()} entries for a view of {numel}")
    return Mask.from_bool(mask)


def _sums_and_mask(view: ShardView, mask: Mask | None, find_nonzero: bool, adaptive: bool,
                   parts: tuple[list, list, list], full_only: bool = False) -> Mask | None:
    """One fused pass over a view: append its per-chunk fp32 partials of [Σ normed² over every
    entry, Σ normed² over the mask (eligible views), Σ direction² over the perturbed entries] to
    ``parts`` (normed: g, or |w| ⊙ g for ASAM; direction: g, or |w|² ⊙ g). Each chunk's gradient
    is read once from memory; the masked entries are gathered from it while it is in cache.

    ``find_nonzero``: an excluded view perturbed densely where g ≠ 0 -- its mask is found in the
    same pass and returned. No host sync except that ``nonzero``.

    ``full_only``: only the first sum (the other two are taken from the perturbed entries in
    :func:`perturb`, which gathers them anyway): no positions are derived here."""
    full_parts, masked_parts, direction_parts = parts
    found = [] if find_nonzero else None
    selections = mask.by_chunk() if mask is not None and not full_only else \
        ((s, e, None) for s, e in chunks(view.numel))
    for start, end, sel in selections:
        g = view.grad[start:end]
        w = view.weights[start:end] if adaptive else None
        normed = _normed(g, w, adaptive)
        full = torch.dot(normed, normed)
        full_parts.append(full)
        if find_nonzero:   # one count per chunk; positions only for a chunk that is partly zero
            flags = g != 0
            nonzero = int(flags.sum())
            if nonzero == end - start:
                sel = slice(start, end)
            elif nonzero:
                sel = torch.nonzero(flags).reshape(-1).add_(start)
            found.append(sel)
        if sel is None or full_only:
            continue
        if isinstance(sel, slice):
            inside, picked_g, picked_w = full, g, w
        else:
            # gathered from the chunk just read (in cache)
            if adaptive:
                picked_g, picked_w = view.grad.index_select(0, sel), view.weights.index_select(0, sel)
                picked = _normed(picked_g, picked_w, adaptive)
            else:
                picked = view.grad.index_select(0, sel).to(torch.float32)
            inside = torch.dot(picked, picked)
        if view.eligible:
            masked_parts.append(inside)
        if adaptive:
            d = _direction(picked_g, picked_w, adaptive)
            direction_parts.append(torch.dot(d, d))
        else:
            direction_parts.append(inside)
    return Mask.from_positions(found, view.numel, view.grad.device) if find_nonzero else mask


def _total(parts: list) -> torch.Tensor:
    """Σ of fp32 partials in fp64 (0 when there are none)."""
    return torch.stack(parts).to(torch.float64).sum() if parts else torch.zeros((), dtype=torch.float64)


GROUP = 1 << 16
"""Perturbed entries per shared buffer (a piece -- one chunk of one view -- is never split, so
a buffer may hold up to :data:`~fsam_dist.core.views.CHUNK`): few enough calls per step, and
fine enough a grain for the choice between the codec and the plain values."""

STATE_BUDGET = 1 / 8
"""FSAM's state at a perturbed step (the masks and the restore data) stays within this fraction
of a full copy of the rank's local weights wherever the exact-restore codec can make it so; the
codec is used only as far as needed for that (see :func:`perturb`)."""


@dataclass
class _Group:
    """Perturbed entries of one or more views (chunks of them), gathered into one buffer: one
    codec call and one restore decode for the lot, instead of one per view."""

    pieces: list[tuple[tuple[str, int], int, int, int]]
    """Per piece, in buffer order: (view key, chunk index in the view's mask, offset in the
    buffer, entries)."""
    saved: Saved
    """The restore data of the whole buffer."""


@dataclass
class Perturbation:
    """What :func:`perturb` changed, so :func:`restore` can undo it exactly."""

    masks: dict[tuple[str, int], Mask] = field(default_factory=dict)
    """Per perturbed view: the mask of perturbed entries (its chunks' positions are derived again
    at the restore, as in the perturbation: nothing position-sized is kept)."""
    groups: list[_Group] = field(default_factory=list)
    """The perturbed entries in groups of at most :data:`~fsam_dist.core.views.CHUNK`, each with
    its restore data."""
    grad_norm: float = 0.0
    """‖g‖ over all trainable entries (the full norm, whatever ``norm`` is)."""
    perturbation_norm: float = 0.0
    """‖e‖."""
    extra: list[float] = field(default_factory=list)
    """The ``extra_sums`` given to :func:`perturb`, reduced in the same all-reduce."""
    entries: int = 0
    """Local entries perturbed (those the restore data covers)."""

    @property
    def nbytes(self) -> int:
        """Bytes held to restore the weights (excluding the masks, which FSAM keeps anyway)."""
        return sum(g.saved.nbytes for g in self.groups)

    def saved_of(self, key: tuple[str, int]) -> list[Saved]:
        """The restore data of the groups holding entries of view ``key`` (for tests and reports)."""
        return [g.saved for g in self.groups if any(piece[0] == key for piece in g.pieces)]


def _gather(pieces: list, total: int, source, dtype: torch.dtype) -> torch.Tensor:
    """The selected entries of each piece's ``source(view)`` side by side in one buffer (a
    single piece: its slice as a view, or one ``index_select``)."""
    if len(pieces) == 1:
        view, _, sel, _, _ = pieces[0]
        return source(view)[sel] if isinstance(sel, slice) else source(view).index_select(0, sel)
    out = torch.empty(total, dtype=dtype, device=source(pieces[0][0]).device)
    for view, _, sel, a, n in pieces:
        if isinstance(sel, slice):
            out[a:a + n].copy_(source(view)[sel])
        else:
            torch.index_select(source(view), 0, sel, out=out[a:a + n])
    return out


def _scatter(pieces: list, values: torch.Tensor) -> None:
    """Write ``values`` (the buffer of :func:`_gather`) back into each piece's weights."""
    for view, _, sel, a, n in pieces:
        if isinstance(sel, slice):
            view.weights[sel].copy_(values[a:a + n])
        else:
            # scatter_ with distinct positions: the same writes as index_copy_, ~2x faster on a CPU
            view.weights.scatter_(0, sel, values[a:a + n])


def _perturb_group(pieces: list, total: int, scale: float, adaptive: bool, encode: bool,
                   parts: tuple[list, list] | None = None) -> _Group:
    """w ← w + e on a group of pieces ``(view, chunk, sel, offset, entries)``: gather, one
    elementwise pass and (``encode``) one codec call over the buffer, scatter. Without
    ``encode`` the gathered originals are kept as they are (no codec work, no read-back).
    ``parts``: append the group's fp32 partials of [Σ normed² (eligible views only), Σ direction²]."""
    first = pieces[0][0]
    dense = len(pieces) == 1 and isinstance(pieces[0][2], slice)   # one dense range: in place
    original = _gather(pieces, total, lambda v: v.weights, first.weights.dtype)
    if dense:
        original = original.clone()   # a slice is a view of the weights: keep the values
    grad = _gather(pieces, total, lambda v: v.grad, first.grad.dtype)
    direction = _direction(grad, original, adaptive)
    if parts is not None:
        normed = _normed(grad, original, adaptive)
        inside = torch.dot(normed, normed)
        if first.eligible:
            parts[0].append(inside)
        parts[1].append(torch.dot(direction, direction) if adaptive else inside)
    e = (direction * scale).to(original.dtype)
    if dense:
        new = first.weights[pieces[0][2]]
        new.add_(e)
    else:
        new = original + e
        _scatter(pieces, new)
    return _Group([(view.key, c, a, n) for view, c, _, a, n in pieces],
                  save(original, new) if encode else Saved(values=original))


def perturb(views: list[ShardView], masks: dict, *, rho: float, eps: float, norm: str,
            excluded_mode: str, adaptive: bool, group=None,
            extra_sums: list[torch.Tensor] | tuple = (), state_budget: float = STATE_BUDGET) -> Perturbation:
    """Add e to each view's weights in place (docs/design.md §1) and return what restores them.

    ``masks``: per eligible view (keyed by :attr:`ShardView.key`), a :class:`Mask` or a bool tensor.
    One all-reduce of fp64 sums: ‖g‖² (or ‖|w|⊙g‖² for ASAM) over all trainable entries, the
    same over the masked entries, the squared norm of the perturbed direction, and
    ``extra_sums`` (local partials another caller wants reduced; returned in ``.extra``).
    ``state_budget``: the restore data is encoded (:mod:`.restore`) only as far as needed to keep
    it and the masks within this fraction of a full copy of the local weights, the rest kept as
    plain values (0: encode everything).
    The perturbed entries of many views are gathered into shared buffers of at most
    :data:`~fsam_dist.core.views.CHUNK` entries (eligible and excluded views apart, per dtype):
    the arithmetic and the restore codec run once per buffer, not once per view. No temporary
    larger than :data:`~fsam_dist.core.views.CHUNK` entries.
    """
    plan = []   # (view, mask of the entries perturbed)
    parts = ([], [], [])   # per-chunk fp32 partials: ‖normed‖² full, over the mask, ‖direction‖² perturbed
    # Nothing to communicate and the full norm: only ‖g‖ is needed before the perturbation; the
    # sums over the masked / perturbed entries (for ‖e‖) are taken from the entries the
    # perturbation gathers anyway, so the norm pass derives no positions (one host sync more,
    # after the loop). A communicating group reduces all of them in the one all-reduce.
    later = norm == "full" and not communicates(group)
    for view in views:
        mask, find = None, False
        if view.eligible:
            mask = _as_mask(masks[view.key], view.numel)
        elif excluded_mode == "dense":
            # Dense, but only where g != 0 (e is 0 elsewhere): an embedding's rows not in the
            # batch are neither touched nor saved. Small parameters are not worth the scan.
            if view.numel <= SMALL:
                mask = Mask.full(view.numel, view.weights.device)
            else:
                find = True
        mask = _sums_and_mask(view, mask, find, adaptive, parts, full_only=later)
        if mask is not None and mask.kind != "none":
            plan.append((view, mask))
    device = views[0].grad.device if views else torch.device("cpu")
    full_sumsq, masked_sumsq, perturbed_sumsq = (_total(p).to(device) for p in parts)
    sums = global_sums([full_sumsq, masked_sumsq, perturbed_sumsq, *extra_sums], group).tolist()
    full, masked, perturbed = sums[:3]
    n = math.sqrt(full if norm == "full" else masked)
    scale = rho / (n + eps)
    result = Perturbation(grad_norm=math.sqrt(full), perturbation_norm=scale * math.sqrt(perturbed),
                          extra=sums[3:])
    later_parts = ([], []) if later else None
    streams: dict = {}   # views whose entries may share a buffer; excluded ones first (see below)
    for view, mask in sorted(plan, key=lambda item: item[0].eligible):
        kind = (view.eligible, view.weights.dtype, view.grad.dtype, view.weights.device)
        streams.setdefault(kind, []).append((view, mask))
    # The restore data: the codec where it is needed to keep FSAM's state (the masks and this)
    # within STATE_BUDGET of a full copy of the local weights, the plain values elsewhere (no
    # codec work, nothing to read back at the restore). Groups are encoded in order until the
    # rest fits as values; the densely perturbed excluded views come first (the codec saves
    # ~3 of their 4 bytes, against ~2 of a masked entry's).
    local = sum(v.numel * v.weights.element_size() for v in views)
    budget = state_budget * local - sum(m.nbytes for v, m in plan if v.eligible)
    rest = sum(m.count * v.weights.element_size() for v, m in plan)   # bytes of the rest as values
    spent = 0

    def flush(pieces: list, total: int) -> None:
        nonlocal spent, rest
        rest -= total * pieces[0][0].weights.element_size()
        group = _perturb_group(pieces, total, scale, adaptive, encode=spent + rest + total *
                               pieces[0][0].weights.element_size() > budget, parts=later_parts)
        spent += group.saved.nbytes
        result.groups.append(group)

    with torch.no_grad():
        for members in streams.values():
            pieces, total = [], 0
            for view, mask in members:
                result.masks[view.key] = mask
                result.entries += mask.count
                for c, (_, _, sel) in enumerate(mask.by_chunk()):
                    if sel is None:
                        continue
                    count = sel.stop - sel.start if isinstance(sel, slice) else sel.numel()
                    if pieces and total + count > GROUP:
                        flush(pieces, total)
                        pieces, total = [], 0
                    pieces.append((view, c, sel, total, count))
                    total += count
            if pieces:
                flush(pieces, total)
    if later:
        result.perturbation_norm = scale * math.sqrt(float(_total(later_parts[1])))
    return result


def restore(views: list[ShardView], perturbation: Perturbation) -> None:
    """Put back the exact values :func:`perturb` saved (no w + e − e rounding): per group, the
    perturbed entries gathered again, decoded once, scattered back. Reads each view's ``key``
    and ``weights`` only (callers may pass views whose gradients are gone)."""
    by_key = {v.key: v for v in views}
    with torch.no_grad():
        for group in perturbation.groups:
            pieces, total = [], 0
            for key, c, a, n in group.pieces:
                sel = perturbation.masks[key].selection(c)
                count = 0 if sel is None else sel.stop - sel.start if isinstance(sel, slice) else sel.numel()
                if count != n or a != total:
                    raise RuntimeError(f"restore: {key} chunk {c} has {count} perturbed entries, {n} were saved")
                pieces.append((by_key[key], c, sel, a, n))
                total += n
            saved = group.saved
            if saved.values is not None:   # kept whole: nothing to read back
                values = saved.values
            else:
                values = restored(_gather(pieces, total, lambda v: v.weights, pieces[0][0].weights.dtype), saved)
            _scatter(pieces, values)


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
        interval: perturb (two passes) at optimizer steps ``t % interval == 0`` only; the other
            steps are plain base-optimizer steps (Composer SAM's ``interval``). The mask is
            refreshed at the first perturbing step at or after each multiple of ``mask_interval``
            (the refresh schedule counts optimizer steps, not perturbing steps).
        reuse_direction: with ``interval`` > 1, LookSAM (Liu et al., CVPR 2022): after each
            perturbed step keep g_v, the part of the perturbed gradient orthogonal to g
            (:func:`sharpness_component`), and on the plain steps between use
            g + α · ‖g‖/‖g_v‖ · g_v (:func:`add_sharpness_component`). Costs one
            gradient-sized buffer per rank (g during pass 2, then g_v).
        reuse_alpha: LookSAM's α (≥ 0; the paper uses 0.7), or None (default): α = ‖g_v‖/‖g‖
            as measured at the last perturbed step, so the reused part keeps the size it had.
            LookSAM's fixed α rescales g_v to α‖g‖, which is far more than FSAM's masked
            perturbation adds (‖g_v‖/‖g‖ is ~0.01-0.05 in the demo, logged as
            ``sharpness_ratio``).

    Call :meth:`ascend` after pass 1 and :meth:`descend` after pass 2 (before the base step);
    :meth:`perturbs_at` says whether a step has the two passes at all. With ``reuse_direction``,
    also :meth:`look` after a finite pass 2 and :meth:`reuse` after pass 1 of a plain step.
    """

    def __init__(self, *, rho: float = 0.05, keep_ratio: float = 0.1, mask_interval: int = 100,
                 fisher: str = "batch", norm: str = "full", excluded_mode: str = "dense",
                 adaptive: bool = False, eps: float = 1e-12, interval: int = 1,
                 reuse_direction: bool = False, reuse_alpha: float | None = None) -> None:
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"Invalid rho: {rho!r} (must be a finite number >= 0)")
        if not (isinstance(keep_ratio, (int, float)) and 0 < keep_ratio <= 1):
            raise ValueError(f"Invalid keep_ratio: {keep_ratio!r} (must be in (0, 1])")
        if isinstance(mask_interval, bool) or not isinstance(mask_interval, int) or mask_interval < 1:
            raise ValueError(f"Invalid mask_interval: {mask_interval!r} (must be an int >= 1)")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"Invalid interval: {interval!r} (must be an int >= 1)")
        if fisher not in FISHERS:
            raise ValueError(f"Invalid fisher: {fisher!r} (one of {FISHERS})")
        if norm not in NORMS:
            raise ValueError(f"Invalid norm: {norm!r} (one of {NORMS})")
        if excluded_mode not in EXCLUDED_MODES:
            raise ValueError(f"Invalid excluded_mode: {excluded_mode!r} (one of {EXCLUDED_MODES})")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"Invalid eps: {eps!r} (must be > 0)")
        if reuse_direction and interval == 1:
            raise ValueError("reuse_direction needs interval > 1 (with interval 1 every step is perturbed)")
        if reuse_alpha is not None and not (isinstance(reuse_alpha, (int, float)) and math.isfinite(reuse_alpha)
                                            and reuse_alpha >= 0):
            raise ValueError(f"Invalid reuse_alpha: {reuse_alpha!r} (must be None or a finite number >= 0)")
        self.rho, self.keep_ratio, self.mask_interval = float(rho), float(keep_ratio), mask_interval
        self.fisher, self.norm, self.excluded_mode = fisher, norm, excluded_mode
        self.adaptive, self.eps, self.interval = bool(adaptive), float(eps), interval
        self.reuse_direction = bool(reuse_direction)
        self.reuse_alpha = None if reuse_alpha is None else float(reuse_alpha)
        self._first: dict[tuple[str, int], torch.Tensor] | None = None       # g, kept through pass 2
        self._component: dict[tuple[str, int], torch.Tensor] | None = None   # LookSAM's g_v
        self._component_sumsq = 0.0                                           # this rank's Σ g_v²
        self._look_grad_norm = 0.0                                            # ‖g‖ when g_v was kept
        self._masks: dict[tuple[str, int], Mask] | None = None
        self.mask_step: int | None = None
        self._pending: Perturbation | None = None
        self._unplaced: dict | None = None   # a global state (reshard.py) loaded, cut at the first step

    # ---- the mask --------------------------------------------------------------------------

    @property
    def masks(self) -> dict[tuple[str, int], torch.Tensor] | None:
        """The current mask as bool tensors per eligible view, keyed by (name, position) --
        unpacked on every access (FSAM itself keeps :attr:`packed_masks`)."""
        return None if self._masks is None else {key: m.to_bool() for key, m in self._masks.items()}

    @property
    def packed_masks(self) -> dict[tuple[str, int], Mask] | None:
        """The current mask as stored (:class:`~fsam_dist.core.masks.Mask` per eligible view)."""
        return self._masks

    def state_nbytes(self) -> dict[str, int]:
        """Bytes FSAM holds on this rank now: the mask, and the restore data of a pending
        perturbation (between :meth:`ascend` and :meth:`descend`), with how many entries that
        perturbation touched; with ``reuse_direction``, LookSAM's gradient-sized buffers."""
        mask = sum(m.nbytes for m in self._masks.values()) if self._masks else 0
        saved = self._pending.nbytes if self._pending is not None else 0
        entries = self._pending.entries if self._pending is not None else 0
        reuse = sum(t.numel() * t.element_size() for kept in (self._first, self._component) if kept
                    for t in kept.values())
        return {"mask": mask, "restore": saved, "reuse": reuse, "total": mask + saved + reuse,
                "perturbed_entries": entries}

    # ---- schedule --------------------------------------------------------------------------

    def perturbs_at(self, step: int) -> bool:
        """Whether optimizer step ``step`` is a two-pass (perturbed) step."""
        return step % self.interval == 0

    def refresh_due(self, step: int) -> bool:
        """Whether the mask is (re)computed at (perturbing) optimizer step ``step``: no mask yet,
        or ``step`` is the first perturbing step at or after a multiple ``m`` of ``mask_interval``
        and the mask was not refreshed since ``m``. With ``interval`` 1: ``step % mask_interval == 0``."""
        if self._masks is None and (self._unplaced is None or self._unplaced["masks"] is None):
            return True
        latest = step - step % self.mask_interval
        if step - latest >= self.interval:
            return False
        return self.mask_step is None or not latest <= self.mask_step <= step

    # ---- the two halves of a perturbed step ------------------------------------------------

    def ascend(self, views: list[ShardView], step: int, group=None,
               scores: list[torch.Tensor] | None = None) -> dict:
        """After pass 1 (gradients known to be finite): refresh the mask if due, perturb in place.

        ``scores``: the 'empirical' Fisher, one tensor per eligible view (required then).
        Returns statistics for logging.
        """
        if self._pending is not None:
            raise RuntimeError("FSAM.ascend called twice without descend: weights are still perturbed")
        self._place(views)
        if self.reuse_direction:
            # The old g_v is not used by a perturbed step and look() replaces it: free it before
            # copying g, so LookSAM holds one gradient-sized buffer at any time. (If pass 2 turns
            # out non-finite, the plain steps up to the next perturbed one get no g_v.)
            self._component, self._component_sumsq = None, 0.0
            self._first = {v.key: v.grad.detach().clone() for v in views}
        stats: dict = {}
        extra = []
        if self.refresh_due(step):
            if scores is None and self.fisher == "empirical":
                raise ValueError("fisher='empirical' needs the caller's Fisher scores at a refresh")
            previous = self._masks
            self._masks, density = compute_mask(views, scores, self.keep_ratio, group)
            self.mask_step = step
            stats.update(mask_refreshed=1, mask_density=density)
            if previous is not None:
                # Jaccard overlap with the previous mask, reduced in the perturbation's all-reduce.
                inter = sum(m.intersection(previous[key]) for key, m in self._masks.items()
                            if key in previous and previous[key].numel == m.numel)
                union = sum(m.count for m in self._masks.values()) + sum(m.count for m in previous.values()) - inter
                extra = [torch.tensor(float(inter)), torch.tensor(float(union))]
        self._pending = perturb(views, self._masks, rho=self.rho, eps=self.eps, norm=self.norm,
                                excluded_mode=self.excluded_mode, adaptive=self.adaptive, group=group,
                                extra_sums=extra)
        if extra:
            inter, union = self._pending.extra
            stats["mask_jaccard"] = inter / union if union else 1.0
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

    # ---- LookSAM (reuse_direction) ---------------------------------------------------------

    def look(self, views: list[ShardView], group=None) -> dict:
        """After a finite pass 2 (views hold g_s): keep g_v for the plain steps that follow.
        Returns ``sharpness_ratio`` = ‖g_v‖/‖g‖ for logging."""
        if self._first is None:
            raise RuntimeError("FSAM.look: no pass-1 gradient kept (needs reuse_direction and ascend first)")
        first, self._first = self._first, None
        self._component_sumsq, self._look_grad_norm, ratio = sharpness_component(views, first, group)
        self._component = first
        return {"sharpness_ratio": ratio}

    def reuse(self, views: list[ShardView], group=None) -> dict:
        """After pass 1 of a plain step: add the kept g_v, scaled, to the gradient (in place).
        A plain step until the first :meth:`look`."""
        self._place(views)
        if self._component is None:
            return {}
        return {**add_sharpness_component(views, self._component, self._component_sumsq, self.reuse_alpha,
                                          self._look_grad_norm, group),
                "reused_direction": 1}

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Local (per-rank) state: compact mask shards, the step of the last refresh and, with
        ``reuse_direction``, LookSAM's g_v shards (plain data: ``torch.load(..., weights_only=True)`` reads it).

        Every shard is listed as ``(name, global position, value)`` (:mod:`.reshard`): the states
        of all ranks, merged with :func:`~fsam_dist.core.reshard.merge_states`, load at any world
        size. A global state loaded but not yet cut (no step since) is returned as it was loaded."""
        if self._unplaced is not None:
            return self._unplaced
        state = {"mask_step": self.mask_step,
                 "masks": None if self._masks is None else
                 [(name, pos, m.state()) for (name, pos), m in self._masks.items()]}
        if self._component is not None:
            state["reuse"] = {"sumsq": self._component_sumsq, "look_grad_norm": self._look_grad_norm,
                              "component": [(name, pos, t) for (name, pos), t in self._component.items()]}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` output: this rank's own state (same world size and layout), or a
        global state (:func:`~fsam_dist.core.reshard.merge_states` of every rank's), which is cut
        for this rank's views at the next :meth:`ascend` / :meth:`reuse` (until then
        :attr:`masks` is None, though :meth:`refresh_due` knows a mask exists)."""
        self.mask_step = state["mask_step"]
        if state.get("layout") == GLOBAL:
            self._unplaced = state
            self._masks, self._component, self._component_sumsq, self._look_grad_norm = None, None, 0.0, 0.0
            return
        self._unplaced = None
        self._masks = None if state["masks"] is None else \
            with_positions({(n, p): Mask.from_state(m) for n, p, m in state["masks"]})
        reuse = state.get("reuse")
        self._component = None if reuse is None else {(n, p): t for n, p, t in reuse["component"]}
        self._component_sumsq = 0.0 if reuse is None else float(reuse["sumsq"])
        self._look_grad_norm = 0.0 if reuse is None else float(reuse["look_grad_norm"])

    def _place(self, views: list[ShardView]) -> None:
        """Cut a loaded global state for this rank's ``views`` (no collectives). This rank's
        Σ g_v² is summed again from its slices, chunk by chunk as :func:`sharpness_component` does."""
        if self._unplaced is None:
            return
        state, self._unplaced = self._unplaced, None
        self._masks = None if state["masks"] is None else with_positions(place_masks(state["masks"], views))
        reuse = state.get("reuse")
        if reuse is not None:
            self._component = place_tensors(reuse["component"], views)
            self._look_grad_norm = float(reuse["look_grad_norm"])
            # the same per-chunk partials and the same sum as sharpness_component (same layout: same bits)
            self._component_sumsq = fp64_total([sumsq(self._component[view.key][start:end])
                                                for view in views for start, end in chunks(view.numel)])
