"""FSDP set-up for the CLI: the settings ``accelerate launch`` exports (``FSDP_*`` variables), turned
into the arguments of :func:`~fsam_dist.train.fsdp_wrap.wrap_fsdp`.

``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` is used as a *launcher* only:
accelerate 1.15's own FSDP preparation does not work on CPU (docs/design.md); this module turns
the variables its yaml produces into :class:`FSDPSettings`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from ..core import DEFAULT_EXCLUDE
from ..shards.fsdp import FSDP1_STRATEGIES, FSDPBackend
from .fsdp_wrap import wrap_fsdp


@dataclass(frozen=True)
class FSDPSettings:
    """How to wrap the model; :meth:`backend_kwargs` gives :func:`wrap_fsdp`'s keyword args."""

    version: int = 2
    sharding_strategy: str = "FULL_SHARD"
    """FSDP1 only: FULL_SHARD, SHARD_GRAD_OP or NO_SHARD."""
    reshard_after_forward: bool = True
    """FSDP2 only."""
    wrap_classes: tuple[str, ...] | None = None
    """Block classes wrapped as FSDP units; None = ``fsdp_wrap.DEFAULT_WRAP_CLASSES`` found in the model
    (else the model's ``_no_split_modules``); () = the root only."""
    mixed_precision: str | None = None
    cpu_offload: bool = False
    sync_module_states: bool = False
    activation_checkpointing: bool = False
    """yaml ``fsdp_activation_checkpointing``: checkpoint every transformer block (the loop turns on
    Hugging Face's non-reentrant gradient checkpointing, as ``train.gradient_checkpointing`` does:
    same blocks, parameter names unchanged)."""
    state_dict_type: str = "SHARDED_STATE_DICT"
    """How the training loop should export the final model ('SHARDED_STATE_DICT' or
    'FULL_STATE_DICT'); checkpoints for resuming are always sharded (:meth:`FSDPBackend.save_state`)."""

    def backend_kwargs(self) -> dict:
        kw = asdict(self)
        kw.pop("state_dict_type")
        kw.pop("activation_checkpointing")
        return kw


_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


def env_flag(var: str, key: str, default: bool = False, env: Mapping[str, str] | None = None) -> bool:
    """An accelerate boolean from the environment, spelt as accelerate's own parser accepts
    (1/true/yes/y/on, 0/false/no/n/off, any case); anything else is an error naming the yaml
    ``key``. The one place these spellings are resolved (:func:`use_fsdp` included)."""
    return _bool(os.environ if env is None else env, var, key, default)


