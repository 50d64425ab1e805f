"""Where FSDP1's shards live (``FullyShardedDataParallel``, ``use_orig_params=True``).

Each FSDP unit flattens its parameters into one ``FlatParameter`` and keeps a 1-D shard of it,
``flat_param._local_shard`` (fp32, also under mixed precision; the padding at the end of the last
rank's shard belongs to no parameter). ``flat_param._shard_param_infos[i]`` says which slice of
that shard is original parameter ``i`` (``offset_in_shard``, ``numel_in_shard``) and where the
slice starts inside the flattened parameter (``intra_param_start_idx``): that gives each piece's
global position. The sharded gradient is ``handle.sharded_grad``; the original parameters'
``p.grad`` (what the optimizer reads) are views of it. ``NO_SHARD`` keeps full, replicated
parameters with the same metadata (one "shard" covering the whole flat parameter). These are
private internals: :func:`check_fsdp1_internals` guards them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..core import ShardView

_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """The unwrapped module's name of a parameter of the wrapped one."""
    for prefix in _PREFIXES:
        name = name.replace(prefix, "")
    return name


TESTED_TORCH = ((2, 13), (2, 13))
"""Inclusive (major, minor) range of torch whose FSDP1 internals the adapter was checked against."""


def check_fsdp1_internals(version: str | None = None) -> None:
    """Raise unless torch ``version`` (default: the installed one) lies in :data:`TESTED_TORCH`
    and has the FSDP1 internals this adapter reads without public API: ``FlatParameter``'s
    ``_local_shard`` and ``_shard_param_infos``, and ``_runtime_utils._reshard``."""
    from torch.distributed.fsdp import _flat_param, _runtime_utils

    version = torch.__version__ if version is None else version
    try:
        major_minor = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        raise RuntimeError(f"FSDP1 adapter: cannot parse the torch version {version!r}") from None
    low, high = TESTED_TORCH
    missing = [name for name, ok in (("FlatParameter._local_shard", "_local_shard" in
                                      getattr(_flat_param.FlatParameter, "__annotations__", {})),
                                     ("FlatParameter._shard_param_infos", "_shard_param_infos" in
                                      getattr(_flat_param.FlatParameter, "__annotations__", {})),
                                     ("_runtime_utils._reshard", hasattr(_runtime_utils, "_reshard"))) if not ok]
    if not low <= major_minor <= high or missing:
        raise RuntimeError(f"the FSDP1 adapter was tested with torch {low[0]}.{low[1]} to {high[0]}.{high[1]}, found "
                           f"{version}{'; missing: ' + ', '.join(missing) if missing else ''}: it reads FSDP1 "
                           "internals without public API (fsam_dist/shards/fsdp1.py); check them and widen "
                           "TESTED_TORCH, or use FSDP2 (fully_shard)")


class FSDP1Shards:
    """The local pieces of every trainable parameter, per FSDP unit."""

    def __init__(self, wrapped: nn.Module, canonical: dict[str, str], positions: dict[str, int],
                 eligible: dict[str, bool]) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        check_fsdp1_internals()
        self.positions, self.eligible = positions, eligible
        by_id = {}
        for n, p in wrapped.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), canonical[clean_name(n)])
        self.handles = []   # (fsdp state, handle, [(name, offset_in_shard, numel, intra_start)])
        seen: dict[str, int] = {}
        for state in FSDP.fsdp_modules(wrapped):
            handle = state._handle
            if handle is None:
                continue
            fp = handle.flat_param
            pieces = []
            for p, info in zip(fp._params, fp._shard_param_infos):
                name = by_id[id(p)]
                seen[name] = seen.get(name, 0) + 1
                if not p.requires_grad or name not in positions:
                    continue
                if info.in_shard and info.numel_in_shard:
                    pieces.append((name, info.offset_in_shard, info.numel_in_shard, info.intra_param_start_idx))
            self.handles.append((state, handle, pieces))
        doubled = [n for n, c in seen.items() if c > 1]
        if doubled:
            raise RuntimeError(f"FSDP1: parameters {doubled} are held by more than one FSDP unit")

    def pieces(self) -> list[tuple[str, int, int]]:
        return [(n, intra, numel) for _, _, pieces in self.handles for n, _, numel, intra in pieces]

    @staticmethod
    def sync(wrapped: nn.Module, last: bool):
        return contextlib.nullcontext() if last else wrapped.no_sync()

    def views(self) -> list[ShardView]:
        views = []
        for _, handle, pieces in self.handles:
            fp = handle.flat_param
            shard = getattr(fp, "_local_shard", None)
            if shard is None:   # before the first forward (lazy init): the flat parameter is the shard
                shard = fp.data
            grad = handle.sharded_grad
            if grad is not None and grad.numel() != shard.numel():
                raise RuntimeError("FSDP1: gradient is not sharded; views() is only valid at an accumulation "
                                   "boundary (after a synchronised backward)")
            if grad is None:   # no gradient reached this unit: zero (FSDP leaves p.grad None, so the
                grad = torch.zeros_like(shard)   # optimizer skips these parameters this step)
            for name, offset, numel, intra in pieces:
                views.append(ShardView(name, shard.detach()[offset:offset + numel], grad[offset:offset + numel],
                                       self.positions[name] + intra, self.eligible[name]))
        return views

    def publish(self, wrapped: nn.Module) -> None:
        """Reshard every unit still holding unsharded parameters (SHARD_GRAD_OP, NO_SHARD, ...)."""
        from torch.distributed.fsdp._runtime_utils import _reshard

        for state, handle, _ in self.handles:
            if handle.uses_sharded_strategy and not handle.is_sharded(handle.flat_param):
                _reshard(state, handle, True)
