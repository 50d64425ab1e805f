"""DeepSpeed's private internals the ZeRO adapter reads, and the guards in front of them.

None of these has public API at DeepSpeed 0.19; :class:`~fsam_dist.shards.deepspeed.DeepSpeedBackend`
calls :func:`check_engine` (tested DeepSpeed versions, supported features) before it touches any
of them, so a DeepSpeed release that moves one fails with one clear error instead of a wrong answer.
"""

from __future__ import annotations

import torch

TESTED_VERSIONS = ((0, 19), (0, 19))
"""Inclusive (major, minor) range of DeepSpeed the private attributes below were checked against."""


def check_version(version: str) -> None:
    """Raise if ``version`` lies outside :data:`TESTED_VERSIONS` (the adapter reads internals)."""
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        raise RuntimeError(f"DeepSpeedBackend: cannot parse the DeepSpeed version {version!r}") from None
    low, high = TESTED_VERSIONS
    if not low <= major_minor <= high:
        raise RuntimeError(f"DeepSpeedBackend was tested with DeepSpeed {low[0]}.{low[1]}.x to {high[0]}.{high[1]}.x, "
                           f"found {version}: it reads ZeRO internals without public API (see "
                           "fsam_dist/shards/deepspeed_internals.py); check them and widen TESTED_VERSIONS")


def check_supported(stage: int, fp16: bool, bf16: bool, offloaded: list[str]) -> None:
    """Refuse what the adapter does not handle, naming the DeepSpeed config key."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeedBackend: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    if fp16:
        raise ValueError("DeepSpeedBackend: fp16 is not supported (untested; use bf16 or fp32)")
    if stage == 0 and bf16:
        raise ValueError("DeepSpeedBackend: bf16 needs ZeRO stage 1, 2 or 3 (at stage 0 DeepSpeed keeps the "
                         "fp32 masters in an optimizer wrapper this adapter does not read)")
    for key in offloaded:
        raise ValueError(f"DeepSpeedBackend: zero_optimization.{key} is not supported (the gradients "
                         "and masters then live in other buffers)")


def check_engine(engine) -> None:
    """:func:`check_version` and :func:`check_supported` for an engine ``deepspeed.initialize`` built."""
    import deepspeed

    check_version(deepspeed.__version__)
    offloaded = [key for key in ("offload_optimizer", "offload_param")
                 if getattr(getattr(engine, f"zero_{key}")(), "device", "none") not in ("none", None)]
    check_supported(engine.zero_optimization_stage(), engine.fp16_enabled(), engine.bfloat16_enabled(), offloaded)


# DeepSpeed internals without public API (checked for TESTED_VERSIONS):
# ZeRO-1/2: ``p._hp_mapping`` (None where this rank owns no entry of p) links the parameter to its
# fragment of the fp32 master (``hp_fragment``), the fragment's offset in the parameter
# (``lp_fragment_address.start``) and the reduced gradient (``get_lp_grad_fragment``, indexed by
# ``p._index_in_param_group``). ``optimizer.averaged_gradients`` / ``all_grad_tensors`` /
# ``micro_step_id`` hold gradients accumulated since the last ``step()``; DeepSpeed's own overflow
# path clears them the way :func:`zero12_clear_grads` does.
# ZeRO-3: ``p.ds_tensor`` (local padded partition), ``p.ds_numel`` (unpadded numel),
# ``optimizer.parameter_offload.partition_all_parameters()`` and ``optimizer.persistent_parameters``;
# loading (train/loading.py) writes ``p.ds_tensor`` of a parameter ``zero.Init`` partitioned
# (``p.ds_status``, ``p.ds_tensor.ds_numel``, ``p.ds_secondary_tensor``, ``p.ds_process_group``).

def zero12_address(p: torch.nn.Parameter) -> tuple[int, int] | None:
    """(offset in p, numel) of this rank's fragment of p, or None if not owned here."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel


def zero12_fragment(p: torch.nn.Parameter):
    """(offset in p, fp32 master fragment, reduced gradient fragment) or None if not owned here."""
    address = zero12_address(p)
    if address is None:
        return None
    mapping = p._hp_mapping
    start, numel = address
    grad = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
    if grad.numel() == p.numel() != numel:   # BF16_Optimizer keeps the whole parameter's gradient
        grad = grad.narrow(0, start, numel)
    return start, mapping.hp_fragment.view(-1), grad


def zero12_clear_grads(optimizer) -> None:
    """Discard the ZeRO-1/2 gradients accumulated since the last step.

    ``zero_grad`` alone is not enough for DeepSpeedZeroOptimizer: with bf16 weights and fp32
    gradient accumulation it adds every backward into ``averaged_gradients`` until ``step()``
    (which then clears them the way this does). BF16_Optimizer's ``zero_grad`` clears everything.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    optimizer.zero_grad(set_to_none=True)
    if hasattr(optimizer, "averaged_gradients"):
        optimizer._release_preflattened_grad_buffers()
        for k in list(optimizer.averaged_gradients):
            optimizer.averaged_gradients[k] = None
        for k in list(optimizer.all_grad_tensors):
            optimizer.all_grad_tensors[k] = None
        optimizer.micro_step_id = INITIAL_MICRO_STEP_ID


def zero3_local(p: torch.nn.Parameter, rank: int):
    """(offset in p, local weight partition, local fp32 gradient, the padded gradient partition
    to write back with ``safe_set_local_grad``), padding dropped."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

    size = p.ds_tensor.ds_numel
    start = rank * size
    n = max(0, min(size, p.ds_numel - start))
    grad = safe_get_local_grad(p)   # a copy where DeepSpeed keeps it in another dtype
    weights = p.ds_tensor.view(-1)
    if weights.dtype != torch.float32:   # bf16: perturb the fp32 master (a view); publish rounds it
        weights = safe_get_local_fp32_param(p).view(-1)
    return start, weights[:n], grad.view(-1)[:n], grad


