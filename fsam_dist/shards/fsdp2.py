"""Where FSDP2's shards live (``fully_shard``).

Every parameter is a ``DTensor`` sharded on dim 0 (``Shard(0)``, torch.chunk layout: rank ``r``
holds rows ``[r·c, min((r+1)·c, rows))`` with ``c = ceil(rows / world)``). The local shard is
``p.to_local()`` -- a view of the storage the next all-gather reads, so an in-place change is
seen by the next forward -- and its gradient ``p.grad.to_local()``. Public API only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..core import ShardView


class FSDP2Shards:
    """The local row block of every trainable ``DTensor`` parameter."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], positions: dict[str, int], eligible: dict[str, bool],
                 rank: int, world_size: int) -> None:
        from torch.distributed.tensor import DTensor, Shard

        self.positions, self.eligible = positions, eligible
        self.params = []   # (name, parameter, offset of the local block in the flattened parameter)
        for name, p in named:
            if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
                raise RuntimeError(f"FSDP2 parameter {name} is not a DTensor sharded on dim 0 "
                                   f"({type(p).__name__}, {getattr(p, 'placements', None)})")
            rows = p.shape[0] if p.dim() else 1
            chunk = -(-rows // world_size)
            start_row = min(rank * chunk, rows)
            row_numel = p.numel() // rows if rows else 0
            expected = max(0, min(rows, start_row + chunk) - start_row) * row_numel
            if p.to_local().numel() != expected:
                raise RuntimeError(f"FSDP2 parameter {name}: local shard has {p.to_local().numel()} entries, "
                                   f"expected {expected} (torch.chunk layout)")
            self.params.append((name, p, start_row * row_numel))

    def pieces(self) -> list[tuple[str, int, int]]:
        return [(n, off, p.to_local().numel()) for n, p, off in self.params if p.to_local().numel()]

    @staticmethod
    def sync(wrapped: nn.Module, last: bool):
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def views(self) -> list[ShardView]:
        views = []
        for name, p, offset in self.params:
            local = p.to_local()
            if not local.numel():
                continue
            if p.grad is None:   # unused in this batch: its gradient is zero
                p.grad = torch.zeros_like(p)
            views.append(ShardView(name, local.detach().view(-1), p.grad.to_local().view(-1),
                                   self.positions[name] + offset, self.eligible[name]))
        return views

    @staticmethod
    def publish(wrapped: nn.Module) -> None:
        """Reshard every module still holding gathered parameters (reshard_after_forward=False, ...)."""
        from torch.distributed.fsdp import FSDPModule

        for module in wrapped.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
