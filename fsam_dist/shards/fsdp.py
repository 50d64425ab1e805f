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

Wrapping a plain model is set-up, in :mod:`fsam_dist.train.fsdp_wrap`; the settings ``accelerate
launch`` passes in ``FSDP_*`` variables are read by :mod:`fsam_dist.train.fsdp_setup`.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from ..core import DEFAULT_EXCLUDE, REPLICATED, ShardView, global_positions, global_sums, is_eligible
from .base import Backend, LossFn
from .fsdp1 import FSDP1Shards, clean_name
from .fsdp2 import FSDP2Shards

FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


class FSDPBackend(Backend):
    """The adapter of an FSDP1 ``FullyShardedDataParallel`` root (``use_orig_params=True``) or
    an FSDP2 ``fully_shard``-ed root over the default process group.

    Args:
        model: the wrapped root (to wrap a plain model: :func:`fsam_dist.train.fsdp_wrap.wrap_fsdp`).
        optimizer: the optimizer over the wrapped model's parameters.
        scheduler: its LR scheduler, or None.
        exclude: regexes of parameter names the Fisher mask does not apply to.
        device: where the forward computes; default: FSDP1's compute device, FSDP2's parameters' device.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler=None,
                 exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDE, device: torch.device | None = None) -> None:
        from torch.distributed.fsdp import FSDPModule, ShardingStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("FSDPBackend needs an initialised torch.distributed process group")
        if isinstance(model, FSDP):
            if not getattr(model, "_use_orig_params", False):
                raise ValueError("FSAM with FSDP1 needs FullyShardedDataParallel(..., use_orig_params=True): without "
                                 "it the original parameters are not views of the shards FSAM reads and perturbs")
            if model.sharding_strategy not in (ShardingStrategy[s] for s in FSDP1_STRATEGIES):
                raise ValueError(f"FSAM with FSDP1: sharding_strategy {model.sharding_strategy.name} is not "
                                 f"supported; use one of {FSDP1_STRATEGIES}")
            self.version, self.sharding_strategy = 1, model.sharding_strategy.name
            self.device = device or model.compute_device
            # the original parameters are 1-D shard views: sizes from the flat parameters
            numels = {id(p): n for state in FSDP.fsdp_modules(model) if state._handle is not None
                      for p, n in zip(state._handle.flat_param._params, state._handle.flat_param._numels)}
        elif isinstance(model, FSDPModule):
            self.version, self.sharding_strategy = 2, None
            self.device = device or next(model.parameters()).device
            numels = {id(p): p.numel() for p in model.parameters()}   # DTensors report their global size
        else:
            raise TypeError(f"FSDPBackend: {type(model).__name__} is neither an FSDP1 FullyShardedDataParallel nor "
                            "an FSDP2 fully_shard-ed module (to wrap a plain model: fsam_dist.train.fsdp_wrap)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.world_group = None
        self.loss_multiplier = float(self.world_size)   # FSDP1 and FSDP2 both average over ranks
        self.replicated = self.sharding_strategy == "NO_SHARD"
        self.group = REPLICATED if self.replicated else None
        self._model = self.module = model
        # canonical names: tied parameters once, under their first name in named_parameters()
        canonical_by_id = {id(p): clean_name(n) for n, p in model.named_parameters()}
        self._canonical = {clean_name(n): canonical_by_id[id(p)]
                           for n, p in model.named_parameters(remove_duplicate=False)}
        try:
            self.trainable = [(clean_name(n), numels[id(p)]) for n, p in model.named_parameters() if p.requires_grad]
        except KeyError:
            raise RuntimeError("FSDPBackend: a trainable parameter is outside every FSDP unit (ignored modules are "
                               "not supported)") from None
        self.positions = global_positions(self.trainable)
        self.eligible = {n: is_eligible(n, exclude) for n, _ in self.trainable}
        self.total_numel = sum(n for _, n in self.trainable)
        self.shards = (FSDP1Shards(model, self._canonical, self.positions, self.eligible) if self.version == 1 else
                       FSDP2Shards(self.named_parameters(), self.positions, self.eligible, self.rank, self.world_size))
        self.optimizer, self.scheduler = optimizer, scheduler
        self._check_coverage()

    def _check_coverage(self) -> None:
        """Disjoint and complete: every trainable entry owned by exactly one rank (or by all under
        NO_SHARD). One all-reduce, the same on every rank."""
        owned = sum(n for _, _, n in self.local_pieces())
        total = float(global_sums([torch.tensor(float(owned))], None if not self.replicated else REPLICATED)[0])
        if int(total) != self.total_numel:
            raise RuntimeError(f"FSDPBackend: local shards cover {int(total)} entries over all ranks, the model "
                               f"has {self.total_numel} trainable entries (shard offsets misread?)")

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

    def load_state(self, path: str) -> None:
        """Load what :meth:`save_state` wrote (collective)."""
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
