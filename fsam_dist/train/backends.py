"""Pick and build the backend adapter from the config and the launcher's environment.

Everything that can be checked without a process group (backend vs. launcher, the DeepSpeed
JSON against train.*/optim.*, the FSDP settings accelerate passed) is checked in
:func:`preflight`, which runs before ``init_process_group``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..core import DEFAULT_EXCLUDE
from .distributed import DistEnv
from .fsdp_setup import fsdp_backend, fsdp_settings_from_env, use_fsdp

FP16_REASON = ("FSAM's two passes would have to drive DeepSpeed's fp16 loss scaler (overflow decided on every "
               "rank in both passes, the scale backed off on a skipped step), which cannot be verified without a GPU")
UNSUPPORTED_ZERO = {
    "offload_optimizer": "ZeRO-Offload keeps the fp32 masters and their gradients in CPU/NVMe buffers the FSAM "
                         "adapter does not read",
    "offload_param": "ZeRO-Infinity parameter offload keeps the partitions in CPU/NVMe buffers the FSAM adapter "
                     "does not perturb",
    "zero_hpz_partition_size": "ZeRO++ hpZ gathers pass 2's weights from a secondary copy taken before the "
                               "perturbation, so FSAM would silently become the base optimizer",
    "zero_quantized_weights": "ZeRO++ quantized weights all-gather a quantized copy that the in-place "
                              "perturbation of the partition does not reach reliably (untested)",
    "zero_quantized_nontrainable_weights": "ZeRO++ quantized weights (untested with FSAM)",
    "zero_quantized_gradients": "ZeRO++ quantized gradients change the gradient FSAM's mask and norm are "
                                "computed from (untested)",
}
"""ZeRO options preflight refuses: key → why (each is 'off' at its DeepSpeed default)."""

NO_DECAY = DEFAULT_EXCLUDE[:2]
"""Parameters without weight decay, as in Hugging Face's Trainer: biases and layer norms (the
first two of the Fisher mask's default exclusions)."""


def resolve_backend(cfg: Config, env: DistEnv) -> str:
    """The backend name this run uses ('single', 'ddp', 'deepspeed', 'fsdp')."""
    name = cfg.backend.name
    if name == "auto":
        if cfg.backend.deepspeed_config:
            name = "deepspeed"
        elif _use_fsdp():
            name = "fsdp"
        elif env.world_size > 1:
            name = "ddp"
        else:
            name = "single"
    return name