def use_fsdp(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (``ACCELERATE_USE_FSDP``)."""
    return env_flag("ACCELERATE_USE_FSDP", "distributed_type: FSDP", False, env)


def _bool(env: Mapping[str, str], var: str, key: str, default: bool) -> bool:
    raw = env.get(var)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"accelerate config: {key}={raw!r} (environment {var}) is not a boolean")


def fsdp_settings_from_env(environ: Mapping[str, str] | None = None) -> FSDPSettings | None:
    """Read the FSDP settings ``accelerate launch --config_file <fsdp yaml>`` exports.

    Returns None when the launch is not an FSDP one (``ACCELERATE_USE_FSDP`` unset or false).
    Raises ``ValueError`` naming the yaml key of any setting this backend does not support.

    accelerate 1.15 exports (``accelerate/utils/launch.py``, ``prepare_multi_gpu_env``):
    ``ACCELERATE_USE_FSDP=true``, ``FSDP_VERSION`` (yaml ``fsdp_version``, default 1),
    ``FSDP_SHARDING_STRATEGY`` (``fsdp_sharding_strategy``, default FULL_SHARD, always set),
    ``FSDP_RESHARD_AFTER_FORWARD`` (``fsdp_reshard_after_forward``, lower-cased, default "true":
    a bool for FSDP2, a strategy name for FSDP1), ``FSDP_AUTO_WRAP_POLICY``,
    ``FSDP_TRANSFORMER_CLS_TO_WRAP`` (comma-separated), ``FSDP_OFFLOAD_PARAMS``,
    ``FSDP_USE_ORIG_PARAMS``, ``FSDP_STATE_DICT_TYPE``, ``FSDP_SYNC_MODULE_STATES``,
    ``FSDP_CPU_RAM_EFFICIENT_LOADING``, ``FSDP_ACTIVATION_CHECKPOINTING``(``_OFFLOAD``),
    ``FSDP_FORWARD_PREFETCH``, ``FSDP_BACKWARD_PREFETCH``, ``FSDP_MIN_NUM_PARAMS``,
    ``FSDP_IGNORED_MODULES``, and ``ACCELERATE_MIXED_PRECISION`` (yaml ``mixed_precision``).
    Prefetch settings only tune communication overlap and are ignored. ``fsdp_cpu_ram_efficient_loading``
    is accepted either way: the CLI always loads that way under FSDP (rank 0 reads the
    checkpoint, the other ranks build on the meta device, ``train/loading.py``).
    """
    env = os.environ if environ is None else environ
    if not use_fsdp(env):
        return None

    raw_version = env.get("FSDP_VERSION", "1").strip()
    if raw_version not in ("1", "2"):
        raise ValueError(f"accelerate config: fsdp_version={raw_version!r} must be 1 or 2")
    version = int(raw_version)

    # Sharding: FSDP_SHARDING_STRATEGY is always exported (default FULL_SHARD), and for FSDP1
    # the yaml's fsdp_reshard_after_forward may hold a strategy name instead.
    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper() or "FULL_SHARD"
    if strategy.isdigit():   # accelerate also accepts the ShardingStrategy enum value (1-based)
        names = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
        strategy = names[int(strategy) - 1] if 1 <= int(strategy) <= len(names) else strategy
    reshard_raw = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip()
    reshard = True
    if version == 2:
        if reshard_raw.lower() in _TRUE:
            reshard = True
        elif reshard_raw.lower() in _FALSE:
            reshard = False
        else:
            raise ValueError(f"accelerate config: fsdp_reshard_after_forward={reshard_raw!r} must be true or "
                             "false with fsdp_version: 2 (FSDP2 has no sharding strategies)")
    else:
        if reshard_raw.lower() in _FALSE:
            raise ValueError("accelerate config: fsdp_reshard_after_forward=false with fsdp_version: 1; FSDP1 "
                             "takes a strategy name there (fsdp_reshard_after_forward: SHARD_GRAD_OP)")
        if reshard_raw.lower() not in _TRUE:
            named = reshard_raw.upper()
            if strategy != "FULL_SHARD" and named != strategy:
                raise ValueError(f"accelerate config: fsdp_sharding_strategy={strategy} and "
                                 f"fsdp_reshard_after_forward={named} disagree; set one of them")
            strategy = named
        if strategy in ("HYBRID_SHARD", "HYBRID_SHARD_ZERO2", "_HYBRID_SHARD_ZERO2"):
            raise ValueError(f"accelerate config: fsdp_sharding_strategy={strategy} (hybrid sharding) is not "
                             f"supported; use one of {FSDP1_STRATEGIES}")
        if strategy not in FSDP1_STRATEGIES:
            raise ValueError(f"accelerate config: fsdp_sharding_strategy / fsdp_reshard_after_forward={strategy!r} "
                             f"is not one of {FSDP1_STRATEGIES}")
        if not _bool(env, "FSDP_USE_ORIG_PARAMS", "fsdp_use_orig_params", False):
            raise ValueError("accelerate config: fsdp_use_orig_params must be true with fsdp_version: 1 (the FSAM "
                             "backend reads and perturbs the original parameters' shards)")

    policy = env.get("FSDP_AUTO_WRAP_POLICY", "").strip().upper()
    if policy in ("", "TRANSFORMER_BASED_WRAP"):
        classes = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").strip()
        wrap = tuple(c.strip() for c in classes.split(",") if c.strip()) or None
    elif policy == "NO_WRAP":
        wrap = ()
    else:
        raise ValueError(f"accelerate config: fsdp_auto_wrap_policy={policy} is not supported; use "
                         "TRANSFORMER_BASED_WRAP (with fsdp_transformer_layer_cls_to_wrap) or NO_WRAP")

    if _bool(env, "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "fsdp_activation_checkpointing_offload", False):
        raise ValueError("accelerate config: fsdp_activation_checkpointing_offload: true is not supported by the "
                         "FSAM FSDP backend; set it to false (fsdp_activation_checkpointing: true is)")
    _bool(env, "FSDP_CPU_RAM_EFFICIENT_LOADING", "fsdp_cpu_ram_efficient_loading", True)   # checked spelling only
    if env.get("FSDP_IGNORED_MODULES", "").strip():
        raise ValueError("accelerate config: fsdp_ignored_modules is not supported by the FSAM FSDP backend")

    state_dict_type = env.get("FSDP_STATE_DICT_TYPE", "").strip().upper() or (
        "SHARDED_STATE_DICT" if version == 2 else "FULL_STATE_DICT")
    if state_dict_type not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        raise ValueError(f"accelerate config: fsdp_state_dict_type={state_dict_type} is not supported; use "
                         "SHARDED_STATE_DICT or FULL_STATE_DICT")

    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if precision not in ("no", "bf16"):
        raise ValueError(f"accelerate config: mixed_precision={precision} is not supported with FSDP; use no or "
                         "bf16 (fp16 would need a gradient scaler)")

    # The launcher exports FSDP_SYNC_MODULE_STATES=true unless the yaml says otherwise; accelerate
    # ignores it for FSDP2 ("obsolete"), and so do we: a shard comes from one rank, so FSDP2 needs
    # no identical initialisation.
    sync = version == 1 and _bool(env, "FSDP_SYNC_MODULE_STATES", "fsdp_sync_module_states", False)
    return FSDPSettings(
        version=version, sharding_strategy=strategy, reshard_after_forward=reshard, wrap_classes=wrap,
        mixed_precision=None if precision == "no" else "bf16",
        cpu_offload=_bool(env, "FSDP_OFFLOAD_PARAMS", "fsdp_offload_params", False),
        sync_module_states=sync, state_dict_type=state_dict_type,
        activation_checkpointing=_bool(env, "FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing", False))


def fsdp_backend(model: nn.Module, settings: FSDPSettings | None = None, *,
                  optimizer_factory: Callable, scheduler_factory: Callable | None = None,
                  precision: str | None = None, exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDE,
                  device: torch.device | None = None, from_rank0: bool = False) -> FSDPBackend:
    """The FSDP adapter wrapping ``model`` as :class:`FSDPSettings` say (default: :func:`fsdp_settings_from_env`).
    ``from_rank0``: only rank 0's model holds the weights (``wrap_fsdp``; ``train/loading.py``).

    ``precision`` is the training config's 'fp32' | 'bf16': bf16 turns on FSDP's bf16 policy;
    it must not contradict the accelerate yaml's ``mixed_precision`` when that is bf16.
    """
    if settings is None:
        settings = fsdp_settings_from_env() or FSDPSettings()
    kwargs = settings.backend_kwargs()
    if precision is not None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"FSDP backend: precision {precision!r} is not supported; use fp32 or bf16")
        wanted = "bf16" if precision == "bf16" else None
        if settings.mixed_precision is not None and settings.mixed_precision != wanted:
            raise ValueError(f"accelerate config mixed_precision: {settings.mixed_precision} disagrees with "
                             f"train.precision: {precision}")
        kwargs["mixed_precision"] = wanted
    return wrap_fsdp(model, optimizer_factory=optimizer_factory, scheduler_factory=scheduler_factory,
                     exclude=exclude, device=device, from_rank0=from_rank0, **kwargs)
