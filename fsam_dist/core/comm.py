"""The only place the FSAM math talks to other processes.

Every collective the core adds goes through :func:`all_reduce`, so that one counting wrapper
(tests, benchmarks) sees all of them, and so that "which group, if any" is decided once.

``group`` everywhere in :mod:`fsam_dist.core` means:

* ``None`` -- the default process group if ``torch.distributed`` is initialised, else this
  process alone (no communication);
* a ``ProcessGroup`` -- that group;
* :data:`REPLICATED` -- every rank holds identical, complete values (one process, DDP after its
  gradient all-reduce): each rank computes the answer on its own, no communication. Counting
  replicated entries once per rank would count them world-size times; not reducing at all counts
  each exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _Replicated:
    """Sentinel group: the values on this rank are the complete, identical global values."""

    def __repr__(self) -> str:
        return "REPLICATED"


REPLICATED = _Replicated()


def communicates(group) -> bool:
    """Whether reductions over ``group`` involve other processes."""
    if group is REPLICATED:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over ``group`` (``op``: 'sum' or 'max'); returns it.

    A no-op when ``group`` does not communicate (see module docstring). gloo cannot reduce on a
    GPU tensor and NCCL cannot on a CPU one, so the tensor is moved to the backend's device and back.
    """
    if not communicates(group):
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    pg = group
    device = _comm_device(pg)
    if tensor.device == device:
        dist.all_reduce(tensor, op=reduce_op, group=pg)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=reduce_op, group=pg)
    tensor.copy_(moved)
    return tensor


def _comm_device(group) -> torch.device:
    """The device ``group``'s backend reduces on: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sums(partials: list[torch.Tensor] | torch.Tensor, group=None) -> torch.Tensor:
    """Sum each local partial over ``group`` in fp64 with one all-reduce; returns a 1-D fp64 tensor.

    This is the single reduction helper of the package: norms, counts and non-finite flags all
    come through here. Each entry of the model must appear in exactly one rank's partials (the
    shard adapters guarantee it), so the sum counts each once.

    No host synchronisation: the partials are stacked on the device the group reduces on (the
    first partial's device when nothing is communicated), and the result stays there; the caller's
    one ``.tolist()`` is the step's only wait for it.
    """
    pieces = [partials] if isinstance(partials, torch.Tensor) else partials
    if communicates(group):
        device = _comm_device(group)
    else:
        device = pieces[0].device if len(pieces) else torch.device("cpu")
    local = torch.cat([p.detach().reshape(-1).to(device=device, dtype=torch.float64) for p in pieces]) \
        if len(pieces) else torch.zeros(0, dtype=torch.float64, device=device)
    return all_reduce(local, "sum", group)
