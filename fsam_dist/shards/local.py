"""One process, or DDP: every rank holds the full parameters and the all-reduced gradient."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..core import DEFAULT_EXCLUDE, REPLICATED, ShardView, global_positions, is_eligible
from .base import Backend, LossFn, WholeModel


class LocalBackend(Backend):
    """Plain ``torch.nn.Module`` or ``DistributedDataParallel``.

    DDP averages gradients over ranks, so the loss is multiplied by the world size; the
    gradients are then identical on every rank, and the core reduces nothing (``REPLICATED``).
    """

    group = REPLICATED

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                 exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDE,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self._model = model
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.ddp = isinstance(model, DistributedDataParallel)
        self.world_size = dist.get_world_size() if self.ddp else 1
        self.rank = dist.get_rank() if self.ddp else 0
        self.world_group = None
        self.loss_multiplier = float(self.world_size)
        self.trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.positions = global_positions([(n, p.numel()) for n, p in self.trainable])
        self.eligible = {n: is_eligible(n, exclude) for n, _ in self.trainable}
        self.autocast_dtype = autocast_dtype

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def forward_backward(self, loss_fn: LossFn, micro_batch: dict, scale: float, last: bool) -> torch.Tensor:
        # Only the boundary micro-batch all-reduces; earlier ones accumulate locally.
        sync = contextlib.nullcontext() if (last or not self.ddp) else self._model.no_sync()
        with sync, self._autocast():
            loss_sum = loss_fn(self._model, micro_batch)
            (loss_sum * scale).backward()
        return loss_sum.detach()

    def _autocast(self):
        device_type = next(self.module.parameters()).device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def whole_model(self) -> WholeModel:
        """Every rank holds the whole parameters (one process, DDP)."""
        def pieces(full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            return [full[n].reshape(-1) for n, _ in self.trainable if self.eligible[n]]

        return WholeModel(self.module, self.trainable, self.eligible, pieces, self._autocast)

    def views(self) -> list[ShardView]:
        views = []
        for name, p in self.trainable:
            if p.grad is None:   # unused in this batch: its gradient is zero
                p.grad = torch.zeros_like(p)
            views.append(ShardView(name, p.detach().view(-1), p.grad.view(-1), self.positions[name],
                                   self.eligible[name]))
        return views

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save_state(self, path: str) -> None:
        """``torch.save`` of module, optimizer and scheduler state into ``path/local_state.pt``
        (rank 0 writes; DDP ranks hold identical state)."""
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": None if self.scheduler is None else self.scheduler.state_dict()},
                       os.path.join(path, "local_state.pt"))
        if self.ddp:
            dist.barrier()

    def load_state(self, path: str, saved_world_size: int | None = None) -> None:
        """Load :meth:`save_state`'s file; the state is replicated, so any world size reads it."""
        state = torch.load(os.path.join(path, "local_state.pt"), map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def full_weights_module(self) -> torch.nn.Module:
        return self.module

    def full_state_dict(self) -> dict | None:
        if self.rank != 0:
            return None
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}
