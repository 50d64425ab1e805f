"""``FSAMOptimizer``: shard-aware FSAM's two passes inside anyone's training loop.

Given what a training script already has -- a plain module, ``DistributedDataParallel``, an FSDP1
``FullyShardedDataParallel`` (``use_orig_params=True``), an FSDP2 ``fully_shard``-ed module, or a
DeepSpeed engine -- and its base optimizer, it picks the shard adapter (:mod:`fsam_dist.shards`)
and runs the FSAM step of docs/design.md (the algorithm: :mod:`fsam_dist.core.fsam`) around the
user's forward/backward passes::

    sam = FSAMOptimizer(model, optimizer, rho=0.05, keep_ratio=0.1, mask_interval=100)
    for batch in loader:
        optimizer.zero_grad()
        model(**batch).loss.backward()        # pass 1 (accumulate micro-batches as usual)
        if sam.ascend():                      # global norm + mask over all shards, w <- w + e
            model(**batch).loss.backward()    # pass 2 at w + e (ascend() zeroed the gradients)
        sam.descend_and_step()                # w <- w - e exactly, clip, base step (+ scheduler)

The CLI's step (:func:`fsam_dist.train.step.train_step`) is a user of this class: one
implementation of the two-pass protocol.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import FSAMConfig, validate
from .core import DEFAULT_EXCLUDE, FSAM, count_nonfinite, global_sums
from .rng import rng_state, set_rng_state
from .shards.base import Backend


class FSAMUsageError(RuntimeError):
    """The two-pass protocol was used out of order, or on a model FSAM cannot handle."""


def _unwrap_compiled(model):
    return getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model


def _check_optimizer_holds(model: nn.Module, optimizer) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise FSAMUsageError(f"FSAMOptimizer: the optimizer does not hold {len(missing)} trainable parameter(s) of the "
                             f"model (first: {missing[0]}); build the optimizer from the wrapped model's parameters, "
                             "after wrapping (FSDP2's fully_shard replaces the parameters)")


def backend_for(model_or_engine, optimizer=None, scheduler=None, exclude=DEFAULT_EXCLUDE) -> Backend:
    """The shard adapter for what a training script holds (see the module docstring)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.nn.parallel import DistributedDataParallel

    model = _unwrap_compiled(model_or_engine)
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        from .shards.deepspeed import DeepSpeedBackend

        if optimizer is not None and optimizer not in (model.optimizer, getattr(model, "client_optimizer", None)):
            raise FSAMUsageError("FSAMOptimizer: with a DeepSpeed engine pass the optimizer given to or returned by "
                                 "deepspeed.initialize (or None)")
        if scheduler is not None and scheduler is not model.lr_scheduler:
            raise FSAMUsageError("FSAMOptimizer: with a DeepSpeed engine the engine steps the scheduler: pass it to "
                                 "deepspeed.initialize(lr_scheduler=...) and not here")
        return DeepSpeedBackend(model, exclude=exclude)
    if not isinstance(model, nn.Module):
        raise FSAMUsageError(f"FSAMOptimizer: cannot detect the backend of a {type(model).__name__}; pass an "
                             "nn.Module, a DistributedDataParallel, an FSDP1/FSDP2 module or a DeepSpeed engine")
    if optimizer is None:
        raise FSAMUsageError("FSAMOptimizer: the base optimizer is required (only a DeepSpeed engine brings its own)")
    if isinstance(model, (FSDP, FSDPModule)):
        from .shards.fsdp import FSDPBackend

        _check_optimizer_holds(model, optimizer)
        return FSDPBackend(model, optimizer, scheduler, exclude=exclude)
    if any(isinstance(m, (FSDP, FSDPModule)) for m in model.modules()):
        raise FSAMUsageError("FSAMOptimizer: FSDP wraps only submodules of this model; wrap the root too "
                             "(FullyShardedDataParallel(model, ...) / fully_shard(model)) and pass the root")
    if isinstance(model, DistributedDataParallel) and model.process_group is not None \
            and dist.get_world_size(model.process_group) != dist.get_world_size():
        raise FSAMUsageError("FSAMOptimizer: DDP over a subgroup of the ranks is not supported")
    if not isinstance(model, DistributedDataParallel) and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1:
        raise FSAMUsageError(f"FSAMOptimizer: a plain {type(model).__name__} in a {dist.get_world_size()}-process "
                             "run: its gradients are not reduced across ranks, so norms and masks would differ per "
                             "rank; wrap it in DistributedDataParallel or FSDP, or pass a DeepSpeed engine")
    from .shards.local import LocalBackend

    _check_optimizer_holds(model, optimizer)
    return LocalBackend(model, optimizer, scheduler, exclude=exclude)


