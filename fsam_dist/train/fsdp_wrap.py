"""Wrapping an unwrapped model with FSDP1 or FSDP2 and building its adapter (set-up, not adapter work).

:func:`wrap_fsdp` wraps each transformer block as its own FSDP unit and the root (that alone:
:func:`shard_model`), builds the
optimizer on the sharded parameters (a :class:`ShardedParams`, which answers
``named_parameters()`` with the unwrapped names, so name-based parameter groups work) and returns
the :class:`~fsam_dist.shards.fsdp.FSDPBackend` of the result. What ``accelerate launch`` asks
for is read by :mod:`fsam_dist.train.fsdp_setup`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..core import DEFAULT_EXCLUDE
from ..shards.fsdp import FSDP1_STRATEGIES, FSDPBackend
from ..shards.fsdp1 import clean_name

DEFAULT_WRAP_CLASSES = ("T5Block", "BartEncoderLayer", "BartDecoderLayer")
"""Transformer block classes wrapped as their own FSDP unit (when present in the model)."""

MIXED_PRECISION = (None, "bf16")


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


def wrap_classes_present(model: nn.Module, wrap_classes: Iterable[str] | None) -> set[type]:
    """The module classes to wrap as units: ``wrap_classes`` that occur in ``model`` (at least one
    must), or by default :data:`DEFAULT_WRAP_CLASSES` that occur (else ``_no_split_modules``)."""
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


def wrap_fsdp1(model: nn.Module, wrap: set[type], strategy: str, mixed_precision: str | None, cpu_offload: bool,
               device: torch.device, from_rank0: bool = False) -> nn.Module:
    """``FullyShardedDataParallel`` with ``use_orig_params=True``, each ``wrap`` block a unit.
    ``from_rank0``: rank 0's values are kept aside (:func:`_take_rank0_values`), every rank's
    meta-device modules are materialised unit by unit (:func:`materialize_keeping_ties`), then
    :func:`broadcast_fsdp1_units` fills each unit from rank 0 (FSDP1's own ``sync_module_states``
    refuses CPU modules), so no rank other than 0 ever holds more than one unit in full."""
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    mp = None
    if mixed_precision == "bf16":
        mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)   # buffers stay fp32, as FSDP2
    full = _take_rank0_values(model) if from_rank0 else None
    wrapped = FSDP(model, sharding_strategy=ShardingStrategy[strategy],
                   auto_wrap_policy=ModuleWrapPolicy(wrap) if wrap else None, mixed_precision=mp,
                   cpu_offload=CPUOffload(offload_params=True) if cpu_offload else None,
                   use_orig_params=True, device_id=device,
                   param_init_fn=materialize_keeping_ties(device) if from_rank0 else None)
    if from_rank0:
        broadcast_fsdp1_units(wrapped, full, device)
    return wrapped


def wrap_fsdp2(model: nn.Module, wrap: set[type], reshard_after_forward: bool, mixed_precision: str | None,
               cpu_offload: bool, device: torch.device, from_rank0: bool = False) -> nn.Module:
    """``fully_shard`` each ``wrap`` block (children before parents), then the root.
    ``from_rank0``: rank 0's values are kept aside and its module moved to the meta device like
    the others' (:func:`_take_rank0_values`), every rank shards the meta module and allocates its shards (``to_empty``), then
    :func:`broadcast_into_shards` fills them from rank 0, one tensor at a time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    full = _take_rank0_values(model) if from_rank0 else None
    if not from_rank0 and device.type != "cpu":
        model.to(device)
    for module in reversed(list(model.modules())):
        if module is not model and type(module) in wrap:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    if from_rank0:
        model.to_empty(device="cpu" if cpu_offload else device)
        broadcast_into_shards(model, full, device)
    return model


