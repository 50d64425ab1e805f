"""Exact distributed top-k over scores spread across ranks (DESIGN.md §2).

``global_topk_mask`` marks the ``k`` largest scores of the concatenation of every rank's pieces,
ties broken by lower global position, i.e. the first ``k`` of a *stable descending sort* of all
scores laid out in global-position order. It never gathers scores: it is a radix select.

Algorithm. A non-negative fp32 ``x`` orders like its bit pattern read as an integer, so the k-th
largest score is found digit by digit on the 31 bits below the sign bit:

1. Histogram the top 11 bits of every local score (one pass), all-reduce the 2048 counts, and
   walk them from the top: the bucket where the running count reaches ``k`` holds the k-th
   largest. Entries in higher buckets are in the answer; entries in that bucket are candidates.
2. Repeat on the candidates only with the next 10 bits, then the last 10: the threshold value
   ``T`` is now known exactly, with how many entries lie above it and how many equal it.
3. If more entries equal ``T`` than are still needed, run the same select on the tied entries'
   global positions (48 bits, four 12-bit rounds) to keep the lowest ones.

At most 1 + 2 + 4 = 7 all-reduces of at most 4098 int64 each, whatever the number of entries or
``k``; the first one also carries the invalid-input counts, so every rank raises together.
"""

from __future__ import annotations

import torch

from .comm import all_reduce

VALUE_DIGITS = (11, 10, 10)
"""Bits examined per round of the value select (31 bits: the sign bit of a valid score is 0)."""
POSITION_BITS = 48
"""Global positions must lie below 2**48 (2.8e14 entries)."""
POSITION_DIGITS = (12, 12, 12, 12)


def global_topk_mask(scores: list[torch.Tensor], positions: list[int], k: int,
                     group=None) -> list[torch.Tensor]:
    """Mark the ``k`` largest entries across all ranks of ``group``.

    Args:
        scores: local non-negative float tensors (any shape; read in flattened order). NaN, inf
            or negative entries on any rank raise ``ValueError`` on every rank.
        positions: ``positions[i]`` is the global position of ``scores[i]``'s first entry; entry
            ``j`` of piece ``i`` sits at ``positions[i] + j``. Pieces must not overlap globally.
        k: how many entries to select over the whole group (the same on every rank).
        group: see :mod:`fsam_dist.core.comm` (None works without torch.distributed).

    Returns:
        One bool tensor per piece, shaped like it. Exactly ``min(k, N)`` entries are True over
        the group, and they are the first ``k`` of a stable descending sort of all scores in
        global-position order.
    """
    if len(scores) != len(positions):
        raise ValueError(f"global_topk_mask: {len(scores)} score tensors but {len(positions)} positions")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"global_topk_mask: k must be a non-negative int, got {k!r}")
    if any(not torch.is_floating_point(s) for s in scores):
        raise ValueError("global_topk_mask: scores must be floating-point tensors")

    flat = [s.detach().reshape(-1).to(torch.float32) for s in scores]
    keys = [f.view(torch.int32) for f in flat]

    # Invalid entries are counted locally and all-reduced with the first histogram, so that a
    # bad value on one rank makes every rank raise instead of leaving the others in a collective.
    invalid = 0
    for f in flat:
        if f.numel():
            low, high = torch.aminmax(f)
            invalid += int(bool(low < 0) or not bool(torch.isfinite(high)))
    bad_positions = sum(int(p < 0 or p + f.numel() > 2 ** POSITION_BITS) for p, f in zip(positions, flat))
    extra = torch.tensor([invalid, bad_positions], dtype=torch.int64)

    result = _radix_topk(keys, k, VALUE_DIGITS, group, extra)
    invalid_total, bad_positions_total = (int(v) for v in result.extra)
    if invalid_total:
        raise ValueError(f"global_topk_mask: {invalid_total} score tensor(s) across the group hold NaN, "
                         "inf or negative entries; scores must be finite and non-negative")
    if bad_positions_total:
        raise ValueError(f"global_topk_mask: global positions must lie in [0, 2**{POSITION_BITS})")

    masks = result.selected
    if result.ties_needed and result.ties_needed < result.ties_total:
        # Keep the lowest global positions among the tied entries: the k largest of
        # (2**48 - 1 - position), which are unique, so no ties remain after this select.
        tie_keys = [(2 ** POSITION_BITS - 1) - (p + idx) for p, idx in zip(positions, result.tie_indices)]
        tie_result = _radix_topk(tie_keys, result.ties_needed, POSITION_DIGITS, group)
        for mask, idx, chosen, last in zip(masks, result.tie_indices, tie_result.selected,
                                           tie_result.tie_indices):
            mask[idx[chosen]] = True
            mask[idx[last]] = True   # the k-th entry itself (positions are unique)
    elif result.ties_needed:
        for mask, idx in zip(masks, result.tie_indices):
            mask[idx] = True
    return [m.view(s.shape) for m, s in zip(masks, scores)]