class FSAMOptimizer:
    """Shard-aware FSAM around a base optimizer, for custom training loops.

    Args:
        model_or_engine: ``nn.Module``, ``DistributedDataParallel``, FSDP1 root
            (``use_orig_params=True``), FSDP2 ``fully_shard``-ed root, or a DeepSpeed engine.
        optimizer: the base optimizer over the (wrapped) model's parameters; with a DeepSpeed
            engine None or the one given to/returned by ``deepspeed.initialize``.
        scheduler: LR scheduler stepped after every applied step (not with a DeepSpeed engine:
            pass it to ``deepspeed.initialize``, the engine steps it).
        clip_grad_norm: global-norm clip of the gradient the base optimizer uses (0 or None = off). With
            DeepSpeed it must equal the config's ``gradient_clipping`` (DeepSpeed clips inside
            ``engine.step()``; its default is 1.0).
        rho, keep_ratio, mask_interval, fisher, norm, exclude, excluded_mode, adaptive, interval,
            reuse_direction, reuse_alpha, same_dropout, eps: the CLI's ``fsam.*`` fields, validated
            by the same model (:class:`fsam_dist.config.FSAMConfig`), same errors. ``fisher``
            must be 'batch' here: the 'empirical' Fisher needs single-example passes that only
            the CLI's loop drives (``fsam.fisher: empirical`` there). ``same_dropout`` applies to
            :meth:`step`; in the explicit protocol pass ``rng_state=`` to :meth:`ascend`.

    Protocol per optimizer step: pass 1 (backward over the step's micro-batches, gradients
    reduced at the accumulation boundary) → :meth:`ascend` → if it returned True, pass 2 over the
    same micro-batches → :meth:`descend_and_step`. Or :meth:`step` with a closure.

    With a DeepSpeed engine: call ``engine.backward(loss)`` (not ``loss.backward()``) in both
    passes and never ``engine.step()`` (:meth:`descend_and_step` calls it). The last backward of
    each pass must run at a gradient-accumulation boundary: with ``gradient_accumulation_steps``
    1 (the default) every backward is one; with M > 1 micro-batches call
    ``engine.set_gradient_accumulation_boundary(i == M - 1)`` before each ``engine.backward``
    (the engine divides each loss by its ``gradient_accumulation_steps``: set it to M). :meth:`ascend`
    raises if pass 1 did not end at a boundary. Zeroing the gradients between the passes is
    done by :meth:`ascend` (``engine.optimizer``'s buffers included; ``engine.zero_grad()``
    would leave g₁ + g₂ under ZeRO-3).
    """

    def __init__(self, model_or_engine, optimizer=None, *, scheduler=None, clip_grad_norm: float | None = 0.0,
                 rho: float = 0.05, keep_ratio: float = 0.1, mask_interval: int = 100, fisher: str = "batch",
                 norm: str = "full", exclude=DEFAULT_EXCLUDE, excluded_mode: str = "dense", adaptive: bool = False,
                 interval: int = 1, reuse_direction: bool = False, reuse_alpha: float | None = None,
                 same_dropout: bool = True, eps: float = 1e-12) -> None:
        cfg = validate(FSAMConfig, dict(rho=rho, keep_ratio=keep_ratio, mask_interval=mask_interval, fisher=fisher,
                                        norm=norm, exclude=list(exclude), excluded_mode=excluded_mode,
                                        adaptive=adaptive, interval=interval, reuse_direction=reuse_direction,
                                        reuse_alpha=reuse_alpha, same_dropout=same_dropout, eps=eps))
        if cfg.fisher == "empirical":
            raise FSAMUsageError("FSAMOptimizer: fisher='empirical' is not available in the API (it needs "
                                 "single-example passes the API does not drive); use fisher='batch', or the CLI's "
                                 "fsam.fisher: empirical")
        clip_grad_norm = 0.0 if clip_grad_norm is None else clip_grad_norm   # None = off, as optim.clip_grad_norm
        if isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float)) \
                or not math.isfinite(clip_grad_norm) or clip_grad_norm < 0:
            raise FSAMUsageError(f"FSAMOptimizer: clip_grad_norm must be a finite number >= 0 (0 = off), "
                                 f"got {clip_grad_norm!r}")
        backend = backend_for(model_or_engine, optimizer, scheduler, tuple(cfg.exclude))
        engine = getattr(backend, "engine", None)
        if engine is not None and float(engine.gradient_clipping()) != float(clip_grad_norm):
            raise FSAMUsageError(f"FSAMOptimizer: the DeepSpeed config's gradient_clipping "
                                 f"({engine.gradient_clipping()}; DeepSpeed's default is 1.0) differs from "
                                 f"clip_grad_norm ({clip_grad_norm}): set them equal (0.0 = off)")
        self._setup(backend, cfg.build(), float(clip_grad_norm), cfg.same_dropout)

    @classmethod
    def for_backend(cls, backend: Backend, fsam: FSAM | None, *, clip_grad_norm: float = 0.0,
                    same_dropout: bool = True, step: int = 0) -> "FSAMOptimizer":
        """Around an adapter and a core :class:`~fsam_dist.core.FSAM` state the caller owns (the
        CLI's step); ``fsam`` None: plain base-optimizer steps. No checks, no collectives."""
        sam = cls.__new__(cls)
        sam._setup(backend, fsam, clip_grad_norm, same_dropout)
        sam.step_count = step
        return sam

    def _setup(self, backend: Backend, fsam: FSAM | None, clip_grad_norm: float, same_dropout: bool) -> None:
        self.backend, self.fsam = backend, fsam
        self.clip_grad_norm, self.same_dropout = clip_grad_norm, same_dropout
        self.step_count = 0
        """Optimizer steps done (skipped ones included): drives the mask refresh and ``interval``."""
        self._phase = "idle"      # idle → (ascend) → perturbed | plain | skip → (descend_and_step) → idle
        self._views = None        # the views the perturbation was written into (restored from them)
        self._stats: dict = {}
        self.last_stats: dict = {}

    # ---- the protocol ------------------------------------------------------------------------

    @property
    def perturbed(self) -> bool:
        """Whether the weights are at w + e now (between a True :meth:`ascend` and the restore)."""
        return self._phase == "perturbed"

    @staticmethod
    def rng_state() -> dict:
        """The RNG state to pass to :meth:`ascend` (taken before pass 1) so pass 2 draws the same
        dropout masks: then ρ = 0 is the base optimizer bit for bit."""
        return rng_state()

    def _reduce(self, loss, local_bad: int) -> tuple[float, int]:
        """All ranks' [Σ loss, Σ non-finite] in one all-reduce (the same call on every rank)."""
        if loss is None:
            loss_t = torch.zeros((), dtype=torch.float64)
        else:
            loss_t = torch.as_tensor(loss).detach().to(torch.float64).reshape(())
            local_bad += int(not bool(torch.isfinite(loss_t)))
        total, bad = global_sums([loss_t, torch.tensor(float(local_bad))], self.backend.world_group).tolist()
        return total, int(bad)

    def ascend(self, loss=None, *, rng_state: dict | None = None, fisher_scores: list[torch.Tensor] | None = None) -> bool:
        """After pass 1's backward(s): check g on every rank, then (at a perturbing step) refresh
        the mask if due, write w ← w + e into the shards, make it visible to the next forward and
        zero the gradients.

        Args:
            loss: this rank's pass-1 loss (optional): included in the non-finite check, and its
                sum over ranks reported as ``loss_sum`` (``loss``: the mean over ranks).
            rng_state: :meth:`rng_state` taken before pass 1; replayed here, after the
                perturbation, so pass 2 draws the same random numbers.
            fisher_scores: the 'empirical' Fisher per eligible view (the CLI's step only).

        Returns:
            True: w + e is in place, run pass 2 over the same micro-batches, then
            :meth:`descend_and_step`. False: no pass 2 this step -- a plain step (``interval``),
            or a non-finite g or loss on some rank (then the step is skipped on every rank);
            call :meth:`descend_and_step` directly, without zeroing the gradients.
        """
        if self._phase != "idle":
            raise FSAMUsageError("FSAMOptimizer.ascend() called twice: call descend_and_step() after pass 2 first")
        if not self.backend.at_boundary():
            raise FSAMUsageError("FSAMOptimizer.ascend(): pass 1's last backward was not at a gradient-accumulation "
                                 "boundary, so the gradients are not reduced yet; with DeepSpeed call "
                                 "engine.set_gradient_accumulation_boundary(True) before the last micro-batch's "
                                 "engine.backward (or use gradient_accumulation_steps: 1)")
        views = self.backend.views()
        local_bad = count_nonfinite([v.grad for v in views]) + (count_nonfinite(fisher_scores) if fisher_scores else 0)
        loss_sum, bad = self._reduce(loss, local_bad)
        fsam = self.fsam
        self._stats = {"skipped": 0, "perturbed": 0}
        if loss is not None:
            self._stats["loss_sum"] = loss_sum
        if bad:
            self._phase = "skip"
            return False
        if fsam is None or not fsam.perturbs_at(self.step_count):
            if fsam is not None and fsam.reuse_direction:
                self._stats.update(fsam.reuse(views, self.backend.group))
            self._phase = "plain"
            return False
        try:
            self._phase = "perturbed"
            # The restore reads each view's key and weights only (core.fsam.restore). Kept with
            # their pass-1 gradients, the views would hold g₁ alive through pass 2 once zero_grad
            # drops it: a full copy of the local gradient on every backend whose zero_grad frees
            # gradients (one process, DDP, FSDP). ``grad=weights`` only fills the field.
            self._views = [replace(v, grad=v.weights) for v in views]
            self._stats.update(fsam.ascend(views, self.step_count, self.backend.group, scores=fisher_scores))
            self._stats["perturbed"] = 1
            self.backend.publish(restored=False)
        except BaseException:
            self.cancel()
            raise
        self.backend.zero_grad()
        if rng_state is not None:
            set_rng_state(rng_state)
        return True

    def _restore(self) -> None:
        """w ← w − e exactly (the saved values) and make it visible; a no-op unless perturbed."""
        if self._phase == "perturbed":
            views, self._views = self._views, None
            self._phase = "restored"
            self.fsam.descend(views)
            self.backend.publish(restored=True)

    def cancel(self) -> None:
        """Undo a pending step without stepping: restore w if perturbed, drop the gradients. For
        an exception between :meth:`ascend` and :meth:`descend_and_step` (the step counter does
        not advance)."""
        try:
            self._restore()
        finally:
            self._views, self._phase = None, "idle"
            self.backend.zero_grad()

    def descend_and_step(self, loss=None) -> dict:
        """After pass 2 (or right after an :meth:`ascend` that returned False): w ← w − e exactly,
        the all-reduced non-finite check of g₂ (a bad one skips the step on every rank), clip to
        ``clip_grad_norm`` (global norm), base optimizer step (+ scheduler), zero the gradients.

        Args:
            loss: this rank's pass-2 loss (optional): in the non-finite check; its sum over ranks
                is reported as ``perturbed_loss_sum``.

        Returns:
            Statistics: ``skipped`` (1 if the step was skipped), ``perturbed`` (1 if w + e was
            used), ``grad_norm`` (pass-1 ‖g‖ at a perturbed step), ``perturbation_norm`` (‖e‖),
            ``mask_density``/``mask_refreshed``/``mask_jaccard`` at a refresh, ``clip_grad_norm``
            (global norm of the stepped gradient before clipping), ``loss``/``perturbed_loss``
            (means over ranks of the losses passed), ``sharpness`` (their difference), ...
        """
        if self._phase == "idle":
            raise FSAMUsageError("FSAMOptimizer.descend_and_step() without ascend(): call ascend() after pass 1")
        stats, phase = self._stats, self._phase
        try:
            if phase == "perturbed":
                # g₂ is read where pass 2 left it, before the restore republishes the weights.
                local_bad = count_nonfinite([v.grad for v in self.backend.views()])
                self._restore()
                loss_sum, bad = self._reduce(loss, local_bad)
                if loss is not None:
                    stats["perturbed_loss_sum"] = loss_sum
                if bad:
                    phase = "skip"
                elif self.fsam.reuse_direction:
                    stats.update(self.fsam.look(self.backend.views(), self.backend.group))
            if phase == "skip":
                stats["skipped"] = 1
                self.backend.zero_grad()
            else:
                stats["clip_grad_norm"] = self.backend.clip_and_step(self.clip_grad_norm)
        except BaseException:
            self.cancel()
            raise
        self._phase = "idle"
        self.step_count += 1
        world = dist.get_world_size() if self.backend.world_group is None and dist.is_available() \
            and dist.is_initialized() else 1
        for key, total in (("loss", "loss_sum"), ("perturbed_loss", "perturbed_loss_sum")):
            if total in stats:
                stats[key] = stats[total] / world
        if "loss" in stats and "perturbed_loss" in stats:
            stats["sharpness"] = stats["perturbed_loss"] - stats["loss"]
        self.last_stats = stats
        return stats

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Both passes: ``closure()`` zeroes the gradients, runs forward and backward and returns
        the loss; it is called once, or twice at a perturbing step (same RNG state with
        ``same_dropout``). Returns pass 1's loss; the statistics are in :attr:`last_stats`."""
        if closure is None:
            raise FSAMUsageError("FSAMOptimizer.step() needs a closure (zero_grad + forward + backward, returning the "
                                 "loss); or call ascend() and descend_and_step() around your own passes")
        rng = rng_state() if self.same_dropout else None
        with torch.enable_grad():
            loss = closure()
        perturbing = self.ascend(loss=loss, rng_state=rng)
        second = None
        if perturbing:
            try:
                with torch.enable_grad():
                    second = closure()
            except BaseException:
                self.cancel()
                raise
        self.descend_and_step(loss=second)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients where the backend keeps them (DeepSpeed's buffers included)."""
        self.backend.zero_grad()

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's FSAM state: the mask shards, the step counter, LookSAM's buffer (CPU
        tensors). Save one per rank; the base optimizer/engine state is saved the usual way."""
        if self._phase != "idle":
            raise FSAMUsageError("FSAMOptimizer.state_dict() in the middle of a step (between ascend() and "
                                 "descend_and_step()): save before ascend() or after descend_and_step()")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return {"step_count": self.step_count, "rank": rank, "world_size": world,
                "fsam": None if self.fsam is None else moved_to(self.fsam.state_dict(), torch.device("cpu"))}

    @staticmethod
    def merge_state_dicts(states: list[dict]) -> dict:
        """Every rank's :meth:`state_dict` of one save (any order) as one state that
        :meth:`load_state_dict` accepts on any rank at any world size: the FSAM state by global
        position (:mod:`fsam_dist.core.reshard`), cut for the loading rank's shards at its next step.
        (The base optimizer / engine state is resharded the backend's way, e.g. DCP or DeepSpeed's
        universal checkpoint.)"""
        from .core.reshard import merge_states

        worlds = {s["world_size"] for s in states}
        if len(worlds) != 1 or sorted(s["rank"] for s in states) != list(range(worlds.copy().pop())):
            raise FSAMUsageError("FSAMOptimizer.merge_state_dicts(): pass the state_dict() of every rank of one "
                                 f"save, got ranks {sorted(s['rank'] for s in states)} of world sizes {sorted(worlds)}")
        steps = {s["step_count"] for s in states}
        if len(steps) != 1:
            raise FSAMUsageError(f"FSAMOptimizer.merge_state_dicts(): the ranks are at different steps {sorted(steps)}")
        fsam = [s["fsam"] for s in states]
        if any(f is None for f in fsam) and not all(f is None for f in fsam):
            raise FSAMUsageError("FSAMOptimizer.merge_state_dicts(): some ranks saved FSAM state and others none")
        return {"step_count": steps.pop(), "rank": None, "world_size": None,
                "fsam": None if fsam[0] is None else merge_states(fsam)}

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` output saved by the same rank of a run with the same world size,
        or :meth:`merge_state_dicts` output (any rank, any world size)."""
        if self._phase != "idle":
            raise FSAMUsageError("FSAMOptimizer.load_state_dict() in the middle of a step")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if state["rank"] is not None and (state["rank"], state["world_size"]) != (rank, world):
            raise FSAMUsageError(f"FSAMOptimizer.load_state_dict(): state of rank {state['rank']} of "
                                 f"{state['world_size']}, loaded on rank {rank} of {world}: the mask is sharded, "
                                 "load each rank's own state at the same world size, or all ranks' states merged "
                                 "with FSAMOptimizer.merge_state_dicts() at any world size")
        self.step_count = int(state["step_count"])
        if self.fsam is not None and state["fsam"] is not None:
            device = next(self.backend.model.parameters()).device
            self.fsam.load_state_dict(moved_to(state["fsam"], device))


def moved_to(obj, device: torch.device | str = "cpu"):
    """``obj`` (nested dicts, lists, tuples) with every tensor moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: moved_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(moved_to(v, device) for v in obj)
    return obj
