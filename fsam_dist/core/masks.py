"""Compact FSAM masks: one per local shard view, bit-packed or as int32 indices, whichever is smaller.

A mask over ``n`` local entries with ``c`` of them set costs

* ``'bits'``: ``ceil(n / 8)`` bytes (one bit per entry), or
* ``'indices'``: ``4 c`` bytes (sorted int32 positions inside the view), or
* ``'blocks'``: ``c + 4 ceil(n / 256)`` bytes: each set entry's offset inside its block of
  :data:`BLOCK` entries (uint8) and each block's count (int32),

so indices win below a density of 1/32 and bits above it (FSAM's default κ = 0.1 → bits,
1/8 byte per entry instead of the 1 byte of a bool tensor). All-set and all-clear masks store
nothing (``'all'``, ``'none'``): SAM (κ = 1) and excluded parameters perturbed densely keep no mask.
Blocks are smaller than bits below a density of 7/64 (≈ 0.109); unlike bits they give the
positions of a chunk's set entries without a scan (one ``repeat_interleave`` and an add, no
``nonzero``), so :func:`with_positions` turns FSAM's bit-packed masks into blocks once per
refresh where the rank's masks stay within 1/8 byte per entry (at κ = 0.1 they do: Σ c + N/64 ≤ N/8).
A checkpoint stores blocks as bits or indices (:meth:`Mask.state`), so the format is unchanged.

Everything here works chunk by chunk (:data:`~fsam_dist.core.views.CHUNK` entries), so unpacking
never materialises a full-size bool or int64 tensor: :meth:`Mask.selections` yields, per chunk, either a slice (every
entry of a dense range) or the int64 indices of that chunk's set entries.
"""

from __future__ import annotations

import sys

from typing import Iterator

import torch

from .views import CHUNK, chunks

KINDS = ("none", "all", "bits", "indices", "blocks")
_INT32_MAX = (1 << 31) - 1
BLOCK = 256
"""Entries per block of a ``'blocks'`` mask (offsets fit a uint8; :data:`CHUNK` is a multiple)."""


def _i64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_PACK = _i64(0x0102040810204080)     # byte i (0/1) of a word → bit 56 + i of the product
_SPREAD = _i64(0x0101010101010101)   # copy a byte into all 8 bytes of a word
_SELECT = _i64(0x8040201008040201)   # keep bit i of byte i
_ROUND = _i64(0x7F7F7F7F7F7F7F7F)    # + this, then & _HIGH: 0x80 in every non-zero byte
_HIGH = _i64(0x8080808080808080)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a 1-D bool tensor: bit ``i % 8`` of byte ``i // 8`` is ``mask[i]`` (uint8, ``ceil(n/8)``).

    One multiply per 8 entries (a byte of 0/1 per entry, read as an int64 word, times a constant
    puts the 8 flags side by side in the top byte); the input is read in place when its length is
    a multiple of 8 and it is 8-byte aligned, else copied (callers pass chunks, so that is a chunk).
    """
    n = mask.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.uint8, device=mask.device)
    flags = mask.reshape(-1).view(torch.uint8)
    if n % 8 or flags.storage_offset() % 8 or not flags.is_contiguous():
        padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
        padded[:n] = flags
        flags = padded
    words = flags.view(torch.int64)
    packed = torch.mul(words, _PACK)          # int64 arithmetic wraps: the high byte is what we keep
    packed.bitwise_right_shift_(56).bitwise_and_(255)
    return packed.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` flags of ``packed`` as a bool tensor."""
    words = packed.to(torch.int64).mul_(_SPREAD).bitwise_and_(_SELECT)
    words.add_(_ROUND).bitwise_and_(_HIGH).bitwise_right_shift_(7).bitwise_and_(_SPREAD)
    return words.view(torch.uint8).view(torch.bool)[:numel]


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount(packed: torch.Tensor) -> int:
    """Set bits in a packed mask (chunk by chunk)."""
    table = _POPCOUNT.to(packed.device)
    total = 0
    for start, end in chunks(packed.numel()):
        total += int(table[packed[start:end].to(torch.int64)].sum())
    return total


