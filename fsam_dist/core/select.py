"""Exact distributed top-k over scores spread across ranks (docs/design.md §2).

``global_topk_mask`` marks the ``k`` largest scores of the concatenation of every rank's pieces,
ties broken by lower global position, i.e. the first ``k`` of a *stable descending sort* of all
scores laid out in global-position order. It never gathers scores: it is a radix select.

Algorithm. A non-negative fp32 ``x`` orders like its bit pattern read as an integer, so the k-th
largest score is found digit by digit on its bits:

1. One pass over every local score, a chunk at a time, checks it (an int32 min/max of the bit
   patterns: a set sign bit or an exponent of all ones is a negative, -0.0, inf or NaN) and
   histograms its high 16 bits into 32768 local bins. These are folded into 2048 bins (the top 11
   bits) and all-reduced; walking them from the top finds the bucket holding the k-th largest.
   The 16 local sub-bins of that bucket are all-reduced next (no pass over the data): the high 16
   bits ``P`` of the k-th largest are now known.
2. One compare pass on the int32 bit patterns: entries ``>= (P+1) << 16`` are in the answer,
   entries in ``[P << 16, (P+1) << 16)`` are the only candidates (found 64 flags at a time).
   Two more rounds (8 + 8 bits) over the candidates' low 16 bits find the threshold ``T``
   exactly, with how many entries lie above it and how many equal it.
3. If more entries equal ``T`` than are still needed, the same select runs on the tied entries'
   global positions (48 bits, four 12-bit rounds) to keep the lowest ones.

Exactly 2 + 2 all-reduces (2050, 16, 256 and 256 int64), plus 4 of 4096 int64 only when more
entries tie at the threshold than are needed -- whatever the number of entries, ranks or ``k``
(except ``k = 0`` or ``k >= N``: 1); the first one also carries the invalid-input counts, so every
rank raises together. Only
two light passes read all N entries (check + histogram, compare); everything after the first
round touches the candidates alone. Every full pass works on :data:`CHUNK` entries at a time, so
the only full-size allocation is the result (1 byte per entry, or 1 bit with ``packed=True``).

``square=True`` selects by the squares of the given tensors (FSAM's 'batch' Fisher, g²) without
materialising them: each chunk is squared in fp32 as it is read, bit-identical to squaring first.
``k`` may be a function of the global entry count (``k = round(κ · N)``), computed from the first
all-reduce instead of counting N with one of its own.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from .comm import all_reduce
from .masks import Mask, pack_bits, popcount
from .views import CHUNK, chunks

HIGH_BINS = 1 << 15
"""Local histogram bins over the high 16 bits of a non-negative fp32 (sign bit 0)."""
COARSE = 16
"""High-16-bit bins per all-reduced coarse bucket (2048 buckets = the top 11 bits)."""
LOW_DIGITS = (8, 8)
"""Rounds over the candidates' low 16 bits."""
POSITION_BITS = 48
"""Global positions must lie below 2**48 (2.8e14 entries)."""
POSITION_DIGITS = (12, 12, 12, 12)
_EXPONENT_ALL_ONES = 0x7F800000
"""Bit patterns at or above this (sign bit clear) are inf or NaN."""


def global_topk_mask(scores: list[torch.Tensor], positions: list[int], k: int | Callable[[int], int],
                     group=None, *, square: bool = False) -> list[torch.Tensor]:
    """Mark the ``k`` largest entries across all ranks of ``group``.

    Args:
        scores: local non-negative float tensors (any shape; read in flattened order). NaN, inf
            or negative entries on any rank raise ``ValueError`` on every rank.
        positions: ``positions[i]`` is the global position of ``scores[i]``'s first entry; entry
            ``j`` of piece ``i`` sits at ``positions[i] + j``. Pieces must not overlap globally.
        k: how many entries to select over the whole group (the same on every rank), or a
            function of the global number of entries returning it.
        group: see :mod:`fsam_dist.core.comm` (None works without torch.distributed).
        square: select by ``scores ** 2`` (in fp32) instead; the squares are never stored.

    Returns:
        One bool tensor per piece, shaped like it. Exactly ``min(k, N)`` entries are True over
        the group, and they are the first ``k`` of a stable descending sort of all scores in
        global-position order.
    """
    return _select(scores, positions, k, group, square, packed=False)[0]


def topk_masks(scores: list[torch.Tensor], positions: list[int], k: int | Callable[[int], int], group=None, *,
               square: bool = False) -> tuple[list[Mask], int, int]:
    """:func:`global_topk_mask` with compact results: one :class:`~fsam_dist.core.masks.Mask` per
    piece (bit-packed while it is built, never a full bool tensor), the global ``k`` used and the
    global number of entries."""
    return _select(scores, positions, k, group, square, packed=True)


