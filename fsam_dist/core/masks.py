"""Compact FSAM masks: one per local shard view, bit-packed or as int32 indices, whichever is smaller.

A mask over ``n`` local entries with ``c`` of them set costs

* ``'bits'``: ``ceil(n / 8)`` bytes (one bit per entry), or
* ``'indices'``: ``4 c`` bytes (sorted int32 positions inside the view),

so indices win below a density of 1/32 and bits above it (FSAM's default κ = 0.1 → bits,
1/8 byte per entry instead of the 1 byte of a bool tensor). All-set and all-clear masks store
nothing (``'all'``, ``'none'``): SAM (κ = 1) and excluded parameters perturbed densely keep no mask.

Everything here works chunk by chunk (:data:`~fsam_dist.core.views.CHUNK` entries), so unpacking
never materialises a full-size bool or int64 tensor: :meth:`Mask.selections` yields, per chunk, either a slice (every
entry of a dense range) or the int64 indices of that chunk's set entries.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .views import chunks

KINDS = ("none", "all", "bits", "indices")


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

    __slots__ = ("numel", "count", "kind", "data", "device")

    def __init__(self, numel: int, count: int, kind: str, data: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"Mask kind must be one of {KINDS}, got {kind!r}")
        self.numel, self.count, self.kind, self.data = int(numel), int(count), kind, data
        self.device = data.device if data is not None else torch.device(device or "cpu")

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

    # ---- reading -----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of the stored representation."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def selections(self, as_indices: bool = False) -> Iterator[slice | torch.Tensor]:
        """The set entries, chunk by chunk, in increasing order: a ``slice`` for a dense range
        (``'all'``; with ``as_indices`` an int64 arange instead) or an int64 index tensor."""
        if self.kind == "none":
            return
        if self.kind == "indices":
            for start, end in chunks(self.count):
                yield self.data[start:end].to(torch.int64)
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
        """Plain data (``torch.load(weights_only=True)`` reads it back)."""
        return {"kind": self.kind, "numel": self.numel, "count": self.count, "data": self.data}

    @classmethod
    def from_state(cls, state: dict) -> "Mask":
        """From :meth:`state`."""
        return cls(state["numel"], state["count"], state["kind"], state["data"])

    def __repr__(self) -> str:
        return f"Mask(numel={self.numel}, count={self.count}, kind={self.kind!r}, nbytes={self.nbytes})"