def _use_fsdp() -> bool:
    try:
        return use_fsdp()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def preflight(cfg: Config, env: DistEnv, name: str) -> dict | None:
    """Check the backend against the launcher before any process group starts. Returns the
    DeepSpeed config dict for 'deepspeed', None otherwise."""
    launchers = {"ddp": "torchrun --nproc_per_node N launch/train.py --config ...",
                 "deepspeed": "deepspeed --num_gpus N launch/train.py --config ...",
                 "fsdp": "accelerate launch --config_file configs/accelerate/fsdp2.yaml launch/train.py --config ..."}
    if name in launchers and not env.distributed:
        raise ConfigError(f"backend.name: {name!r} needs a distributed launcher (no RANK/WORLD_SIZE in the "
                          f"environment); launch with `{launchers[name]}`, or set backend.name: single")
    if name == "single" and env.world_size > 1:
        raise ConfigError(f"backend.name: 'single' but the launcher started {env.world_size} processes; "
                          "use ddp, deepspeed or fsdp (or auto)")
    if name == "deepspeed" and not cfg.backend.deepspeed_config:
        raise ConfigError("backend.deepspeed_config: required for backend.name: deepspeed "
                          "(e.g. configs/deepspeed/zero2.json)")
    if name != "deepspeed" and cfg.backend.deepspeed_config and cfg.backend.name != "auto":
        raise ConfigError(f"backend.deepspeed_config is set but backend.name is {name!r}; remove one")
    if cfg.train.precision == "fp16":
        raise ConfigError(f"train.precision: fp16 is not supported: {FP16_REASON}; use bf16 (or fp32)")
    if name == "deepspeed":
        return deepspeed_config(cfg, env.world_size)
    if name == "fsdp":
        try:
            fsdp_settings_from_env()
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return None


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The user's DeepSpeed JSON with batch sizes, accumulation, clipping and precision filled in
    from train.*/optim.*; a value that disagrees is an error naming both fields."""
    path = Path(cfg.backend.deepspeed_config)
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("backend.deepspeed_config: DeepSpeed is not installed; install the extra with "
                          "`pip install 'fsam-dist[deepspeed]'` (or use backend.name ddp/fsdp)")
    if not path.is_file():
        raise ConfigError(f"backend.deepspeed_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"backend.deepspeed_config: {path} is not valid JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"backend.deepspeed_config: {path} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove {key!r}; the optimizer and schedule come from optim.* "
                              "(a torch AdamW is passed to DeepSpeed)")
    t = cfg.train
    wanted = {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (t.grad_accum_steps, "train.grad_accum_steps"),
        "train_batch_size": (t.micro_batch_size * t.grad_accum_steps * world_size,
                             "train.micro_batch_size × grad_accum_steps × world size"),
        "gradient_clipping": (cfg.optim.clip_grad_norm, "optim.clip_grad_norm"),
    }
    for key, (value, source) in wanted.items():
        if key in ds and ds[key] != "auto" and not math.isclose(float(ds[key]), float(value)):
            raise ConfigError(f"{path}: {key} = {ds[key]} disagrees with {source} = {value}; "
                              f"remove {key} from the JSON (or set it to \"auto\")")
        ds[key] = value
    if ds.get("fp16", {}).get("enabled", False) not in (False, "auto"):
        raise ConfigError(f"{path}: fp16.enabled is set, but fp16 is not supported: {FP16_REASON}; remove the "
                          "fp16 section (or set enabled to \"auto\") and use train.precision: bf16")
    zero = ds.get("zero_optimization", {})
    for key, why in UNSUPPORTED_ZERO.items():
        if _zero_option_on(zero.get(key)):
            raise ConfigError(f"{path}: zero_optimization.{key} is not supported: {why}; remove it from the JSON")
    for precision in ("bf16", "fp16"):
        section = ds.get(precision, {})
        enabled = section.get("enabled", False)
        wanted_on = t.precision == precision
        if enabled not in ("auto", wanted_on):
            raise ConfigError(f"{path}: {precision}.enabled = {enabled} disagrees with train.precision = "
                              f"{t.precision!r}; remove it from the JSON (or set it to \"auto\")")
        ds[precision] = {**section, "enabled": wanted_on}
    stage = ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 0 and t.precision != "fp32":
        raise ConfigError(f"{path}: ZeRO stage 0 with {t.precision} is not supported; use stage 1-3 or fp32")
    if t.precision == "bf16":
        # DeepSpeed's default accumulates bf16 gradients in bf16; the tested path (and the one whose
        # gradient FSAM's norm and mask should see) accumulates in fp32.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds.setdefault("steps_per_print", 10 ** 9)   # our progress bar replaces DeepSpeed's step log
    return ds


HIDDEN_SIZED = {"reduce_bucket_size": lambda h: h * h,
                "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                "stage3_param_persistence_threshold": lambda h: 10 * h}
"""``zero_optimization`` keys whose ``"auto"`` is sized from the model's hidden size h, as Hugging
Face's Trainer sizes them (DeepSpeed's own default reduce bucket, 5e8 elements, is a 2 GB fp32
buffer per rank whatever the model)."""


def fill_hidden_sized(ds_config: dict, model_config, path: str) -> dict:
    """``ds_config`` with the ``"auto"`` values of :data:`HIDDEN_SIZED` filled from
    ``model_config.hidden_size`` (T5/BART: ``d_model``); an error naming the key if the model has none."""
    zero = ds_config.get("zero_optimization", {})
    auto = [key for key in HIDDEN_SIZED if zero.get(key) == "auto"]
    if not auto:
        return ds_config
    hidden = getattr(model_config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise ConfigError(f"{path}: zero_optimization.{auto[0]} is \"auto\", which is sized from the model's "
                          "hidden size, but the model config has no hidden_size; set a number")
    return {**ds_config, "zero_optimization": {**zero, **{key: HIDDEN_SIZED[key](hidden) for key in auto}}}


def _zero_option_on(value) -> bool:
    """Whether a zero_optimization entry turns its feature on (offload: a device other than none;
    hpZ: a partition size above 1; the quantization switches: true)."""
    if isinstance(value, dict):
        return str(value.get("device", "none")).lower() not in ("none", "")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value > 1
    return value not in (None, "none", "")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(re.search(r, name) for r in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def make_scheduler(optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total, kind = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_backend(name: str, cfg: Config, env: DistEnv, model: torch.nn.Module, device: torch.device,
                  ds_config: dict | None, from_rank0: bool = False):
    """The adapter for ``name`` around ``model`` (already on ``device``). ``from_rank0`` (FSDP): only
    rank 0's model holds the weights, the others are on the meta device (``train/loading.py``)."""
    exclude = tuple(cfg.fsam.exclude)
    if name in ("single", "ddp"):
        from ..shards.local import LocalBackend

        wrapped = model
        if name == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = make_optimizer(param_groups(model, cfg.optim.weight_decay), cfg)
        autocast = torch.bfloat16 if cfg.train.precision == "bf16" else None
        return LocalBackend(wrapped, optimizer, make_scheduler(optimizer, cfg), exclude=exclude,
                            autocast_dtype=autocast)
    if name == "deepspeed":
        from .deepspeed_setup import build_deepspeed

        optimizer = make_optimizer(param_groups(model, cfg.optim.weight_decay), cfg)
        return build_deepspeed(model, ds_config, optimizer, make_scheduler(optimizer, cfg), exclude=exclude)
    if name == "fsdp":
        return fsdp_backend(
            model, fsdp_settings_from_env(),
            optimizer_factory=lambda m: make_optimizer(param_groups(m, cfg.optim.weight_decay), cfg),
            scheduler_factory=lambda opt: make_scheduler(opt, cfg), precision=cfg.train.precision,
            exclude=exclude, from_rank0=from_rank0)
    raise ConfigError(f"backend.name: unknown backend {name!r}")