def _take_rank0_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0: its parameters and buffers by name (each tied parameter once), its module moved to
    the meta device like the other ranks' (ties kept), so they live on only in the returned dict
    and are freed as they are sent. Other ranks: {}."""
    if dist.get_rank() != 0:
        return {}
    full = {name: t.detach() for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    to_meta = materialize_keeping_ties(torch.device("meta"), only_meta=False)
    for module in model.modules():
        to_meta(module)
    return full


def materialize_keeping_ties(device: torch.device, only_meta: bool = True) -> Callable[[nn.Module], None]:
    """FSDP1's ``param_init_fn`` for meta-device modules: give this module's own parameters and
    buffers uninitialised storage on ``device`` (rank 0's values are broadcast afterwards); a
    parameter shared by several modules (T5's ``shared`` / ``embed_tokens`` / ``lm_head``) gets one
    new parameter, so the ties survive (``Module.to('meta')`` / ``to_empty`` would untie them).
    ``only_meta=False`` replaces every tensor (rank 0 moving its model to the meta device)."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def materialize(module: nn.Module) -> None:
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is None or (only_meta and not t.is_meta):
                    continue
                if id(t) not in made:
                    new = torch.empty_like(t, device=device)
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    made[id(t)] = (t, new)   # the meta tensor stays referenced, so its id is not reused
                table[name] = made[id(t)][1]

    return materialize


@torch.no_grad()
def broadcast_fsdp1_units(wrapped: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Fill an FSDP1 model built from meta modules with rank 0's values ``full`` (empty on other
    ranks): per unit, unshard its flat parameter alone (``summon_full_params(recurse=False,
    writeback=True)``), let rank 0 copy its values into the unit's parameters, broadcast the flat
    parameter from rank 0 and write each rank's slice back to its shard; then every buffer (FSDP1
    does not shard buffers). Peak: one unit in full. ``handle.flat_param._params`` is FSDP1
    internals (the adapter's version guard, shards/fsdp1.py, covers them)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank = dist.get_rank()
    for prefix, unit in wrapped.named_modules():
        handle = getattr(unit, "_handle", None) if isinstance(unit, FSDP) else None
        if handle is None:
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=True):
            own = {id(p) for p in handle.flat_param._params}
            if rank == 0:
                for name, param in unit.named_parameters():
                    if id(param) in own:
                        param.copy_(full.pop(clean_name(f"{prefix}.{name}" if prefix else name)))
            moved = handle.flat_param.data.to(device)
            dist.broadcast(moved, src=0)
            if moved is not handle.flat_param.data:
                handle.flat_param.data.copy_(moved)
    for name, buffer in wrapped.named_buffers():
        moved = full.pop(clean_name(name)).to(device) if rank == 0 else buffer.data.to(device)
        dist.broadcast(moved, src=0)
        buffer.data.copy_(moved)


@torch.no_grad()
def broadcast_into_shards(model: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Fill a ``fully_shard``-ed model's allocated shards and buffers from rank 0's full tensors
    ``full`` (empty on other ranks): one broadcast per tensor, in ``named_parameters`` then
    ``named_buffers`` order (each tied parameter once), every rank keeping its own slice. Rank 0
    drops each full tensor once sent, so its peak stays one model plus the shards written so far."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    rank = dist.get_rank()
    for name, target in list(model.named_parameters()) + list(model.named_buffers()):
        local = target.to_local() if isinstance(target, DTensor) else target
        if rank == 0:
            source = full.pop(name)
            if tuple(source.shape) != tuple(target.shape):
                raise RuntimeError(f"wrap_fsdp(from_rank0): {name} has shape {tuple(source.shape)} on rank 0 "
                                   f"but {tuple(target.shape)} in the sharded model")
            value = source.to(device=device, dtype=target.dtype)
            del source
        else:
            value = torch.empty(target.shape, dtype=target.dtype, device=device)
        dist.broadcast(value, src=0)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None).to_local()
        local.copy_(value)
        del value


def shard_model(model: nn.Module, version: int = 2, *, sharding_strategy: str = "FULL_SHARD",
                reshard_after_forward: bool = True, wrap_classes: Iterable[str] | None = None,
                mixed_precision: str | None = None, cpu_offload: bool = False, sync_module_states: bool = False,
                device: torch.device | None = None, from_rank0: bool = False) -> nn.Module:
    """Only the wrapping of :func:`wrap_fsdp` (same arguments, same checks), without the adapter:
    for a training loop that builds its optimizer on the result itself (the Hugging Face Trainer,
    :mod:`fsam_dist.integrations.transformers`). Tied parameters stay one parameter. FSDP2 shards
    ``model`` in place and returns it; FSDP1 returns the ``FullyShardedDataParallel`` root."""
    # Every argument check comes before the first collective, so every rank raises together.
    if version not in (1, 2):
        raise ValueError(f"wrap_fsdp: version must be 1 or 2, got {version!r}")
    if sharding_strategy not in FSDP1_STRATEGIES:
        raise ValueError(f"wrap_fsdp: sharding_strategy must be one of {FSDP1_STRATEGIES}, got {sharding_strategy!r}")
    if version == 2 and sharding_strategy != "FULL_SHARD":
        raise ValueError("wrap_fsdp: sharding_strategy is an FSDP1 setting; FSDP2 takes reshard_after_forward")
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"wrap_fsdp: mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_fsdp needs an initialised torch.distributed process group")
    if any(clean_name(n) != n for n, _ in model.named_parameters()):
        raise ValueError("wrap_fsdp: pass the unwrapped model; it is wrapped here")
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                  else torch.device("cpu"))
    if cpu_offload and device.type == "cpu":
        raise ValueError("wrap_fsdp: cpu_offload needs a GPU compute device (on CPU there is nothing to "
                         "offload from); set fsdp_offload_params: false")
    wrap = wrap_classes_present(model, wrap_classes)
    if sync_module_states and not from_rank0:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                moved = t.data.to(device)
                dist.broadcast(moved, src=0)
                t.data.copy_(moved)
    return (wrap_fsdp1(model, wrap, sharding_strategy, mixed_precision, cpu_offload, device, from_rank0)
            if version == 1 else
            wrap_fsdp2(model, wrap, reshard_after_forward, mixed_precision, cpu_offload, device, from_rank0))