def zero3_partition_writable(p: torch.nn.Parameter, world: int) -> bool:
    """Whether :func:`zero3_scatter_into_partitions` may fill ``p``: a partitioned ZeRO-3 parameter
    of a tested DeepSpeed, its padded partition in memory on every one of the ``world`` ranks of
    the default group, no secondary (hpZ) or quantized copy to keep in step."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    try:
        check_version(deepspeed.__version__)
    except RuntimeError:
        return False
    part = getattr(p, "ds_tensor", None)
    return (part is not None and getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE
            and part.numel() == getattr(part, "ds_numel", -1) and part.is_floating_point()
            and getattr(p, "ds_secondary_tensor", None) is None
            and dist.get_world_size(group=getattr(p, "ds_process_group", None)) == world
            and part.ds_numel * world >= p.ds_numel)


def zero3_scatter_into_partitions(p: torch.nn.Parameter, value: torch.Tensor | None, rank: int, world: int) -> None:
    """Rank 0's full ``value`` of ``p`` into every rank's partition (``p.ds_tensor``), each rank
    receiving only its slice (one ``scatter``; padding untouched, as DeepSpeed leaves it): no rank
    gathers the parameter. ``value`` is ignored on ranks ≠ 0. Check :func:`zero3_partition_writable`."""
    import torch.distributed as dist

    part = p.ds_tensor.view(-1)
    size = part.numel()
    chunks = None
    if rank == 0:
        flat = value.to(part.device, part.dtype).contiguous().view(-1)
        chunks = []
        for r in range(world):
            piece = flat[r * size:(r + 1) * size]
            if piece.numel() < size:   # the last ranks' padded partitions
                piece = torch.cat([piece, piece.new_zeros(size - piece.numel())])
            chunks.append(piece)
    received = torch.empty_like(part)
    dist.scatter(received, chunks, src=0)
    n = max(0, min(size, p.ds_numel - rank * size))
    with torch.no_grad():
        part[:n].copy_(received[:n])


def zero3_copy_masters(params) -> None:
    """bf16 partitions ← their fp32 masters (what ``step()`` does after the update): after the
    restore the master holds the exact original, whose bf16 rounding is the original partition."""
    from deepspeed.utils import safe_get_local_fp32_param

    with torch.no_grad():
        for p in params:
            p.ds_tensor.view(-1).copy_(safe_get_local_fp32_param(p).view(-1))


def zero3_publish(optimizer, device: torch.device) -> None:
    """Make an in-place change to the ZeRO-3 partitions visible to the next forward.

    On a GPU the change was written on the current stream while DeepSpeed all-gathers the
    partitions on its own stream without waiting for it: finish the current stream first."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    optimizer.parameter_offload.partition_all_parameters()
    persistent = optimizer.persistent_parameters
    if persistent:
        persistent[0].all_gather(persistent)


def skip_cpu_shm_build() -> None:
    """Stop DeepSpeed's CPU communication from compiling its shared-memory op at init.

    The op serves only ``inference_all_reduce``, which training never calls; building it costs
    40-70 s on a fresh machine. (``deepspeed.comm.torch`` the *attribute* is torch itself, hence
    the import by name.)
    """
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


_SCHEDULED = ("params", "lr", "initial_lr")
"""Parameter-group keys a universal load may set (the others are optim.*'s fixed settings)."""


def load_universal(engine, path: str) -> None:
    """``engine.load_checkpoint(path, tag="state")`` of a universal checkpoint (DeepSpeed's
    ``load_universal`` switched on for this call only), then two defects of DeepSpeed 0.19.8's
    ZeRO-3 universal load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) undone:

    1. every parameter group gets group 0's hyperparameters, so the no-decay group (biases,
       layer norms) would get the weight decay: the groups' fixed settings are put back (the
       scheduled lr stays as loaded);
    2. every sub-group's Adam state gets the *same* ``step`` tensor, which torch's AdamW then
       increments in place once per sub-group: the step count would advance by the number of
       sub-groups per iteration (wrong bias correction; measured 1.4e-3 relative off the
       uninterrupted run, 4e-7 with the fix). Each state gets its own copy.
    """
    config = engine._config
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    groups = [{k: v for k, v in g.items() if k not in _SCHEDULED} for g in inner.param_groups]
    before, config.load_universal_checkpoint = config.load_universal_checkpoint, True
    try:
        load_path, _ = engine.load_checkpoint(path, tag="state")
    finally:
        config.load_universal_checkpoint = before
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeedBackend: no universal DeepSpeed checkpoint in {path}")
    for group, saved in zip(inner.param_groups, groups):
        group.update(saved)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
