"""Load the model for its backend without a full fp32 copy on every rank (memory-efficient loading).

Chosen automatically from the backend (no flag):

* ZeRO-3: the model is built from its config inside ``deepspeed.zero.Init`` (transformers' own
  ``from_pretrained`` init contexts under a live ``HfDeepSpeedConfig``: every parameter is
  partitioned as it is created, no weight initialisation), then rank 0 streams the checkpoint
  tensor by tensor (``safetensors.safe_open``, read with ``pread``) and scatters each tensor, every
  rank writing only its partition of it (``p.ds_tensor``, via
  :mod:`fsam_dist.shards.deepspeed_internals`; a parameter partitioned otherwise goes through
  ``deepspeed.zero.GatheredParameters(modifier_rank=0)``); persistent buffers are broadcast from
  rank 0. Beyond its partition a rank holds one module at a time while the model is built and
  one tensor's partition while it loads, rank 0 also the tensor it read: 0.44 × the fp32 model on
  rank 0 at 24 M parameters (tests/test_loading.py),
  where transformers' own ZeRO-3 ``from_pretrained`` reads the whole state dict into rank 0's
  memory first (1.29 × at 738 M, bench/README.md). A ``pytorch_model.bin`` checkpoint (no
  per-tensor reads) is loaded whole on rank 0, one file of a sharded one at a time. Missing,
  unexpected (beyond the model's ``_keys_to_ignore_on_load_*``) and mis-shaped keys are one error
  on every rank, before any weight moves;
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

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("fsam_dist")


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
        model = _load_zero3(source, ds_config, model_config, rank)
        loaded = Loaded(model)
    elif backend_name == "fsdp":
        loaded = Loaded(load_model(source) if rank == 0 else meta_model(model_config, source), from_rank0=True)
    else:
        loaded = Loaded(load_model(source))
    if gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model)
        layers = [m.gradient_checkpointing for m in loaded.model.modules() if hasattr(m, "gradient_checkpointing")]
        log.info("gradient checkpointing on in %d of %d layers", sum(layers), len(layers))
    return loaded


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """``model.gradient_checkpointing_enable`` with ``use_reentrant=False`` (the recomputation
    restores the RNG state of the forward, so dropout masks are the same; works with sharded
    parameters). The config is left as it is (the final model's config.json stays the checkpoint's)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def meta_model(model_config, source: str | None = None) -> torch.nn.Module:
    """The module ``from_pretrained`` would build for ``model_config``, on the meta device (no
    storage), with the same ties; its generation config read from ``source`` when saved there."""
    from transformers import AutoModelForSeq2SeqLM

    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(model_config, dtype=torch.float32)
    model.tie_weights()
    if source is not None:
        _generation_config_from(model, source)
    return model


def _generation_config_from(model: torch.nn.Module, source: str) -> None:
    """``generation_config.json`` of ``source`` onto ``model``, as ``from_pretrained`` does."""
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:
        pass   # no generation_config.json: keep the one derived from the config, as from_pretrained


def _load_zero3(source: str, ds_config: dict, model_config, rank: int) -> torch.nn.Module:
    """The model of ``source`` built partitioned under ``deepspeed.zero.Init`` and filled from the
    checkpoint one parameter at a time (module docstring). The ``HfDeepSpeedConfig`` lives only
    while the model is built, so later plain ``from_config`` calls (the final model's
    consolidation) build ordinary modules. Call on every rank, process group started."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(ds_config)   # noqa: F841 -- transformers keeps a weak reference
    try:
        model = _zero3_empty_model(model_config)
    finally:
        del hf_ds
        unset_hf_deepspeed_config()
    _stream_checkpoint_zero3(model, source, rank)
    _generation_config_from(model, source)
    model.eval()   # as from_pretrained returns it
    return model


def _zero3_empty_model(model_config) -> torch.nn.Module:
    """The class ``AutoModelForSeq2SeqLM.from_pretrained`` picks, built the way it builds it under
    ZeRO-3 (its own init contexts: fp32, ``zero.Init`` with the live ``HfDeepSpeedConfig``, weight
    initialisation skipped since every weight is loaded next), then tied as it ties."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    from transformers.monkey_patching import patch_output_recorders
    from transformers.utils import ContextManagers

    cls = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING[type(model_config)]
    config = copy.deepcopy(model_config)
    config.dtype = torch.float32
    with ContextManagers(cls.get_init_context(torch.float32, False, False, None)):
        model = cls(config)
        patch_output_recorders(model)
    model.tie_weights()
    return model


def checkpoint_files(source: str) -> list[Path]:
    """The weight files ``from_pretrained`` would read from ``source``, in its order of preference
    (``model.safetensors``, its sharded index, ``pytorch_model.bin``, its sharded index)."""
    from ..seq2seq.model import WEIGHT_FILES, ModelLoadError

    directory = Path(source)
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            if name.endswith(".index.json"):
                shards = dict.fromkeys(json.loads(path.read_text())["weight_map"].values())
                return [directory / shard for shard in shards]
            return [path]
    raise ModelLoadError(f"cannot load the model weights of {source!r}: none of {', '.join(WEIGHT_FILES)} is there")


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in one weight file, without reading the values."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    from transformers.modeling_utils import load_state_dict

    return {key: tuple(value.shape) for key, value in load_state_dict(str(path), map_location="meta").items()}