class _Piece:
    """One local score tensor, read a chunk at a time as contiguous non-negative fp32."""

    def __init__(self, tensor: torch.Tensor, square: bool) -> None:
        self.src = tensor.detach().reshape(-1)
        self.numel = self.src.numel()
        self.square = square
        self.abs = False   # set when the piece holds -0.0 (read through abs from then on)

    def read(self, start: int, end: int, buffer: torch.Tensor) -> torch.Tensor:
        x = self.src[start:end]
        if not (self.square or self.abs or x.dtype != torch.float32):
            return x
        out = buffer[:end - start]
        if self.square and x.dtype == torch.float32:
            torch.mul(x, x, out=out)
        else:
            out.copy_(x)
            if self.square:
                out.mul_(out)
            elif self.abs:
                out.abs_()
        return out

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        x = self.src[index].to(torch.float32)
        return x * x if self.square else (x.abs() if self.abs else x)


def _high_half(f: torch.Tensor) -> torch.Tensor:
    """The high 16 bits of each fp32 as int16: a strided view, no copy (non-negative for x >= +0)."""
    halves = f.view(torch.int16)
    return halves[1::2] if sys.byteorder == "little" else halves[0::2]


class _Buffers:
    """Chunk-sized scratch tensors, reused across pieces."""

    def __init__(self, device) -> None:
        self.device = device
        self.f32 = self.i16 = self.flags = self.above = None

    def get(self, name: str, dtype) -> torch.Tensor:
        t = getattr(self, name)
        if t is None:
            t = torch.empty(CHUNK, dtype=dtype, device=self.device)
            setattr(self, name, t)
        return t


def _check_and_histogram(piece: _Piece, counts: torch.Tensor, bufs: _Buffers) -> bool:
    """Add the piece's high-16-bit histogram to ``counts``; False if it holds an invalid score."""
    for start, end in chunks(piece.numel):
        x = piece.read(start, end, bufs.get("f32", torch.float32))
        low, high = (int(v) for v in torch.aminmax(x.view(torch.int32)))
        if low < 0:   # a sign bit: a negative, -0.0 or a negative NaN
            if bool((x < 0).any()) or not bool(torch.isfinite(x).all()):
                return False
            piece.abs = True   # only -0.0: read it as +0.0 (earlier chunks had no sign bits)
            x = piece.read(start, end, bufs.get("f32", torch.float32))
            high = int(x.view(torch.int32).max())
        if high >= _EXPONENT_ALL_ONES:
            return False
        chunk = bufs.get("i16", torch.int16)[:end - start]
        chunk.copy_(_high_half(x))
        counts += torch.bincount(chunk, minlength=HIGH_BINS).to(counts.device)
    return True


_EIGHT = {}


def _set_flags(flags: torch.Tensor) -> torch.Tensor:
    """int64 indices of the True entries of a bool chunk, skipping 8 all-False flags at a time."""
    n = flags.numel()
    if n % 8 or flags.storage_offset() % 8:
        return torch.nonzero(flags).reshape(-1)
    words = torch.nonzero(flags.view(torch.int64)).reshape(-1)
    if not words.numel():
        return words
    eight = _EIGHT.setdefault(flags.device, torch.arange(8, device=flags.device))
    idx = (words.unsqueeze(1) * 8 + eight).reshape(-1)
    return idx[flags[idx]]


class _BoolSink:
    """Results as bool tensors, written in place."""

    def __init__(self, pieces: list[_Piece]) -> None:
        self.masks = [torch.empty(p.numel, dtype=torch.bool, device=p.src.device) for p in pieces]

    def above(self, i: int, start: int, end: int, bufs: _Buffers) -> torch.Tensor:
        return self.masks[i][start:end]

    def store(self, i: int, start: int, end: int, chunk: torch.Tensor) -> None:
        pass   # already in place

    def mark(self, i: int, index: torch.Tensor) -> None:
        self.masks[i][index] = True

    def results(self, scores, total: int):
        return [m.view(s.shape) for m, s in zip(self.masks, scores)]


