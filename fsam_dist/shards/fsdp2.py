"""Where FSDP2's shards live (``fully_shard``), and its wrapping.

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


def wrap_fsdp2(model: nn.Module, wrap: set[type], reshard_after_forward: bool, mixed_precision: str | None,
               cpu_offload: bool, device: torch.device) -> nn.Module:
    """``fully_shard`` each ``wrap`` block (children before parents), then the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if device.type != "cpu":
        model.to(device)
    for module in reversed(list(model.modules())):
        if module is not model and type(module) in wrap:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


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
