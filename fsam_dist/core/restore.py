"""Exact-restore codec: what :func:`~fsam_dist.core.fsam.perturb` keeps to put the weights back bit for bit.

SAM restores w after pass 2; w + e − e is not w in floating point, and a full copy of w costs 4
bytes per entry. A same-sign fp32 bit pattern is an integer that the perturbation moves by |e| in
units of the last place of w. Where that move δ = perturbed − original is below 2^b units, the low b
bits of the original pattern and one *carry* bit (does the original lie above the perturbed
value?) give the original back from the perturbed value: δ ≡ perturbed − low (mod 2^b), so
δ = r or r − 2^b with r = (perturbed − low) mod 2^b, the carry saying which. Entries that changed
sign or moved by 2^b units or more (*exceptions*) keep their whole pattern with an int32 position.

:func:`~fsam_dist.core.fsam.perturb` gathers the perturbed entries of many views into shared
buffers and calls :func:`save` once per buffer -- only as far as needed to keep FSAM's state
within ``STATE_BUDGET`` (1/8) of a full copy of the weights; the other buffers keep the plain
values (no encoding work, nothing to read back at the restore).

b is chosen per buffer from {8, 16, 24} (or the plain values) by cost: |e| / |w| sets it -- a
densely perturbed embedding (|e| ≪ ulp·2^8) fits 1.125 bytes per entry, FSAM's masked entries
at the T5 scale 2.125, a tiny model's large moves 3.125 or the 4-byte values. Weights of other
dtypes and small buffers keep their values. Measured sizes: bench/README.md ("Memory per rank").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .masks import pack_bits, unpack_bits

SMALL = 1 << 14
"""Buffers of at most this many entries keep plain values (and an excluded view this small is
perturbed on every entry): per-call overheads outweigh the bytes saved."""

LOW_BITS = (8, 16, 24)
"""How many low bits of each fp32 bit pattern the restore data may keep (whole bytes)."""

_FAR = (1 << 31) - 1
SAMPLE = 16
"""The encoding of a chunk is chosen from the moves of every SAMPLE-th entry (≥ 1 024 of them)."""
_LITTLE = sys.byteorder == "little"   # torch tensors use the host's byte order


@dataclass
class Saved:
    """How one chunk of perturbed entries is put back."""

    low: torch.Tensor | None = None         # uint8 (n, b/8): bytes 0..b/8-1 of each original bit pattern
    carry: torch.Tensor | None = None       # bit-packed: the original pattern lies above the perturbed one
    where: torch.Tensor | None = None       # int32: positions (in the chunk's selection) of exceptions
    bits: torch.Tensor | None = None        # int32: their whole original bit patterns
    values: torch.Tensor | None = None      # or: the original values themselves

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.low, self.carry, self.where, self.bits, self.values) if t is not None)


def save(original: torch.Tensor, perturbed: torch.Tensor) -> Saved:
    """Restore data for one chunk: ``original`` (a copy) and the values now in the weights.

    The cheapest of: for b in :data:`LOW_BITS`, the low b bits + carry bit of each entry
    (b/8 + 1/8 bytes) plus 8 bytes per exception; the values (4 bytes) -- as estimated on every
    :data:`SAMPLE`-th entry, and never more than the values. One host sync for the three
    exception counts, one for the chosen exceptions' positions.
    """
    n = original.numel()
    if original.dtype != torch.float32 or n <= SMALL:
        return Saved(values=original)
    old, new = original.view(torch.int32), perturbed.view(torch.int32)
    flip = torch.bitwise_xor(old, new).bitwise_right_shift_(31)   # -1 where the sign flipped, else 0
    # |Δ| in units of the last place (exact when the sign is kept); a sign flip counts as the
    # farthest move, an exception for every b
    distance = torch.sub(old, new).abs_().bitwise_or_(flip).bitwise_and_(_FAR)
    # how many entries move by 2^b units or more, for b = 8, 16, 24, estimated on every
    # SAMPLE-th entry (read back together): the choice only sets the size, never the exactness
    sample = distance[::SAMPLE]
    beyond = torch.stack([torch.count_nonzero(sample >= 1 << b) for b in LOW_BITS]).tolist()
    cost = {b: b // 8 * n + -(-n // 8) + 8 * count * n / sample.numel() for b, count in zip(LOW_BITS, beyond)}
    b = min(cost, key=cost.get)
    if cost[b] >= 4 * n:
        return Saved(values=original)
    where = torch.nonzero(distance >= 1 << b).reshape(-1)
    if b // 8 * n + -(-n // 8) + 8 * where.numel() >= 4 * n:   # the estimate was off: never above the values
        return Saved(values=original)
    if _LITTLE and b < 24:   # the low b/8 bytes of each pattern: one truncating conversion
        low = old.to(torch.uint8 if b == 8 else torch.int16).view(torch.uint8).view(n, b // 8)
    elif _LITTLE:
        low = old.view(torch.uint8).view(n, 4)[:, :3].clone()
    else:
        low = torch.empty((n, b // 8), dtype=torch.uint8, device=old.device)
        for i in range(b // 8):   # byte by byte: no int32 temporary wider than one column
            low[:, i] = old.bitwise_right_shift(8 * i).bitwise_and_(0xFF)
    return Saved(low=low, carry=pack_bits(torch.lt(new, old)), where=where.to(torch.int32), bits=old[where])


def restored(current: torch.Tensor, saved: Saved) -> torch.Tensor:
    """The original values, from the perturbed ones now in the weights (``current``)."""
    if saved.values is not None:
        return saved.values
    now = current.view(torch.int32)
    n, width = saved.low.shape
    b = 8 * width
    if _LITTLE and width < 3:   # modulo 2^b only the low b bits count: no widening needed
        low = saved.low.view(-1) if width == 1 else saved.low.view(torch.int16).view(-1)
    elif _LITTLE:
        low = torch.zeros((n, 4), dtype=torch.uint8, device=now.device)
        low[:, :width] = saved.low
        low = low.view(torch.int32).view(-1)
    else:
        low = saved.low[:, 0].to(torch.int32)
        for i in range(1, width):
            low.bitwise_or_(saved.low[:, i].to(torch.int32).bitwise_left_shift_(8 * i))
    # δ = now − original is in (−2^b, 2^b) and ≡ now − low (mod 2^b): δ = r, or r − 2^b where
    # the original lies above the perturbed value
    r = torch.sub(now, low).bitwise_and_((1 << b) - 1)
    bits = torch.sub(now, r).add_(unpack_bits(saved.carry, n), alpha=1 << b)
    bits[saved.where.to(torch.int64)] = saved.bits
    return bits.view(torch.float32)