class _PackedSink:
    """Results bit-packed as they are produced; each entry is set at most once."""

    def __init__(self, pieces: list[_Piece]) -> None:
        self.packed = [torch.zeros(-(-p.numel // 8), dtype=torch.uint8, device=p.src.device) for p in pieces]
        self.numel = [p.numel for p in pieces]

    def above(self, i: int, start: int, end: int, bufs: _Buffers) -> torch.Tensor:
        return bufs.get("above", torch.bool)[:end - start]

    def store(self, i: int, start: int, end: int, chunk: torch.Tensor) -> None:
        self.packed[i][start // 8:-(-end // 8)] = pack_bits(chunk)

    def mark(self, i: int, index: torch.Tensor) -> None:
        if index.numel():
            # The bits are still clear and distinct per entry, so adding them is OR-ing them.
            bits = torch.bitwise_left_shift(torch.ones_like(index), index & 7).to(torch.uint8)
            self.packed[i].index_put_((index >> 3,), bits, accumulate=True)

    def results(self, scores, total: int):
        return [Mask.from_bits(p, n, popcount(p)) for p, n in zip(self.packed, self.numel)]


def _select(scores, positions, k, group, square: bool, packed: bool):
    if len(scores) != len(positions):
        raise ValueError(f"global_topk_mask: {len(scores)} score tensors but {len(positions)} positions")
    if not callable(k) and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ValueError(f"global_topk_mask: k must be a non-negative int, got {k!r}")
    if any(not torch.is_floating_point(s) for s in scores):
        raise ValueError("global_topk_mask: scores must be floating-point tensors")

    pieces = [_Piece(s, square) for s in scores]
    device = pieces[0].src.device if pieces else torch.device("cpu")
    bufs = _Buffers(device)

    # Round 1: check + histogram. Invalid entries are counted and all-reduced with the first
    # histogram, so a bad value on one rank makes every rank raise instead of leaving the others
    # in a collective.
    local = torch.zeros(HIGH_BINS, dtype=torch.int64)
    invalid = sum(int(not _check_and_histogram(p, local, bufs)) for p in pieces)
    bad_positions = sum(int(pos < 0 or pos + p.numel > 2 ** POSITION_BITS) for pos, p in zip(positions, pieces))
    coarse = local.view(-1, COARSE).sum(1)
    reduced = all_reduce(torch.cat([coarse, torch.tensor([invalid, bad_positions])]), "sum", group)
    coarse, (invalid_total, bad_positions_total) = reduced[:-2], reduced[-2:].tolist()
    if invalid_total:
        raise ValueError(f"global_topk_mask: {invalid_total} score tensor(s) across the group hold NaN, "
                         "inf or negative entries; scores must be finite and non-negative")
    if bad_positions_total:
        raise ValueError(f"global_topk_mask: global positions must lie in [0, 2**{POSITION_BITS})")
    total = int(coarse.sum())
    if callable(k):
        k = k(total)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"global_topk_mask: k(total) must be a non-negative int, got {k!r}")
    if k == 0 or k >= total:   # decided on reduced values, so every rank returns here together
        if packed:
            return [Mask.full(p.numel, device) if k > 0 else Mask.empty(p.numel, device) for p in pieces], k, total
        return [torch.full(s.shape, k > 0, dtype=torch.bool, device=s.device) for s in scores], k, total

    bucket, needed = _walk(coarse, k)
    fine = all_reduce(local[bucket * COARSE:(bucket + 1) * COARSE].clone(), "sum", group)
    sub, needed = _walk(fine, needed)
    prefix = bucket * COARSE + sub

    # Round 2: one compare pass on the bit patterns.
    sink = _PackedSink(pieces) if packed else _BoolSink(pieces)
    candidates = [_split_at(i, p, prefix, sink, bufs) for i, p in enumerate(pieces)]
    lows = [p.gather(idx).view(torch.int32) & 0xFFFF for p, idx in zip(pieces, candidates)]
    result = _radix_topk(lows, needed, LOW_DIGITS, group)
    tie_indices = []
    for i, (idx, above, ties) in enumerate(zip(candidates, result.selected, result.tie_indices)):
        sink.mark(i, idx[above])
        tie_indices.append(idx[ties])

    if result.ties_needed and result.ties_needed < result.ties_total:
        # Keep the lowest global positions among the tied entries: the k largest of
        # (2**48 - 1 - position), which are unique, so no ties remain after this select.
        tie_keys = [(2 ** POSITION_BITS - 1) - (p + idx) for p, idx in zip(positions, tie_indices)]
        tie_result = _radix_topk(tie_keys, result.ties_needed, POSITION_DIGITS, group)
        for i, (idx, chosen, last) in enumerate(zip(tie_indices, tie_result.selected, tie_result.tie_indices)):
            sink.mark(i, torch.cat([idx[chosen], idx[last]]))   # ... and the k-th entry itself
    elif result.ties_needed:
        for i, idx in enumerate(tie_indices):
            sink.mark(i, idx)
    return sink.results(scores, total), k, total


def _split_at(i: int, piece: _Piece, prefix: int, sink, bufs: _Buffers) -> torch.Tensor:
    """Mark the piece's entries whose high 16 bits exceed ``prefix`` (into ``sink``) and return the
    int64 indices of those equal to it, chunk by chunk (two int32 compares per entry)."""
    low, high = prefix << 16, (prefix + 1) << 16
    found = [torch.zeros(0, dtype=torch.int64, device=piece.src.device)]
    for start, end in chunks(piece.numel):
        bits = piece.read(start, end, bufs.get("f32", torch.float32)).view(torch.int32)
        above = sink.above(i, start, end, bufs)
        torch.ge(bits, high, out=above)
        at_least = bufs.get("flags", torch.bool)[:end - start]
        torch.ge(bits, low, out=at_least)
        at_least.bitwise_xor_(above)   # [low, high): the candidates
        sink.store(i, start, end, above)
        hits = _set_flags(at_least)
        if hits.numel():
            found.append(hits + start)
    return torch.cat(found)


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
    for width in digits:
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
        # No early exit when every candidate is needed: the rounds still find the lowest key as
        # the threshold, with the same answer, and the number of collectives stays fixed.
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