class _Reader:
    """Rank 0's reader of one weight file: safetensors tensor by tensor (``pread``: no mapping
    whose touched pages would stay resident), ``pytorch_model.bin`` whole (torch's pickle)."""

    def __init__(self, path: Path) -> None:
        self.path, self.handle, self.whole = path, None, None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            self.handle = safe_open(str(path), framework="pt", backend="pread")
        else:
            from transformers.modeling_utils import load_state_dict

            self.whole = load_state_dict(str(path), map_location="cpu")

    def get(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key) if self.handle is not None else self.whole.pop(key)

    def close(self) -> None:
        self.handle, self.whole = None, None


def _load_plan(model: torch.nn.Module, source: str, files: list[Path]) -> tuple[list, str | None]:
    """Rank 0: ``[(file index, checkpoint key), ...]`` (each parameter or persistent
    buffer once, a tied one under the first of its names the checkpoint has) and the error, if
    any, naming the missing, unexpected and mis-shaped keys."""
    import re

    expected = model.state_dict(keep_vars=True)   # every name of every tied tensor; persistent buffers
    ignore_missing = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    ignore_unexpected = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    plan, loaded, unexpected, mismatched = [], set(), [], []
    for index, path in enumerate(files):
        for key, shape in _checkpoint_shapes(path).items():
            target = expected.get(key)
            if target is None:
                if not any(p.search(key) for p in ignore_unexpected):
                    unexpected.append(key)
                continue
            if id(target) in loaded:
                continue   # a tied weight saved under several names: loaded once
            want = tuple(getattr(target, "ds_shape", target.shape))
            if shape != want:
                mismatched.append(f"{key} {list(shape)} in the checkpoint, {list(want)} in the model")
                continue
            loaded.add(id(target))
            plan.append((index, key))
    missing = [name for name, target in expected.items()
               if id(target) not in loaded and not any(p.search(name) for p in ignore_missing)]
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("size mismatch", mismatched)) if keys]
    if not problems:
        return plan, None
    return plan, (f"cannot load the model weights of {source!r} into {type(model).__name__}: {'; '.join(problems)} "
                  f"(the checkpoint does not belong to this config.json; save the model with save_pretrained)")


def _stream_checkpoint_zero3(model: torch.nn.Module, source: str, rank: int) -> None:
    """Fill the ZeRO-3-partitioned ``model`` from the checkpoint: rank 0 reads one tensor and
    scatters it, each rank receiving only its partition of it (written into ``p.ds_tensor``, no
    rank gathers the parameter); a parameter not partitioned the way that expects (another
    DeepSpeed, hpZ, quantised weights, NVMe) goes through ``GatheredParameters(modifier_rank=0)``
    (gathered on every rank, rank 0 copies in, DeepSpeed re-partitions); buffers are broadcast.
    Rank 0 alone reads the checkpoint; the plan (and any error) reaches the other ranks first, so
    every rank makes the same collectives in the same order or raises the same error."""
    import deepspeed
    import torch.distributed as dist

    from ..core.comm import all_reduce
    from ..seq2seq.model import ModelLoadError
    from ..shards.deepspeed_internals import zero3_partition_writable, zero3_scatter_into_partitions

    files = checkpoint_files(source)
    message: list = [None, None]
    if rank == 0:
        message = list(_load_plan(model, source, files))
    dist.broadcast_object_list(message, src=0)
    plan, error = message
    if error is not None:
        raise ModelLoadError(error)
    targets = model.state_dict(keep_vars=True)
    world = dist.get_world_size()
    # Scatter or gather is a different collective: a parameter is scattered only if every rank can
    # (one all-reduce of the "cannot" flags, on the device the process group reduces on).
    cannot = torch.tensor([int(not (hasattr(targets[key], "ds_id") and zero3_partition_writable(targets[key], world)))
                           for _, key in plan], dtype=torch.int32)
    writable = [not flag for flag in all_reduce(cannot, op="max").tolist()]
    reader, reader_index = None, None
    with torch.no_grad():
        for (index, key), scatter in zip(plan, writable):
            if rank == 0 and index != reader_index:
                if reader is not None:
                    reader.close()
                reader, reader_index = _Reader(files[index]), index
            value = reader.get(key) if rank == 0 else None
            target = targets[key]
            if scatter:
                zero3_scatter_into_partitions(target, value, rank, world)
            elif hasattr(target, "ds_id"):   # not partitioned as expected: DeepSpeed's own way
                with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    if rank == 0:
                        target.data.copy_(value)
            else:                          # a buffer (ZeRO-3 does not partition them)
                value = (value.to(target.device, target.dtype).contiguous() if rank == 0
                         else torch.empty_like(target))
                dist.broadcast(value, src=0)
                target.copy_(value)
            del value
    if reader is not None:
        reader.close()
