"""What every backend adapter provides to the two-pass step (``fsam_dist.train.step``).

An adapter only says where things live: the local shards and their gradients, their global
positions, and how a change to the shard reaches the next forward. It never does FSAM math.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from ..core import DEFAULT_EXCLUDE, ShardView, grad_norm  # noqa: F401  (re-exported)

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
"""``loss_fn(model, micro_batch)`` → the *sum* of per-target losses of the micro-batch."""


@dataclass
class WholeModel:
    """What a rank that holds every trainable parameter whole and current offers the batched
    'empirical' Fisher (:func:`fsam_dist.train.step.empirical_fisher`): per-example gradients taken
    with ``torch.func`` on the plain module, without the backend's backward (no collective)."""

    module: torch.nn.Module
    """The plain module (no DDP / DeepSpeed wrapper) whose forward reads the parameters."""
    trainable: list[tuple[str, torch.nn.Parameter]]
    """Its trainable parameters, names as in :meth:`Backend.views`, in ``named_parameters()`` order."""
    eligible: dict[str, bool]
    """Whether the Fisher mask applies to each trainable parameter."""
    pieces: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]
    """Cuts one tensor per eligible parameter (its shape, any layout) into this rank's pieces:
    one 1-D tensor per *eligible* view of :meth:`Backend.views`, in that order."""
    context: Callable[[], ContextManager] = field(default=contextlib.nullcontext)
    """The context the backend's forward runs under (e.g. autocast)."""


class Backend:
    """Adapter interface. Subclasses fill in the backend-specific pieces.

    Attributes:
        group: the group the core reduces shard sums over (``REPLICATED`` when every rank holds
            complete, identical parameters and gradients).
        world_group: the group every per-step decision (skip, token count) is reduced over.
        loss_multiplier: factor on ``loss_sum / global_target_count`` so that the gradient the
            backend reduces equals the gradient of the global-batch mean (e.g. the world size
            where the backend averages gradients over ranks).
    """

    group = None
    world_group = None
    loss_multiplier: float = 1.0
    rank: int = 0
    world_size: int = 1

    @property
    def model(self) -> torch.nn.Module:
        """The module whose forward computes the loss (possibly a wrapper)."""
        raise NotImplementedError

    def forward_backward(self, loss_fn: LossFn, micro_batch: dict, scale: float, last: bool) -> torch.Tensor:
        """Forward, ``(loss_sum * scale).backward()``; ``last`` marks the accumulation boundary,
        after which gradients are reduced. Returns the detached ``loss_sum``."""
        raise NotImplementedError

    def at_boundary(self) -> bool:
        """Whether the last backward ran at the accumulation boundary (gradients reduced), where
        the backend can tell; True where it cannot."""
        return True

    def views(self) -> list[ShardView]:
        """Local shard views after a pass (at the accumulation boundary)."""
        raise NotImplementedError

    def whole_model(self) -> WholeModel | None:
        """The plain module and its parameters where this rank holds every trainable parameter
        whole, with the current weights (published first where a restore was deferred: then a
        collective, which every rank makes); None where parameters are sharded (ZeRO-3, FSDP) --
        then the 'empirical' Fisher runs one backward per example through the backend."""
        return None

    def publish(self, restored: bool) -> None:
        """Make in-place changes to the views' weights visible to the next forward. Called after
        the perturbation (``restored=False``) and after the restore (``restored=True``)."""

    def zero_grad(self) -> None:
        raise NotImplementedError

    def clip_and_step(self, max_norm: float) -> float:
        """Clip to the global norm ``max_norm`` (0 = off), step the base optimizer and scheduler.
        Returns the global gradient norm before clipping.

        Default for adapters whose views' gradients are the ones ``self.optimizer`` steps with
        (one process, DDP, FSDP): the norm comes from the core, over this rank's shards."""
        views = self.views()
        norm = grad_norm(views, self.group)
        if max_norm > 0:
            # The same coefficient as torch.nn.utils.clip_grad_norm_, from the global norm.
            coef = max_norm / (norm + 1e-6)
            if coef < 1:
                with torch.no_grad():
                    for v in views:
                        v.grad.mul_(coef)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.zero_grad()
        return norm

    def current_lr(self) -> float | None:
        """The base optimizer's current learning rate (first parameter group)."""
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            return float(scheduler.get_last_lr()[0])
        optimizer = getattr(self, "optimizer", None)
        return float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None

    def skip_step(self) -> None:
        """Discard this step's gradients without touching weights or optimizer state."""
        self.zero_grad()

    def save_state(self, path: str) -> None:
        """Save what resuming needs (weights, optimizer and scheduler state) into the directory
        ``path``. Every rank calls it; each writes what it owns."""
        raise NotImplementedError

    def load_state(self, path: str, saved_world_size: int | None = None) -> None:
        """Restore what :meth:`save_state` wrote into ``path`` (same backend). Every rank calls it.
        ``saved_world_size``: given when the checkpoint was written by a different number of
        processes; the adapter reshards its state, or raises one clear error saying why it cannot."""
        raise NotImplementedError

    def full_weights_module(self) -> torch.nn.Module | None:
        """The plain module if every rank holds its complete current weights (for generation),
        else None (then evaluation gathers :meth:`full_state_dict`)."""
        return None

    def full_state_dict(self) -> dict | None:
        """The module's complete ``state_dict`` (fp32 masters where they exist) on rank 0, None on
        the other ranks. A collective where parameters are sharded: every rank calls it."""
        raise NotImplementedError