class _RadixResult:
    """Outcome of one radix select: entries strictly above the k-th key, and the tied ones."""

    def __init__(self, selected, tie_indices, ties_needed, ties_total, extra):
        self.selected = selected          # bool mask per piece: keys strictly above the threshold
        self.tie_indices = tie_indices    # int64 indices per piece of keys equal to the threshold
        self.ties_needed = ties_needed    # how many tied entries complete the top k (global)
        self.ties_total = ties_total      # how many entries equal the threshold (global)
        self.extra = extra                # the reduced ``extra`` counts


def _radix_topk(keys: list[torch.Tensor], k: int, digits: tuple[int, ...], group,
                extra: torch.Tensor | None = None) -> _RadixResult:
    """Radix select of the k-th largest of non-negative integer keys (``sum(digits)`` bits).

    The first round reads every key; later rounds read only the candidates left in the chosen
    bucket. One all-reduce per round; ``extra`` rides along with the first.
    """
    extra = torch.zeros(0, dtype=torch.int64) if extra is None else extra
    selected = [torch.zeros(key.numel(), dtype=torch.bool, device=key.device) for key in keys]
    candidates: list[torch.Tensor | None] = [None] * len(keys)   # None: every entry of the piece
    needed, shift = k, sum(digits)
    for round_index, width in enumerate(digits):
        shift -= width
        buckets = 1 << width
        piece_digits = []
        histogram = torch.zeros(buckets, dtype=torch.int64)
        for key, cand in zip(keys, candidates):
            sub = key if cand is None else key[cand]
            # The mask also folds -0.0 (sign bit set) into the bucket of +0.0.
            d = (sub >> shift) & (buckets - 1)
            piece_digits.append(d)
            if d.numel():
                histogram += torch.bincount(d, minlength=buckets).cpu()
        reduced = all_reduce(torch.cat([histogram, extra]) if round_index == 0 else histogram, "sum", group)
        histogram = reduced[:buckets]
        if round_index == 0:
            extra = reduced[buckets:]
            total = int(histogram.sum())
            if extra.any() or needed == 0 or needed >= total:
                # Decided on reduced values only, so every rank leaves here together.
                if needed >= total and not extra.any():
                    selected = [torch.ones_like(s) for s in selected]
                empty = [torch.zeros(0, dtype=torch.int64, device=key.device) for key in keys]
                return _RadixResult(selected, empty, 0, 0, extra)
        # Bucket b holds the k-th largest when count(>b) < needed <= count(>=b).
        from_top = histogram.flip(0).cumsum(0)
        step = int(torch.searchsorted(from_top, torch.tensor(needed), right=False))
        bucket = buckets - 1 - step
        needed -= int(from_top[step - 1]) if step > 0 else 0
        for i, (d, cand) in enumerate(zip(piece_digits, candidates)):
            if cand is None:
                selected[i] |= d > bucket
                candidates[i] = torch.nonzero(d == bucket).reshape(-1)
            else:
                selected[i][cand[d > bucket]] = True
                candidates[i] = cand[d == bucket]
        ties_total = int(histogram[bucket])
    return _RadixResult(selected, candidates, needed, ties_total, extra)