def wrap_fsdp(model: nn.Module, version: int = 2,
              optimizer_factory: Callable[[ShardedParams], torch.optim.Optimizer] | None = None,
              scheduler_factory: Callable[[torch.optim.Optimizer], object] | None = None, *,
              sharding_strategy: str = "FULL_SHARD", reshard_after_forward: bool = True,
              wrap_classes: Iterable[str] | None = None, mixed_precision: str | None = None,
              cpu_offload: bool = False, sync_module_states: bool = False, from_rank0: bool = False,
              exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDE, device: torch.device | None = None,
              adapter: type[FSDPBackend] = FSDPBackend) -> FSDPBackend:
    """Wrap ``model`` with FSDP ``version`` 1 (``use_orig_params=True``) or 2 (``fully_shard``)
    over the default process group and return its adapter.

    Args:
        model: the *unwrapped* module, identical on every rank (or pass ``sync_module_states``).
        version: 1 or 2.
        optimizer_factory: ``optimizer_factory(params)`` → optimizer, called after wrapping with
            the sharded parameters (a :class:`ShardedParams`).
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
        from_rank0: only rank 0's model holds the weights (the others may be on the meta device,
            built with the same ties): each rank allocates only its shards and receives rank 0's
            values by broadcast, unit by unit (FSDP1) or tensor by tensor (FSDP2); buffers,
            non-persistent ones included, come from rank 0 too (``train/loading.py``).
        exclude: regexes of parameter names the Fisher mask does not apply to.
        device: compute device; default: the current CUDA device under NCCL, else CPU.
        adapter: the adapter class (a subclass, for instrumented tests).
    """
    if optimizer_factory is None:   # before the first collective, so every rank raises together
        raise ValueError("wrap_fsdp: optimizer_factory is required (the optimizer must be built on the "
                         "sharded parameters, after wrapping)")
    wrapped = shard_model(model, version, sharding_strategy=sharding_strategy,
                          reshard_after_forward=reshard_after_forward, wrap_classes=wrap_classes,
                          mixed_precision=mixed_precision, cpu_offload=cpu_offload,
                          sync_module_states=sync_module_states, device=device, from_rank0=from_rank0)
    backend = adapter(wrapped, optimizer=None, exclude=exclude)
    backend.optimizer = optimizer_factory(ShardedParams(backend.named_parameters()))
    backend.scheduler = scheduler_factory(backend.optimizer) if scheduler_factory is not None else None
    return backend
