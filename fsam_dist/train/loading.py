"""Load the model for its backend without a full fp32 copy on every rank (memory-efficient loading).

Chosen automatically from the backend (no flag):

* ZeRO-3: ``from_pretrained`` under transformers' ``HfDeepSpeedConfig``, so the model is built
  inside ``deepspeed.zero.Init`` (every parameter partitioned as it is created) and only rank 0
  reads the checkpoint's values, which DeepSpeed scatters partition by partition;
* FSDP1 / FSDP2: rank 0 reads the checkpoint (``from_pretrained``), the other ranks build the same
  module on the meta device (no storage); :func:`~fsam_dist.train.fsdp_wrap.wrap_fsdp` with
  ``from_rank0=True`` then materialises each rank's shards and broadcasts the values from rank 0
  (FSDP1: ``sync_module_states`` per unit, FSDP2: tensor by tensor into the local shards) --
  accelerate's ``fsdp_cpu_ram_efficient_loading``;
* one process, DDP, ZeRO-0/1/2 (every rank holds the whole model anyway): ``from_pretrained``.

The module built is the same class with the same parameters, names, order and ties (T5's
``shared`` / ``embed_tokens`` / ``lm_head``) as a plain ``from_pretrained``, so the adapters'
global positions and eligibility are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Loaded:
    """The model each rank holds after loading, and how the backend must finish it."""

    model: torch.nn.Module
    from_rank0: bool = False
    """FSDP: rank 0 holds the weights, other ranks a meta-device module; ``wrap_fsdp(from_rank0=True)``."""


def zero3(ds_config: dict | None) -> bool:
    return bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def load_for_backend(backend_name: str, ds_config: dict | None, rank: int, source: str,
                     model_config, gradient_checkpointing: bool = False) -> Loaded:
    """The model of ``source`` as ``backend_name`` needs it on this rank (process group started).

    ``gradient_checkpointing`` (``train.gradient_checkpointing``, or under FSDP the accelerate
    yaml's ``fsdp_activation_checkpointing``) turns on Hugging Face's activation checkpointing of
    every transformer block (non-reentrant, so the recomputation replays the forward's RNG state).
    """
    from ..seq2seq.model import load_model
    from .fsdp_setup import fsdp_settings_from_env

    if backend_name == "fsdp":
        settings = fsdp_settings_from_env()
        gradient_checkpointing = gradient_checkpointing or bool(settings and settings.activation_checkpointing)
    if backend_name == "deepspeed" and zero3(ds_config):
        model = _load_zero3(source, ds_config)
        loaded = Loaded(model)
    elif backend_name == "fsdp":
        loaded = Loaded(load_model(source) if rank == 0 else meta_model(model_config, source), from_rank0=True)
    else:
        loaded = Loaded(load_model(source))
    if gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model)
    return loaded


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """``model.gradient_checkpointing_enable`` with ``use_reentrant=False`` (the recomputation
    restores the RNG state of the forward, so dropout masks are the same; works with sharded
    parameters). The config is left as it is (the final model's config.json stays the checkpoint's)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def meta_model(model_config, source: str | None = None) -> torch.nn.Module:
    """The module ``from_pretrained`` would build for ``model_config``, on the meta device (no
    storage), with the same ties; its generation config read from ``source`` when saved there."""
    from transformers import AutoModelForSeq2SeqLM, GenerationConfig

    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(model_config, dtype=torch.float32)
    model.tie_weights()
    if source is not None:
        try:
            model.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            pass   # no generation_config.json: keep the one derived from the config, as from_pretrained
    return model


def _load_zero3(source: str, ds_config: dict) -> torch.nn.Module:
    """``from_pretrained`` inside ``deepspeed.zero.Init`` (transformers' ZeRO-3 path); the
    ``HfDeepSpeedConfig`` is dropped afterwards so later plain ``from_config`` calls (the final
    model's consolidation) build ordinary modules."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ..seq2seq.model import load_model

    hf_ds = HfDeepSpeedConfig(ds_config)   # noqa: F841 -- transformers keeps a weak reference
    try:
        return load_model(source)
    finally:
        del hf_ds
        unset_hf_deepspeed_config()
