"""DeepSpeed set-up: check a DeepSpeed config against what the adapter supports, build the engine and its adapter."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from ..core import DEFAULT_EXCLUDE
from ..shards.deepspeed import DeepSpeedBackend
from ..shards.deepspeed_internals import check_supported, check_version


def check_deepspeed_config(ds_config: dict) -> None:
    """Refuse, naming the key, what :class:`DeepSpeedBackend` does not support (before any engine is built)."""
    zero = ds_config.get("zero_optimization", {})
    offloaded = [key for key in ("offload_optimizer", "offload_param")
                 if zero.get(key) and zero[key].get("device", "none") != "none"]
    check_supported(int(zero.get("stage", 0)), ds_config.get("fp16", {}).get("enabled", False),
                    ds_config.get("bf16", {}).get("enabled", False), offloaded)


def build_deepspeed(model: torch.nn.Module, ds_config: dict, optimizer: torch.optim.Optimizer, scheduler=None,
                    exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDE) -> DeepSpeedBackend:
    """``deepspeed.initialize`` of ``model`` and the adapter of the engine.

    Args:
        model: the ``torch.nn.Module`` (not yet wrapped).
        ds_config: the DeepSpeed config dict, passed to ``deepspeed.initialize`` as it is (a copy).
            ``gradient_accumulation_steps`` feeds only DeepSpeed's batch-size check and sample
            counters (the step marks the accumulation boundary itself).
        optimizer: a torch optimizer over ``model.parameters()``; DeepSpeed wraps it.
        scheduler: an LR scheduler of ``optimizer``; DeepSpeed steps it after every applied step.
        exclude: regexes of parameter names the Fisher mask does not apply to.

    ``deepspeed.init_distributed(dist_backend=...)`` (or ``torch.distributed.init_process_group``)
    must have run before.
    """
    import deepspeed

    check_version(deepspeed.__version__)
    check_deepspeed_config(ds_config)
    if not dist.is_initialized():
        raise RuntimeError("build_deepspeed: call deepspeed.init_distributed(dist_backend=...) first")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=copy.deepcopy(ds_config))
    return DeepSpeedBackend(engine, exclude=exclude)