class Mask:
    """A bool mask over the ``numel`` entries of one local shard view, stored compactly.

    Attributes:
        numel: entries covered.
        count: entries set.
        kind: ``'none'``, ``'all'``, ``'bits'`` (``data``: uint8, ``ceil(numel/8)``) or
            ``'indices'`` (``data``: sorted int32 positions, ``count`` of them).
        data: see ``kind``; None for ``'none'`` and ``'all'``.
    """

    __slots__ = ("numel", "count", "kind", "data", "device", "table", "bounds")

    def __init__(self, numel: int, count: int, kind: str, data: torch.Tensor | None = None,
                 device: torch.device | str | None = None, table: torch.Tensor | None = None,
                 bounds: list[int] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"Mask kind must be one of {KINDS}, got {kind!r}")
        self.numel, self.count, self.kind, self.data = int(numel), int(count), kind, data
        self.device = data.device if data is not None else torch.device(device or "cpu")
        # 'blocks': int32 count per block, and (host ints) where each chunk's offsets start in
        # ``data`` (len = chunks + 1), so no chunk needs a host sync to find its entries;
        # 'indices': the same bounds, found on first use.
        self.table, self.bounds = table, bounds
        if kind == "blocks" and (table is None or bounds is None):
            raise ValueError("Mask kind 'blocks' needs its block table and chunk bounds")

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def full(cls, numel: int, device=None) -> "Mask":
        return cls(numel, numel, "all", device=device)

    @classmethod
    def empty(cls, numel: int, device=None) -> "Mask":
        return cls(numel, 0, "none", device=device)

    @classmethod
    def from_bool(cls, mask: torch.Tensor) -> "Mask":
        """From a bool tensor (any shape, read flattened)."""
        flat = mask.detach().reshape(-1)
        if flat.dtype != torch.bool:
            raise ValueError(f"Mask.from_bool needs a bool tensor, got {flat.dtype}")
        n = flat.numel()
        packed = torch.empty(-(-n // 8), dtype=torch.uint8, device=flat.device)
        count = 0
        for start, end in chunks(n):
            chunk = flat[start:end]
            count += int(chunk.sum())
            packed[start // 8:-(-end // 8)] = pack_bits(chunk)
        return cls.from_bits(packed, n, count)

    @classmethod
    def from_bits(cls, packed: torch.Tensor, numel: int, count: int | None = None) -> "Mask":
        """From a packed mask, in the smallest representation for its density."""
        if count is None:
            count = popcount(packed)
        if count == 0:
            return cls.empty(numel, packed.device)
        if count == numel:
            return cls.full(numel, packed.device)
        if 4 * count < packed.numel() and numel < 2 ** 31:
            parts = [idx.to(torch.int32) for idx in cls(numel, count, "bits", packed).selections(as_indices=True)]
            return cls(numel, count, "indices", torch.cat(parts))
        return cls(numel, count, "bits", packed)

    @classmethod
    def from_positions(cls, per_chunk: list, numel: int, device=None) -> "Mask":
        """From the sorted int64 positions of the set entries of each chunk of ``range(numel)``
        (one item per chunk of :func:`~fsam_dist.core.views.chunks`, in order: a tensor, None for
        none, or a ``slice`` for all of the chunk), in the smallest of the representations
        (indices, blocks, bits; nothing for none or all)."""
        counts = [0 if p is None else p.stop - p.start if isinstance(p, slice) else int(p.numel()) for p in per_chunk]
        count = sum(counts)
        if count == 0:
            return cls.empty(numel, device)
        if count == numel:
            return cls.full(numel, device)
        device = next(p.device for p in per_chunk if isinstance(p, torch.Tensor))
        per_chunk = [torch.zeros(0, dtype=torch.int64, device=device) if p is None else
                     torch.arange(p.start, p.stop, device=device) if isinstance(p, slice) else p for p in per_chunk]
        n_bits, n_blocks = -(-numel // 8), count + 4 * -(-numel // BLOCK)
        if 4 * count < n_bits and numel < 2 ** 31:
            return cls(numel, count, "indices", torch.cat([p.to(torch.int32) for p in per_chunk]))
        if n_blocks <= n_bits:
            return cls._blocks(per_chunk, numel)
        packed = torch.empty(n_bits, dtype=torch.uint8, device=device)
        for (start, end), pos in zip(chunks(numel), per_chunk):
            flags = torch.zeros(end - start, dtype=torch.bool, device=device)
            flags[pos - start] = True
            packed[start // 8:-(-end // 8)] = pack_bits(flags)
        return cls(numel, count, "bits", packed)

    @classmethod
    def _blocks(cls, per_chunk: list[torch.Tensor], numel: int) -> "Mask":
        device = per_chunk[0].device
        offsets, tables, bounds = [], [], [0]
        for (start, end), pos in zip(chunks(numel), per_chunk):
            offsets.append(pos.bitwise_and(BLOCK - 1).to(torch.uint8))
            tables.append(torch.bincount(pos.sub(start).bitwise_right_shift_(8),
                                         minlength=-(-(end - start) // BLOCK)).to(torch.int32))
            bounds.append(bounds[-1] + int(pos.numel()))
        return cls(numel, bounds[-1], "blocks", torch.cat(offsets), device, torch.cat(tables), bounds)

    def positions_by_chunk(self) -> list[torch.Tensor]:
        """The sorted int64 positions of the set entries, one tensor per chunk of ``range(numel)``
        (for building another representation; not the hot path)."""
        out = []
        for start, end, sel in self.by_chunk():
            if sel is None:
                out.append(torch.zeros(0, dtype=torch.int64, device=self.device))
            elif isinstance(sel, slice):
                out.append(torch.arange(start, end, device=self.device))
            else:
                out.append(sel)
        return out

    def as_blocks(self) -> "Mask":
        """This mask as ``'blocks'`` (itself if it is one, or if it is none/all)."""
        if self.kind in ("blocks", "none", "all"):
            return self
        return Mask._blocks(self.positions_by_chunk(), self.numel)

    # ---- reading -----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of the stored representation."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.table) if t is not None)

    def by_chunk(self) -> Iterator[tuple[int, int, slice | torch.Tensor | None]]:
        """``(start, end, sel)`` for every chunk of ``range(numel)``: ``sel`` is None (no entry of
        the chunk is set), a ``slice`` (all are) or the sorted int64 positions (in the view) of
        the set ones. For ``'blocks'`` and ``'indices'`` no host sync: the chunk bounds are host
        ints (found once per mask for indices); for ``'bits'`` one ``nonzero`` per chunk."""
        if self.kind == "indices" and self.bounds is None:   # found once per mask (one host sync)
            edges = torch.tensor([s for s, _ in chunks(self.numel)] + [self.numel], dtype=torch.int32,
                                 device=self.device)
            self.bounds = torch.searchsorted(self.data, edges).tolist()
        bounds = self.bounds
        for c, (start, end) in enumerate(chunks(self.numel)):
            if self.kind == "none":
                yield start, end, None
            elif self.kind == "all":
                yield start, end, slice(start, end)
            elif self.kind == "indices":
                lo, hi = bounds[c], bounds[c + 1]
                yield start, end, (self.data[lo:hi].to(torch.int64) if hi > lo else None)
            elif self.kind == "blocks":
                yield start, end, self._block_positions(c, start, end)
            else:
                flags = unpack_bits(self.data[start // 8:-(-end // 8)], end - start)
                idx = torch.nonzero(flags).reshape(-1)
                yield start, end, (idx.add_(start) if idx.numel() else None)

    def selection(self, c: int) -> slice | torch.Tensor | None:
        """``sel`` of chunk ``c`` alone, as :meth:`by_chunk` yields it (no host sync for
        'blocks', 'indices' once its bounds are known, 'all' and 'none')."""
        start, end = c * CHUNK, min(self.numel, (c + 1) * CHUNK)
        if self.kind == "none":
            return None
        if self.kind == "all":
            return slice(start, end)
        if self.kind == "blocks":
            return self._block_positions(c, start, end)
        if self.kind == "indices" and self.bounds is not None:
            lo, hi = self.bounds[c], self.bounds[c + 1]
            return self.data[lo:hi].to(torch.int64) if hi > lo else None
        if self.kind == "indices":
            for i, (_, _, sel) in enumerate(self.by_chunk()):   # finds the bounds (once per mask)
                if i == c:
                    return sel
        flags = unpack_bits(self.data[start // 8:-(-end // 8)], end - start)
        idx = torch.nonzero(flags).reshape(-1)
        return idx.add_(start) if idx.numel() else None

    def _block_positions(self, c: int, start: int, end: int) -> torch.Tensor | None:
        """'blocks': the positions of chunk ``c`` (entries ``[start, end)``), or None if it has none."""
        lo, hi = self.bounds[c], self.bounds[c + 1]
        if hi == lo:
            return None
        first = start // BLOCK
        # in int32 where the positions fit (half the bytes of int64, and the uint8 offsets are
        # added without a widening promotion: ~1.7x faster on a CPU), widened once at the end
        wide = self.numel > _INT32_MAX
        bases = torch.arange(start, end, BLOCK, dtype=torch.int64 if wide else torch.int32, device=self.device)
        pos = torch.repeat_interleave(bases, self.table[first:first + bases.numel()], output_size=hi - lo)
        pos.add_(self.data[lo:hi])
        return pos if wide else pos.to(torch.int64)

    def selections(self, as_indices: bool = False) -> Iterator[slice | torch.Tensor]:
        """The set entries, chunk by chunk, in increasing order: a ``slice`` for a dense range
        (``'all'``; with ``as_indices`` an int64 arange instead) or an int64 index tensor."""
        if self.kind == "none":
            return
        if self.kind == "indices":
            for start, end in chunks(self.count):
                yield self.data[start:end].to(torch.int64)
            return
        if self.kind == "blocks":
            for _, _, sel in self.by_chunk():
                if sel is not None:
                    yield sel
            return
        for start, end in chunks(self.numel):
            if self.kind == "all":
                yield torch.arange(start, end, device=self.device) if as_indices else slice(start, end)
                continue
            flags = unpack_bits(self.data[start // 8:-(-end // 8)], end - start)
            idx = torch.nonzero(flags).reshape(-1)
            if idx.numel():
                yield idx.add_(start)

    def bool_range(self, start: int, end: int) -> torch.Tensor:
        """The mask of entries ``[start, end)`` as bool (``start`` a multiple of 8)."""
        device = self.device
        if self.kind in ("none", "all"):
            return torch.full((end - start,), self.kind == "all", dtype=torch.bool, device=device)
        if self.kind == "bits":
            if start % 8:
                raise ValueError("Mask.bool_range: start must be a multiple of 8")
            return unpack_bits(self.data[start // 8:-(-end // 8)], end - start)
        out = torch.zeros(end - start, dtype=torch.bool, device=device)
        if self.kind == "blocks":   # only the chunks that overlap [start, end)
            for c in range(start // CHUNK, -(-end // CHUNK)):
                c_start, c_end = c * CHUNK, min(self.numel, (c + 1) * CHUNK)
                sel = self._block_positions(c, c_start, c_end)
                if sel is not None:
                    sel = sel[(sel >= start) & (sel < end)]
                    out[sel - start] = True
            return out
        lo, hi = (int(i) for i in torch.searchsorted(self.data, torch.tensor([start, end], dtype=torch.int32,
                                                                                device=device)))
        out[self.data[lo:hi].to(torch.int64) - start] = True
        return out

    def to_bool(self) -> torch.Tensor:
        """The whole mask as a bool tensor (``numel`` bytes: for callers and tests, not the hot path)."""
        if self.kind == "bits":
            return unpack_bits(self.data, self.numel).clone()
        return self.bool_range(0, self.numel)

    def intersection(self, other: "Mask") -> int:
        """How many entries are set in both (chunk by chunk)."""
        if self.numel != other.numel:
            raise ValueError(f"Mask.intersection: masks over {self.numel} and {other.numel} entries")
        if "none" in (self.kind, other.kind):
            return 0
        if self.kind == "all":
            return other.count
        if other.kind == "all":
            return self.count
        return sum(int((self.bool_range(start, end) & other.bool_range(start, end)).sum())
                   for start, end in chunks(self.numel))

    # ---- checkpoints -------------------------------------------------------------------------

    def state(self) -> dict:
        """Plain data (``torch.load(weights_only=True)`` reads it back). A ``'blocks'`` mask is
        stored as :meth:`from_bits` would store it (bits or indices): the checkpoint format does
        not depend on the in-memory representation."""
        if self.kind == "blocks":
            packed = torch.empty(-(-self.numel // 8), dtype=torch.uint8, device=self.device)
            for start, end in chunks(self.numel):
                packed[start // 8:-(-end // 8)] = pack_bits(self.bool_range(start, end))
            return Mask.from_bits(packed, self.numel, self.count).state()
        return {"kind": self.kind, "numel": self.numel, "count": self.count, "data": self.data}

    @classmethod
    def from_state(cls, state: dict) -> "Mask":
        """From :meth:`state`. The kind is interned, as the literal a fresh mask holds, so a
        checkpoint written after a resume pickles byte-identically to one written without it
        (pickle memoises strings by identity)."""
        return cls(state["numel"], state["count"], sys.intern(state["kind"]), state["data"])

    def __repr__(self) -> str:
        return f"Mask(numel={self.numel}, count={self.count}, kind={self.kind!r}, nbytes={self.nbytes})"


def with_positions(masks: dict) -> dict:
    """FSAM's masks with the bit-packed ones turned into ``'blocks'`` (positions without a scan),
    within the memory of a bit-packed mask over every entry (``Σ ceil(n/8)``, 1/8 byte per
    eligible entry): all of them when the total stays within it -- always when this rank keeps
    at most 7/64 of its eligible entries (κ = 0.1: Σ c + N/64 ≤ N/8; the sparse views stay
    indices, which leaves room for blocks on the dense ones) -- else each one whose blocks are
    smaller than its bits. Once per refresh (and after loading a checkpoint); the selection and
    the math do not change."""
    budget = sum(-(-m.numel // 8) for m in masks.values())
    size = {k: m.count + 4 * -(-m.numel // BLOCK) for k, m in masks.items() if m.kind == "bits"}
    every = sum(size.values()) + sum(m.nbytes for m in masks.values() if m.kind != "bits") <= budget
    return {k: (m.as_blocks() if k in size and (every or size[k] <= m.nbytes) else m) for k, m in masks.items()}
