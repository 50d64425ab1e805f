"""PyTorch FSDP: FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``) and FSDP2 (``fully_shard``).

Where the local shards live after a backward at the accumulation boundary: :mod:`.fsdp1`
(``FlatParameter`` shards, private internals under a version guard) and :mod:`.fsdp2`
(``DTensor`` row blocks). ``NO_SHARD`` (FSDP1) keeps full, replicated parameters and all-reduced
gradients: the group is then :data:`~fsam_dist.core.REPLICATED`.

Both versions average gradients over ranks, so ``loss_multiplier`` is the world size. Tied
parameters (T5's ``shared.weight`` = ``lm_head.weight`` = ``*.embed_tokens.weight``) stay one
parameter under both versions; it is listed once, under its first name in the unwrapped module's
``named_parameters()``, exactly as :class:`~fsam_dist.shards.local.LocalBackend` lists it.

The perturbation is written in place into the local shard. FSDP re-gathers the shard at the next
forward *if* the unsharded parameters were freed; :meth:`FSDPBackend.publish` frees any that are
still gathered (FSDP1 ``SHARD_GRAD_OP``/``NO_SHARD``, FSDP2 ``reshard_after_forward=False``, or
anything that unsharded them since), so pass 2 always computes at ``w + e``.

The settings ``accelerate launch`` passes in ``FSDP_*`` variables are read by
:mod:`fsam_dist.train.fsdp_setup`.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..core import DEFAULT_EXCLUDE, REPLICATED, ShardView, global_positions, global_sums, is_eligible
from .base import Backend, LossFn
from .fsdp1 import FSDP1Shards, clean_name, wrap_fsdp1
from .fsdp2 import FSDP2Shards, wrap_fsdp2

DEFAULT_WRAP_CLASSES = ("T5Block", "BartEncoderLayer", "BartDecoderLayer")
"""Transformer block classes wrapped as their own FSDP unit (when present in the model)."""

FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
MIXED_PRECISION = (None, "bf16")


def _wrap_class_set(model: nn.Module, wrap_classes: Iterable[str] | None) -> set[type]:
    present = {type(m).__name__: type(m) for m in model.modules()}
    if wrap_classes is None:
        names = [n for n in DEFAULT_WRAP_CLASSES if n in present]
        if not names:
            names = [n for n in (getattr(model, "_no_split_modules", None) or []) if n in present]
        return {present[n] for n in names}
    wrap_classes = list(wrap_classes)
    found = [n for n in wrap_classes if n in present]
    if wrap_classes and not found:
        # One list may serve several architectures (T5Block,BartEncoderLayer,...): those that occur
        # are wrapped, but a list matching nothing is a mistake (the model would be one FSDP unit).
        raise ValueError(f"FSDP wrap classes {wrap_classes} (fsdp_transformer_layer_cls_to_wrap): none is in the "
                         f"model, whose module classes are {sorted(present)[:30]}")
    return {present[n] for n in found}


class ShardedParams(list):
    """What ``optimizer_factory`` receives: the list of sharded trainable parameters (each tied
    parameter once) -- pass it to an optimizer as is -- which also answers ``named_parameters()``
    with the unwrapped module's names, so name-based parameter groups (no weight decay on biases
    and layer norms, ...) can be built from it like from a module."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__(p for _, p in named)
        self._named = list(named)

    def named_parameters(self, *args, **kwargs):
        return iter(self._named)

    def parameters(self, *args, **kwargs):
        return iter(list(self))


