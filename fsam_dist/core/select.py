"""Exact distributed top-k over scores spread across ranks (DESIGN.md §2).

``global_topk_mask`` marks the ``k`` largest scores of the concatenation of every rank's pieces,
ties broken by lower global position, i.e. the first ``k`` of a *stable descending sort* of all
scores laid out in global-position order. It never gathers scores: it is a radix select.

Algorithm. A non-negative fp32 ``x`` orders like its bit pattern read as an integer, so the k-th
largest score is found digit by digit on its bits:

1. One pass over every local score histograms its high 16 bits (a strided int16 view of the
   fp32 tensor: no copy, no shift) into 32768 local bins. These are folded into 2048 bins
   (the top 11 bits) and all-reduced; walking them from the top finds the bucket holding the
   k-th largest. The 16 local sub-bins of that bucket are all-reduced next (no pass over the
   data): the high 16 bits ``P`` of the k-th largest are now known.
2. Entries with high bits > ``P`` are in the answer (one compare pass); those equal to ``P`` are
   the only candidates. Two more rounds (8 + 8 bits) over the candidates' low 16 bits find the
   threshold ``T`` exactly, with how many entries lie above it and how many equal it.
3. If more entries equal ``T`` than are still needed, the same select runs on the tied entries'
   global positions (48 bits, four 12-bit rounds) to keep the lowest ones.

At most 2 + 2 + 4 = 8 all-reduces of at most 4096 int64 each, whatever the number of entries or
``k``; the first one also carries the invalid-input counts, so every rank raises together. Only
three light passes read all N entries (min/max, histogram, compare); everything after the first
round touches the candidates alone.
"""

from __future__ import annotations

import sys

import torch

from .comm import all_reduce

HIGH_BINS = 1 << 15
"""Local histogram bins over the high 16 bits of a non-negative fp32 (sign bit 0)."""
COARSE = 16
"""High-16-bit bins per all-reduced coarse bucket (2048 buckets = the top 11 bits)."""
LOW_DIGITS = (8, 8)
"""Rounds over the candidates' low 16 bits."""
CHUNK = 1 << 20
"""Entries per chunk in the passes over all scores (keeps temporaries in cache)."""
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

    # Invalid entries are counted locally and all-reduced with the first histogram, so that a
    # bad value on one rank makes every rank raise instead of leaving the others in a collective.
    invalid = []
    for i, f in enumerate(flat):
        bad = False
        if f.numel():
            low, high = torch.aminmax(f)
            bad = bool(low < 0) or not bool(torch.isfinite(high))
            if not bad and low == 0:
                flat[i] = f = f.abs()   # -0.0 would read as a negative integer; make it +0.0
        invalid.append(bad)
    bad_positions = sum(int(p < 0 or p + f.numel() > 2 ** POSITION_BITS) for p, f in zip(positions, flat))
    high16 = [_high_half(f) for f in flat]
    local = torch.zeros(HIGH_BINS, dtype=torch.int64)
    for h, bad in zip(high16, invalid):
        if h.numel() and not bad:
            local += _histogram(h)
    coarse = local.view(-1, COARSE).sum(1)
    reduced = all_reduce(torch.cat([coarse, torch.tensor([sum(invalid), bad_positions])]), "sum", group)
    coarse, (invalid_total, bad_positions_total) = reduced[:-2], reduced[-2:].tolist()
    if invalid_total:
        raise ValueError(f"global_topk_mask: {invalid_total} score tensor(s) across the group hold NaN, "
                         "inf or negative entries; scores must be finite and non-negative")
    if bad_positions_total:
        raise ValueError(f"global_topk_mask: global positions must lie in [0, 2**{POSITION_BITS})")
    total = int(coarse.sum())
    if k == 0 or k >= total:   # decided on reduced values, so every rank returns here together
        return [torch.full(s.shape, k > 0, dtype=torch.bool, device=s.device) for s in scores]

    bucket, needed = _walk(coarse, k)
    fine = all_reduce(local[bucket * COARSE:(bucket + 1) * COARSE].clone(), "sum", group)
    sub, needed = _walk(fine, needed)
    prefix = bucket * COARSE + sub
    masks, candidates = zip(*(_split_at(h, prefix) for h in high16)) if high16 else ((), ())
    lows = [f.view(torch.int32)[idx] & 0xFFFF for f, idx in zip(flat, candidates)]
    result = _radix_topk(lows, needed, LOW_DIGITS, group)
    tie_indices = []
    for mask, idx, above, ties in zip(masks, candidates, result.selected, result.tie_indices):
        mask[idx[above]] = True
        tie_indices.append(idx[ties])

    if result.ties_needed and result.ties_needed < result.ties_total:
        # Keep the lowest global positions among the tied entries: the k largest of
        # (2**48 - 1 - position), which are unique, so no ties remain after this select.
        tie_keys = [(2 ** POSITION_BITS - 1) - (p + idx) for p, idx in zip(positions, tie_indices)]
        tie_result = _radix_topk(tie_keys, result.ties_needed, POSITION_DIGITS, group)
        for mask, idx, chosen, last in zip(masks, tie_indices, tie_result.selected, tie_result.tie_indices):
            mask[idx[chosen]] = True
            mask[idx[last]] = True   # the k-th entry itself (positions are unique)
    elif result.ties_needed:
        for mask, idx in zip(masks, tie_indices):
            mask[idx] = True
    return [m.view(s.shape) for m, s in zip(masks, scores)]


