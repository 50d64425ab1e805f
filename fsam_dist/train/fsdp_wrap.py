"""Wrapping an unwrapped model with FSDP1 or FSDP2 and building its adapter (set-up, not adapter work).

:func:`wrap_fsdp` wraps each transformer block as its own FSDP unit and the root, builds the
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
               device: torch.device) -> nn.Module:
    """``FullyShardedDataParallel`` with ``use_orig_params=True``, each ``wrap`` block a unit."""
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    mp = None
    if mixed_precision == "bf16":
        mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)   # buffers stay fp32, as FSDP2
    return FSDP(model, sharding_strategy=ShardingStrategy[strategy],
                auto_wrap_policy=ModuleWrapPolicy(wrap) if wrap else None, mixed_precision=mp,
                cpu_offload=CPUOffload(offload_params=True) if cpu_offload else None,
                use_orig_params=True, device_id=device)


def wrap_fsdp2(model: nn.Module, wrap: set[type], reshard_after_forward: bool, mixed_precision: str | None,
               cpu_offload: bool, device: torch.device) -> nn.Module:
    """``fully_shard`` each ``wrap`` block (children before parents), then the root."""
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


def wrap_fsdp(model: nn.Module, version: int = 2,
              optimizer_factory: Callable[[ShardedParams], torch.optim.Optimizer] | None = None,
              scheduler_factory: Callable[[torch.optim.Optimizer], object] | None = None, *,
              sharding_strategy: str = "FULL_SHARD", reshard_after_forward: bool = True,
              wrap_classes: Iterable[str] | None = None, mixed_precision: str | None = None,
              cpu_offload: bool = False, sync_module_states: bool = False,
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
        exclude: regexes of parameter names the Fisher mask does not apply to.
        device: compute device; default: the current CUDA device under NCCL, else CPU.
        adapter: the adapter class (a subclass, for instrumented tests).
    """
    # Every argument check comes before the first collective, so every rank raises together.
    if version not in (1, 2):
        raise ValueError(f"wrap_fsdp: version must be 1 or 2, got {version!r}")
    if optimizer_factory is None:
        raise ValueError("wrap_fsdp: optimizer_factory is required (the optimizer must be built on the "
                         "sharded parameters, after wrapping)")
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
    if sync_module_states:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                moved = t.data.to(device)
                dist.broadcast(moved, src=0)
                t.data.copy_(moved)
    wrapped = (wrap_fsdp1(model, wrap, sharding_strategy, mixed_precision, cpu_offload, device) if version == 1
               else wrap_fsdp2(model, wrap, reshard_after_forward, mixed_precision, cpu_offload, device))
    backend = adapter(wrapped, optimizer=None, exclude=exclude)
    backend.optimizer = optimizer_factory(ShardedParams(backend.named_parameters()))
    backend.scheduler = scheduler_factory(backend.optimizer) if scheduler_factory is not None else None
    return backend