class FSDPBackend(Backend):
    """FSDP1 (``use_orig_params=True``) or FSDP2 (``fully_shard``) over the default process group.

    Args:
        model: the *unwrapped* module, identical on every rank (or pass ``sync_module_states``).
            It is wrapped here: each instance of a ``wrap_classes`` block becomes an FSDP unit,
            and the root gets wrapped too.
        version: 1 or 2.
        optimizer_factory: ``optimizer_factory(params)`` → optimizer, called after wrapping with
            the sharded parameters (a :class:`ShardedParams`: a list in ``named_parameters()``
            order, tied parameters once, that also has ``named_parameters()``).
        scheduler_factory: ``scheduler_factory(optimizer)`` → LR scheduler, or None.
        sharding_strategy: FSDP1: 'FULL_SHARD', 'SHARD_GRAD_OP' or 'NO_SHARD'.
        reshard_after_forward: FSDP2: free the gathered parameters after each forward.
        wrap_classes: class names of the blocks to wrap (those that occur in the model; at least
            one must); None = :data:`DEFAULT_WRAP_CLASSES` that occur in the model (else its
            ``_no_split_modules``); () = the root only.
        mixed_precision: None or 'bf16' (FSDP's own policy: bf16 compute copies of the fp32
            shards, fp32 gradient reduction; the perturbation is applied to the fp32 shards).
        cpu_offload: offload the sharded parameters and gradients to CPU (needs a GPU).
        sync_module_states: broadcast rank 0's parameters and buffers before wrapping.
        exclude: regexes of parameter names the Fisher mask does not apply to.
        device: compute device; default: the current CUDA device under NCCL, else CPU.
    """

    def __init__(self, model: nn.Module, version: int = 2,
                 optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                 scheduler_factory: Callable[[torch.optim.Optimizer], object] | None = None, *,
                 sharding_strategy: str = "FULL_SHARD", reshard_after_forward: bool = True,
                 wrap_classes: Iterable[str] | None = None, mixed_precision: str | None = None,
                 cpu_offload: bool = False, sync_module_states: bool = False,
                 exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDE, device: torch.device | None = None) -> None:
        # Every argument check comes before the first collective, so every rank raises together.
        if version not in (1, 2):
            raise ValueError(f"FSDPBackend: version must be 1 or 2, got {version!r}")
        if optimizer_factory is None:
            raise ValueError("FSDPBackend: optimizer_factory is required (the optimizer must be built on the "
                             "sharded parameters, after wrapping)")
        if sharding_strategy not in FSDP1_STRATEGIES:
            raise ValueError(f"FSDPBackend: sharding_strategy must be one of {FSDP1_STRATEGIES}, "
                             f"got {sharding_strategy!r}")
        if version == 2 and sharding_strategy != "FULL_SHARD":
            raise ValueError("FSDPBackend: sharding_strategy is an FSDP1 setting; FSDP2 takes reshard_after_forward")
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"FSDPBackend: mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("FSDPBackend needs an initialised torch.distributed process group")
        if isinstance(model, nn.Module) and any(clean_name(n) != n for n, _ in model.named_parameters()):
            raise ValueError("FSDPBackend: pass the unwrapped model; it is wrapped here")
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                      else torch.device("cpu"))
        if cpu_offload and device.type == "cpu":
            raise ValueError("FSDPBackend: cpu_offload needs a GPU compute device (on CPU there is nothing to "
                             "offload from); set fsdp_offload_params: false")
        wrap = _wrap_class_set(model, wrap_classes)

        self.mixed_precision, self.cpu_offload = mixed_precision, bool(cpu_offload)
        self.sharding_strategy = sharding_strategy if version == 1 else None
        self.reshard_after_forward = bool(reshard_after_forward)
        self.version, self.device = version, device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if sync_module_states:
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    moved = t.data.to(device)
                    dist.broadcast(moved, src=0)
                    t.data.copy_(moved)
        wrapped = (wrap_fsdp1(model, wrap, sharding_strategy, mixed_precision, cpu_offload, device) if version == 1
                   else wrap_fsdp2(model, wrap, reshard_after_forward, mixed_precision, cpu_offload, device))
        self._attach(wrapped, version, exclude)
        self.optimizer = optimizer_factory(ShardedParams(self.named_parameters()))
        self.scheduler = scheduler_factory(self.optimizer) if scheduler_factory is not None else None
        self._check_coverage()

    @classmethod
    def from_wrapped(cls, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                     exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDE) -> "FSDPBackend":
        """The adapter of a model the caller already wrapped: an FSDP1 ``FullyShardedDataParallel``
        root (``use_orig_params=True``) or an FSDP2 ``fully_shard``-ed root, with its optimizer
        (built on the wrapped model's parameters) and scheduler."""
        from torch.distributed.fsdp import FSDPModule, ShardingStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("FSDPBackend needs an initialised torch.distributed process group")
        backend = cls.__new__(cls)
        if isinstance(model, FSDP):
            if not getattr(model, "_use_orig_params", False):
                raise ValueError("FSAM with FSDP1 needs FullyShardedDataParallel(..., use_orig_params=True): without "
                                 "it the original parameters are not views of the shards FSAM reads and perturbs")
            strategy = model.sharding_strategy
            if strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP,
                                ShardingStrategy.NO_SHARD):
                raise ValueError(f"FSAM with FSDP1: sharding_strategy {strategy.name} is not supported; use one of "
                                 f"{FSDP1_STRATEGIES}")
            version, backend.sharding_strategy = 1, strategy.name
            backend.device = model.compute_device
        elif isinstance(model, FSDPModule):
            version, backend.sharding_strategy = 2, None
            backend.device = next(model.parameters()).device
        else:
            raise TypeError(f"FSDPBackend.from_wrapped: {type(model).__name__} is neither an FSDP1 "
                            "FullyShardedDataParallel nor an FSDP2 fully_shard-ed module")
        backend.version, backend.mixed_precision, backend.cpu_offload = version, None, False
        backend.reshard_after_forward = True
        backend.rank, backend.world_size = dist.get_rank(), dist.get_world_size()
        backend._attach(model, version, exclude)
        backend.optimizer, backend.scheduler = optimizer, scheduler
        backend._check_coverage()
        return backend

    def _attach(self, wrapped: nn.Module, version: int, exclude) -> None:
        """Index the wrapped model: canonical names (tied parameters once, under their first name
        in ``named_parameters()``), full sizes, global positions and the local shards."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if version == 1:   # the original parameters are 1-D shard views: sizes from the flat parameters
            numels = {id(p): n for state in FSDP.fsdp_modules(wrapped) if state._handle is not None
                      for p, n in zip(state._handle.flat_param._params, state._handle.flat_param._numels)}
        else:              # DTensors report their global size
            numels = {id(p): p.numel() for p in wrapped.parameters()}
        self.version = version
        self.world_group = None
        self.loss_multiplier = float(self.world_size)   # FSDP1 and FSDP2 both average over ranks
        self.replicated = version == 1 and self.sharding_strategy == "NO_SHARD"
        self.group = REPLICATED if self.replicated else None
        self._model = self.module = wrapped
        canonical_by_id: dict[int, str] = {}
        for name, p in wrapped.named_parameters():
            canonical_by_id[id(p)] = clean_name(name)
        self._canonical = {clean_name(n): canonical_by_id[id(p)]
                           for n, p in wrapped.named_parameters(remove_duplicate=False)}
        try:
            self.trainable = [(clean_name(n), numels[id(p)]) for n, p in wrapped.named_parameters() if p.requires_grad]
        except KeyError:
            raise RuntimeError("FSDPBackend: a trainable parameter is outside every FSDP unit (ignored modules are "
                               "not supported)") from None
        self.positions = global_positions(self.trainable)
        self.eligible = {n: is_eligible(n, exclude) for n, _ in self.trainable}
        self.total_numel = sum(n for _, n in self.trainable)
        self._index_pieces()

    def _check_coverage(self) -> None:
        """Disjoint and complete: every trainable entry owned by exactly one rank (or by all under
        NO_SHARD). One all-reduce, the same on every rank."""
        owned = sum(n for _, _, n in self.local_pieces())
        total = float(global_sums([torch.tensor(float(owned))], None if not self.replicated else REPLICATED)[0])
        if int(total) != self.total_numel:
            raise RuntimeError(f"FSDPBackend: local shards cover {int(total)} entries over all ranks, the model "
                               f"has {self.total_numel} trainable entries (shard offsets misread?)")

    def _index_pieces(self) -> None:
        """Map every trainable parameter to where its local shard lives."""
        if self.version == 2:
            self.shards = FSDP2Shards(self.named_parameters(), self.positions, self.eligible, self.rank,
                                      self.world_size)
        else:
            self.shards = FSDP1Shards(self._model, self._canonical, self.positions, self.eligible)

    @property
    def _fsdp1_handles(self) -> list:
        return self.shards.handles

    # ---- what the step needs ---------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self._model

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The wrapped model's trainable parameters (sharded), each once, under the unwrapped name."""
        out, seen = [], set()
        for n, p in self._model.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            out.append((self._canonical[clean_name(n)], p))
        return out

    def local_pieces(self) -> list[tuple[str, int, int]]:
        """(name, offset within the flattened parameter, numel) of every piece this rank owns."""
        return self.shards.pieces()

    def forward_backward(self, loss_fn: LossFn, micro_batch: dict, scale: float, last: bool) -> torch.Tensor:
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in micro_batch.items()}
        # Non-boundary micro-batches accumulate unreduced gradients; the boundary one reduces.
        with self.shards.sync(self._model, last), warnings.catch_warnings():
            # T5/BART blocks return views; FSDP2 warns that an in-place op on such an output would
            # skip its pre-backward hook. These models never do that (the parity tests check).
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            loss_sum = loss_fn(self._model, batch)
            (loss_sum * scale).backward()
        return loss_sum.detach()

    def views(self) -> list[ShardView]:
        return self.shards.views()

    def publish(self, restored: bool) -> None:
        """Free every gathered (unsharded) parameter copy, so the next forward all-gathers the
        shards as they are now. A no-op where everything is already sharded (FULL_SHARD, and
        every strategy after a synchronised backward)."""
        self.shards.publish(self._model)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ---- checkpoints -----------------------------------------------------------------------

    def save_state(self, path: str) -> None:
        """Sharded model + optimizer state with ``torch.distributed.checkpoint`` into directory
        ``path`` (every rank writes its shards; loadable at another world size), and the
        scheduler's state (identical on every rank) as ``path/scheduler.pt`` from rank 0.
        Collective: every rank calls it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self._model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)
        if self.rank == 0 and self.scheduler is not None:
            torch.save(self.scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
        dist.barrier()

    def load_state(self, path: str, saved_world_size: int | None = None) -> None:
        """Load what :meth:`save_state` wrote (collective), at any world size: DCP reads the
        shards this rank now owns from whichever files hold them (``saved_world_size`` needs
        nothing else; the scheduler state is the same on every rank)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self._model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self._model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if self.scheduler is not None:
            scheduler_file = os.path.join(path, "scheduler.pt")
            if not os.path.exists(scheduler_file):
                raise FileNotFoundError(f"{scheduler_file}: checkpoint has no scheduler state")
            self.scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The consolidated (unsharded) model state dict on rank 0, on CPU, under the unwrapped
        module's names; None on other ranks. Collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload=True means rank0_only and an offload to CPU; with the parameters already on
        # CPU, FSDP1 (torch 2.13) then segfaults cloning freed storage. On CPU every rank
        # assembles the full dict instead (it costs no device memory) and only rank 0 keeps it.
        offload = self.device.type != "cpu"
        sd = get_model_state_dict(self._model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        return sd if self.rank == 0 else None