def _high_half(f: torch.Tensor) -> torch.Tensor:
    """The high 16 bits of each fp32 as int16: a strided view, no copy (non-negative for x >= +0)."""
    halves = f.view(torch.int16)
    return halves[1::2] if sys.byteorder == "little" else halves[0::2]


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def _histogram(high: torch.Tensor) -> torch.Tensor:
    """bincount of the (strided) high halves, a cache-sized chunk at a time: copying a chunk into
    a reused contiguous buffer and counting it beats counting the strided view (2-3x at 1e8)."""
    counts = torch.zeros(HIGH_BINS, dtype=torch.int64, device=high.device)
    buffer = torch.empty(min(CHUNK, high.numel()), dtype=high.dtype, device=high.device)
    for start, end in _chunks(high.numel()):
        chunk = buffer[:end - start]
        chunk.copy_(high[start:end])
        counts += torch.bincount(chunk, minlength=HIGH_BINS)
    return counts.cpu()


def _split_at(high: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask of high > prefix, int64 indices of high == prefix), chunk by chunk so the only
    full-size allocation is the mask itself."""
    mask = torch.empty(high.numel(), dtype=torch.bool, device=high.device)
    equal = torch.empty(min(CHUNK, high.numel()), dtype=torch.bool, device=high.device)
    found = [torch.zeros(0, dtype=torch.int64, device=high.device)]
    for start, end in _chunks(high.numel()):
        torch.gt(high[start:end], prefix, out=mask[start:end])
        torch.eq(high[start:end], prefix, out=equal[:end - start])
        hits = torch.nonzero(equal[:end - start]).reshape(-1)
        if hits.numel():
            found.append(hits + start)
    return mask, torch.cat(found)


def _walk(histogram: torch.Tensor, needed: int) -> tuple[int, int]:
    """The bucket holding the ``needed``-th largest entry (count(>b) < needed <= count(>=b)), and
    how many are still needed inside it."""
    from_top = histogram.flip(0).cumsum(0)
    step = int(torch.searchsorted(from_top, torch.tensor(needed), right=False))
    return histogram.numel() - 1 - step, needed - (int(from_top[step - 1]) if step > 0 else 0)


class _RadixResult:
    """Outcome of one radix select: entries strictly above the k-th key, and the tied ones."""

    def __init__(self, selected, tie_indices, ties_needed, ties_total):
        self.selected = selected          # bool mask per piece: keys strictly above the threshold
        self.tie_indices = tie_indices    # int64 indices per piece of keys equal to the threshold
        self.ties_needed = ties_needed    # how many tied entries complete the top k (global)
        self.ties_total = ties_total      # how many entries equal the threshold (global)


def _radix_topk(keys: list[torch.Tensor], k: int, digits: tuple[int, ...], group) -> _RadixResult:
    """Radix select of the k-th largest of non-negative integer keys (``sum(digits)`` bits).

    The first round reads every key; later rounds read only the candidates left in the chosen
    bucket. One all-reduce per round.
    """
    selected = [torch.zeros(key.numel(), dtype=torch.bool, device=key.device) for key in keys]
    candidates: list[torch.Tensor | None] = [None] * len(keys)   # None: every entry of the piece
    needed, shift, ties_total = k, sum(digits), 0
    for round_index, width in enumerate(digits):
        shift -= width
        buckets = 1 << width
        piece_digits = []
        histogram = torch.zeros(buckets, dtype=torch.int64)
        for key, cand in zip(keys, candidates):
            d = ((key if cand is None else key[cand]) >> shift) & (buckets - 1)
            piece_digits.append(d)
            if d.numel():
                histogram += torch.bincount(d, minlength=buckets).cpu()
        histogram = all_reduce(histogram, "sum", group)
        if round_index == 0 and needed >= int(histogram.sum()):
            # Decided on reduced values only, so every rank leaves here together.
            empty = [torch.zeros(0, dtype=torch.int64, device=key.device) for key in keys]
            return _RadixResult([torch.ones_like(s) for s in selected], empty, 0, 0)
        bucket, needed = _walk(histogram, needed)
        for i, (d, cand) in enumerate(zip(piece_digits, candidates)):
            if cand is None:
                selected[i] |= d > bucket
                candidates[i] = torch.nonzero(d == bucket).reshape(-1)
            else:
                selected[i][cand[d > bucket]] = True
                candidates[i] = cand[d == bucket]
        ties_total = int(histogram[bucket])
    return _RadixResult(selected, candidates, needed, ties_total)
