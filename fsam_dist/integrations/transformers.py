"""FSAM in the Hugging Face Trainer: ``FSAMTrainer`` / ``FSAMSeq2SeqTrainer`` run the two passes of
:class:`fsam_dist.FSAMOptimizer` inside the Trainer's own loop.

Swap the class and pass ``fsam_args``; everything else (datasets, collators, callbacks,
``compute_metrics``, ``--deepspeed ds.json``, ``torchrun``, ``accelerate launch`` with an FSDP
config) stays as it is::

    from fsam_dist.integrations.transformers import FSAMArguments, FSAMSeq2SeqTrainer
    trainer = FSAMSeq2SeqTrainer(model=model, args=training_args, fsam_args=FSAMArguments(rho=0.05), ...)

Where the passes hook in (transformers 5.x, accelerate 1.x; docs/design.md §4). The Trainer fetches a
step's micro-batches, calls :meth:`training_step` on each (all but the last under
``accelerator.no_sync``), then clips, steps the optimizer and the scheduler and zeroes the
gradients. Here ``training_step`` runs the Trainer's own forward/backward (pass 1) and keeps the
micro-batch; at the last one it runs ``ascend()``, pass 2 over the kept micro-batches (the same
``training_step`` again, with pass 1's RNG state per micro-batch, so dropout matches and ρ = 0 is
the plain Trainer), and ``descend_and_step()``, which restores the weights exactly, clips, steps
the base optimizer and the scheduler. The Trainer's own ``optimizer.step()``,
``lr_scheduler.step()`` and clipping then have nothing left to do: they are no-ops for the
training loop (:class:`_SteppedByFSAM`), and ``grad_norm`` in the logs is the one FSAM clipped.

Under DeepSpeed, accelerate's ``DeepSpeedEngineWrapper.backward`` would call ``engine.step()``
inside the last micro-batch's backward; the Trainer's accelerator gets a wrapper that only marks
the accumulation boundary and runs ``engine.backward`` (:class:`_EngineBackwardOnly`), and
``FSAMOptimizer`` drives the engine's step.

Under FSDP (an accelerate FSDP config, or ``--fsdp``) the model is wrapped here, as the plugin says,
by :func:`fsam_dist.train.fsdp_wrap.shard_model` before the Trainer builds the optimizer;
accelerate's preparation then keeps the wrapping. (accelerate's own FSDP2 wrapping gives the input
embedding a unit of its own and so unties T5's tied embeddings: ``encoder.embed_tokens`` ends up a
separate parameter that no optimizer holds.) On CPU accelerate never selects FSDP (it prepares the
model as DDP); :func:`_shard_on_cpu` switches its state to FSDP, after which accelerate's
``no_sync`` (gradient-sync deferral under accumulation) and the Trainer's FSDP checkpoints
(``save_fsdp_model``/``save_fsdp_optimizer``, DCP) run unchanged over gloo. ``--fsdp`` /
``fsdp_config`` build the same plugin as an accelerate config (both tested). With
``fsdp_state_dict_type: SHARDED_STATE_DICT`` the Trainer's ``save_model()`` writes no weights
(checkpoints are sharded); set ``FULL_STATE_DICT`` on the plugin before it, as
examples/run_seq2seq_fsam.py does.

Supported (tested on CPU: one process, torchrun DDP, deepspeed ZeRO-2/3, accelerate FSDP2 and FSDP1,
``TrainingArguments.fsdp``): gradient accumulation, ``max_grad_norm`` (FSAM clips the global norm of
the gradient it steps with; under DeepSpeed the JSON's ``gradient_clipping`` must be ``"auto"`` or
equal), the LR schedulers (stepped by FSAM's step, so not at a skipped non-finite step;
ReduceLROnPlateau stays with the Trainer), bf16, dropout (replayed),
``save_steps``/``resume_from_checkpoint`` (each rank's FSAM state,
``fsam_state_rank{r}-of-{world}.pt``; resume needs the same world size), callbacks, evaluation,
custom samplers/collators/``compute_loss``. Logged next to the Trainer's ``loss`` (pass 1) and
``grad_norm``: ``perturbed_loss``, ``sharpness``, ``perturbation_norm`` (means over the perturbed
steps since the last log), ``mask_density``, ``skipped_steps``.
Refused at start-up (``ValueError`` naming the field): ``optim`` values that update inside backward
(:data:`STEPS_INSIDE_BACKWARD`), ``fp16`` (GradScaler), ``torch_compile``, several GPUs in one
process (DataParallel), tensor/context/sequence parallelism, XLA FSDP, FSDP settings the FSDP
backend does not support (:func:`fsdp_settings_from_plugin`: activation checkpointing,
``cpu_ram_efficient_loading``, ignored modules, size-based wrapping, hybrid sharding, FSDP1 without
``use_orig_params``), an FSDP launch on CPU without ``use_cpu`` (each process would train alone),
and (the Trainer's own check) ``optimizers=(...)`` with FSDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import Seq2SeqTrainer, Trainer

from ..config import FSAMConfig, validate
from ..core import DEFAULT_EXCLUDE
from ..rng import rng_state, set_rng_state
from ..train.fsdp_setup import FSDPSettings, fsdp_settings_from_env, use_fsdp
from ..train.fsdp_wrap import shard_model

FSAM_STATE_NAME = "fsam_state_rank{rank}-of-{world}.pt"
"""The FSAM state file each rank writes into a Trainer checkpoint directory."""

STEPS_INSIDE_BACKWARD = ("lomo", "adalomo", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
                         "galore_adafactor_layerwise", "apollo_adamw_layerwise")
"""``TrainingArguments.optim`` values whose update runs inside ``backward`` (per parameter, from
gradient hooks): pass 1 would already move the weights, so FSAM cannot run on them."""


def _doc(name: str) -> str:
    return FSAMConfig.model_fields[name].description or ""


@dataclass
class FSAMArguments:
    """FSAM's settings for the Trainer; the field names are those of the CLI's ``fsam.*`` section,
    so ``HfArgumentParser((..., Seq2SeqTrainingArguments, FSAMArguments))`` gives ``--rho``,
    ``--keep_ratio``, ... Every value is checked by the CLI's own validation
    (:class:`fsam_dist.config.FSAMConfig`); a bad one is a ``ConfigError`` naming the field."""

    rho: float = field(default=0.05, metadata={"help": _doc("rho")})
    keep_ratio: float = field(default=0.1, metadata={"help": _doc("keep_ratio")})
    mask_interval: int = field(default=100, metadata={"help": _doc("mask_interval")})
    interval: int = field(default=1, metadata={"help": _doc("interval")})
    reuse_direction: bool = field(default=False, metadata={"help": _doc("reuse_direction")})
    reuse_alpha: float | None = field(default=None, metadata={"help": _doc("reuse_alpha")})
    norm: Literal["full", "masked"] = field(default="full", metadata={"help": _doc("norm")})
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE), metadata={"help": _doc("exclude")})
    excluded_mode: Literal["dense", "none"] = field(default="dense", metadata={"help": _doc("excluded_mode")})
    adaptive: bool = field(default=False, metadata={"help": _doc("adaptive")})
    same_dropout: bool = field(default=True, metadata={"help": _doc("same_dropout")})
    eps: float = field(default=1e-12, metadata={"help": _doc("eps")})

    def __post_init__(self) -> None:
        validate(FSAMConfig, dataclasses.asdict(self), prefix="fsam_args.")



# ------------------------------------------------------------------------------------------------
# What the Trainer's loop holds while FSAM steps
# ------------------------------------------------------------------------------------------------

class _SteppedByFSAM:
    """The Trainer's handle on its optimizer or LR scheduler during ``train()``: FSAM already
    stepped the real object at the end of ``training_step``, so ``step()`` does nothing here;
    everything else (``state_dict``, ``param_groups``, ``get_last_lr`` ...) is the object's own."""

    def __init__(self, target) -> None:
        object.__setattr__(self, "_target", target)

    def step(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_target"), name)

    def __setattr__(self, name, value) -> None:
        setattr(object.__getattribute__(self, "_target"), name, value)


def _unwrap_stepped(obj):
    return object.__getattribute__(obj, "_target") if isinstance(obj, _SteppedByFSAM) else obj


class _EngineBackwardOnly:
    """accelerate's ``DeepSpeedEngineWrapper`` without the ``engine.step()`` it runs after the
    boundary micro-batch's backward: marks the accumulation boundary, runs ``engine.backward``."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def backward(self, loss, sync_gradients: bool = True, **kwargs) -> None:
        self.engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
        self.engine.backward(loss, **kwargs)

    def get_global_grad_norm(self):
        norm = self.engine.get_global_grad_norm()
        return norm.item() if hasattr(norm, "item") else norm


# ------------------------------------------------------------------------------------------------
# Start-up checks
# ------------------------------------------------------------------------------------------------

def refuse_unsupported_args(args) -> None:
    """Raise ``ValueError`` naming each ``TrainingArguments`` field FSAM's two passes cannot work
    with. Reads only ``args`` (no device or process group is touched)."""
    optim = str(getattr(args.optim, "value", args.optim))
    if optim in STEPS_INSIDE_BACKWARD:
        raise ValueError(f"FSAMTrainer: optim={optim!r} updates the weights inside backward (per-parameter "
                         "gradient hooks), so there is no gradient to perturb along before the step; use an "
                         "optimizer that steps once per step, e.g. optim='adamw_torch'")
    if args.fp16:
        raise ValueError("FSAMTrainer: fp16=True (loss scaling with a GradScaler) is not supported: the scaler "
                         "would have to unscale, check and step around both passes; use bf16=True or fp32")
    if args.torch_compile:
        raise ValueError("FSAMTrainer: torch_compile=True is not supported (untested with the in-place "
                         "perturbation between the two passes); set torch_compile=False")
    fsdp_config = getattr(args, "fsdp_config", None) or {}
    if fsdp_config.get("xla", False):
        raise ValueError("FSAMTrainer: fsdp_config.xla (PyTorch/XLA FSDP) is not supported")


def _shard_on_cpu(accelerator, plugin_args: dict | None) -> bool:
    """Turn a CPU run whose accelerator was given an FSDP plugin (``accelerate launch`` with an FSDP
    config, or ``--fsdp``) into an FSDP run. accelerate 1.x selects FSDP only on accelerators
    (``AcceleratorState`` keeps ``MULTI_CPU``, which the Trainer would prepare as DDP); FSDP itself
    (``fully_shard`` / ``FullyShardedDataParallel`` over gloo), accelerate's ``no_sync`` and the
    Trainer's FSDP checkpoints (``save_fsdp_model`` / DCP) work on CPU, so the shared accelerate
    state is switched to ``DistributedType.FSDP`` with that plugin before anything is prepared.
    Returns whether it switched."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not use_fsdp():
        return False
    plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))   # --fsdp's, else the launcher's variables
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    return True


def fsdp_settings_from_plugin(plugin, mixed_precision: str) -> FSDPSettings:
    """The :class:`~fsam_dist.train.fsdp_setup.FSDPSettings` an accelerate FSDP plugin describes
    (built by accelerate from the launcher's ``FSDP_*`` variables, or by the Trainer from ``--fsdp``
    / ``fsdp_config``), checked by the same rules as the CLI's (an unsupported setting is a
    ``ValueError`` naming its yaml key)."""
    version = int(plugin.fsdp_version)
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(version), "ACCELERATE_MIXED_PRECISION": mixed_precision,
           "FSDP_STATE_DICT_TYPE": getattr(plugin.state_dict_type, "name", str(plugin.state_dict_type or ""))}
    if version == 2:
        env["FSDP_RESHARD_AFTER_FORWARD"] = str(bool(plugin.reshard_after_forward)).lower()
    else:
        strategy = plugin.sharding_strategy or plugin.reshard_after_forward   # as accelerate wraps FSDP1
        env["FSDP_SHARDING_STRATEGY"] = getattr(strategy, "name", str(strategy or "FULL_SHARD"))
        env["FSDP_USE_ORIG_PARAMS"] = str(bool(plugin.use_orig_params)).lower()
        env["FSDP_SYNC_MODULE_STATES"] = str(bool(plugin.sync_module_states)).lower()
    policy = plugin.auto_wrap_policy
    name = getattr(getattr(policy, "func", policy), "__name__", str(policy or ""))
    if name in ("transformer_auto_wrap_policy", "", "None", "TRANSFORMER_BASED_WRAP"):
        env["FSDP_AUTO_WRAP_POLICY"] = "TRANSFORMER_BASED_WRAP"
        env["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(plugin.transformer_cls_names_to_wrap or [])
    elif name == "NO_WRAP":
        env["FSDP_AUTO_WRAP_POLICY"] = "NO_WRAP"
    else:
        env["FSDP_AUTO_WRAP_POLICY"] = "SIZE_BASED_WRAP" if "size" in name.lower() else name
    offload = plugin.cpu_offload
    offloaded = type(offload).__name__ == "CPUOffloadPolicy" or bool(getattr(offload, "offload_params", False))
    env["FSDP_OFFLOAD_PARAMS"] = str(offloaded).lower()
    env["FSDP_ACTIVATION_CHECKPOINTING"] = str(bool(plugin.activation_checkpointing)).lower()
    env["FSDP_CPU_RAM_EFFICIENT_LOADING"] = str(bool(plugin.cpu_ram_efficient_loading)).lower()
    env["FSDP_IGNORED_MODULES"] = "x" if plugin.ignored_modules else ""
    settings = fsdp_settings_from_env(env)
    # The CLI applies these two itself (train/loading.py); here the user's script loads and the
    # Trainer owns gradient checkpointing, so they are refused rather than silently ignored.
    if settings.activation_checkpointing:
        raise ValueError("accelerate config: fsdp_activation_checkpointing: true is not supported with FSAMTrainer; "
                         "use --gradient_checkpointing (TrainingArguments), which the Trainer applies to the model")
    if plugin.cpu_ram_efficient_loading:
        raise ValueError("accelerate config: fsdp_cpu_ram_efficient_loading: true is not supported with FSAMTrainer "
                         "(the script's from_pretrained would leave ranks >= 1 on the meta device); set it to false")
    return settings


class _FSAMTrainerMixin:
    """The FSAM step inside ``transformers.Trainer`` (see the module docstring)."""

    def __init__(self, *args, fsam_args: FSAMArguments | None = None, **kwargs) -> None:
        if fsam_args is None:
            fsam_args = FSAMArguments()
        if not isinstance(fsam_args, FSAMArguments):
            raise TypeError(f"fsam_args must be an FSAMArguments, got {type(fsam_args).__name__}")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:   # before the Trainer builds its accelerator
            refuse_unsupported_args(training_args)
        self.fsam_args = fsam_args
        self.fsam = None
        self._fsam_micro_batches: list = []
        self._fsam_log: dict[str, float] = {}
        self._fsam_grad_norm: float | None = None
        super().__init__(*args, **kwargs)
        if not hasattr(self, "_prepare_for_training"):
            import transformers

            raise RuntimeError(f"FSAMTrainer needs transformers 5.x (Trainer._prepare_for_training); found "
                               f"{transformers.__version__}")
        if self.args.n_gpu > 1:
            raise ValueError(f"FSAMTrainer: {self.args.n_gpu} GPUs in one process (torch.nn.DataParallel) are not "
                             "supported; launch one process per GPU (torchrun, deepspeed, accelerate launch)")
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and any(getattr(parallelism, f"{kind}_size", 1) > 1 for kind in ("tp", "cp", "sp")):
            raise ValueError("FSAMTrainer: tensor, context or sequence parallelism (parallelism_config) is not "
                             "supported: FSAM's global norms and top-k assume data-parallel ranks")

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if _shard_on_cpu(self.accelerator, self.args.fsdp_plugin_args):
            self.is_fsdp_enabled = True
            sharded = "SHARDED_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type)
            if self.args.save_only_model and sharded:
                raise ValueError("save_only_model option is not compatible with FSDP state dict type "
                                 "'SHARDED_STATE_DICT'")   # the Trainer's own check, made before the switch
        if self.is_fsdp_enabled:   # every unsupported FSDP setting fails here, before training starts
            fsdp_settings_from_plugin(self.accelerator.state.fsdp_plugin, self.accelerator.mixed_precision)
        elif use_fsdp() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("FSAMTrainer: launched with an FSDP config, but accelerate found no accelerator and "
                             "use_cpu is off, so each process would train alone, unsharded; on CPU pass --use_cpu "
                             "(TrainingArguments.use_cpu=True): FSDP then runs over gloo")

    # ---- set-up around the Trainer's own preparation ------------------------------------------

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            # A later train() / evaluate() sees the Trainer's own objects again.
            self.optimizer = _unwrap_stepped(self.optimizer)
            self.lr_scheduler = _unwrap_stepped(self.lr_scheduler)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if self.is_fsdp_enabled:
            self._shard_model()
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self._attach_fsam(model, resume_from_checkpoint)
        return model, train_dataloader

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        """Under FSDP the model is sharded here first, also when evaluation comes before
        ``train()`` (the Trainer would otherwise hand the unwrapped model to accelerate's own FSDP
        wrapping, which fails on T5's tied embeddings)."""
        if self.is_fsdp_enabled and model is self.model:
            self._shard_model()
            model = self.model
        return super()._wrap_model(model, training, dataloader)

    def _shard_model(self) -> None:
        """Wrap the model with FSDP here, as the plugin says (:func:`fsdp_settings_from_plugin`),
        before the Trainer creates the optimizer and accelerate prepares it (which then keeps the
        wrapping). accelerate's own FSDP2 wrapping puts the input embedding in a separate unit and
        so unties T5-style tied embeddings (``encoder.embed_tokens`` gets its own parameter, held by
        no optimizer); :func:`fsam_dist.train.fsdp_wrap.shard_model` keeps tied parameters one."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(self.model, (FSDP, FSDPModule)):
            return
        plugin = self.accelerator.state.fsdp_plugin
        settings = fsdp_settings_from_plugin(plugin, self.accelerator.mixed_precision)
        device = self.accelerator.device
        wrapped = shard_model(self.model, device=torch.device("cpu") if device.type == "cpu" else device,
                              **settings.backend_kwargs())
        # Wrapped already: accelerate's preparation keeps an FSDP module as it is, but would still
        # resolve the policy's class names on it (FSDP2 renames the classes, and a shared list such as
        # T5Block,BartEncoderLayer names classes absent from the model).
        plugin.auto_wrap_policy = None
        self.model = self.model_wrapped = wrapped

    def _attach_fsam(self, model, resume_from_checkpoint) -> None:
        """Build the :class:`fsam_dist.FSAMOptimizer` over what the Trainer prepared (the DeepSpeed
        engine, or the DDP/FSDP/plain module and the base optimizer), load its state when resuming,
        and hand the Trainer no-op steps for the objects FSAM now steps."""
        from accelerate.utils import DeepSpeedSchedulerWrapper
        from transformers.optimization import GreedyLR

        from .. import FSAMOptimizer

        optimizer, scheduler = _unwrap_stepped(self.optimizer), _unwrap_stepped(self.lr_scheduler)
        # A scheduler stepped once per optimizer step is stepped by FSAM's step (so not at a skipped
        # step, as in the CLI). ReduceLROnPlateau-like ones follow evaluation metrics and stay with
        # the Trainer; one built from the DeepSpeed JSON is the engine's already.
        per_step = scheduler is not None and not isinstance(
            scheduler, (DeepSpeedSchedulerWrapper, torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))
        settings = dataclasses.asdict(self.fsam_args)
        clip = float(self.args.max_grad_norm)
        if self.is_deepspeed_enabled:
            engine = self.model_wrapped
            clipping = float(engine.gradient_clipping())
            if clipping != clip:
                raise ValueError(f"FSAMTrainer: the DeepSpeed config's gradient_clipping ({clipping}; DeepSpeed's "
                                 f"default when it is missing is 1.0) differs from TrainingArguments.max_grad_norm "
                                 f"({clip}); set \"gradient_clipping\": \"auto\" in the JSON")
            if per_step:
                engine.lr_scheduler = scheduler   # engine.step() steps it after an applied step
            self.accelerator.deepspeed_engine_wrapped = _EngineBackwardOnly(engine)
            self.fsam = FSAMOptimizer(engine, None, clip_grad_norm=clip, **settings)
        else:
            self.fsam = FSAMOptimizer(model, optimizer, scheduler=scheduler if per_step else None, clip_grad_norm=clip,
                                      **settings)
        if resume_from_checkpoint is not None:
            self._load_fsam_state(resume_from_checkpoint)
        self._fsam_micro_batches, self._fsam_log, self._fsam_grad_norm = [], {}, None
        self.optimizer = _SteppedByFSAM(optimizer)
        if per_step:
            self.lr_scheduler = _SteppedByFSAM(scheduler)

    # ---- the step -----------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Pass 1 on this micro-batch (the Trainer's own forward/backward); at the accumulation
        boundary, the whole FSAM step. Returns pass 1's loss, as the Trainer logs it."""
        if self.fsam is None:
            raise RuntimeError("FSAMTrainer.training_step runs inside train() only")
        rng = rng_state() if self.fsam_args.same_dropout else None
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._fsam_micro_batches.append((inputs, rng, loss))
        if self.accelerator.gradient_state.sync_gradients:
            self._fsam_step(model, num_items_in_batch)
        return loss

    def _fsam_step(self, model, num_items_in_batch) -> None:
        """ascend → pass 2 over the kept micro-batches (each with its pass-1 RNG state) → descend_and_step."""
        micro_batches, self._fsam_micro_batches = self._fsam_micro_batches, []
        after_pass1 = rng_state() if self.fsam_args.same_dropout else None
        gradient_state = self.accelerator.gradient_state
        perturbed_loss = None
        if self.fsam.ascend(loss=sum(loss for _, _, loss in micro_batches)):
            try:
                for i, (inputs, rng, _) in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    gradient_state._set_sync_gradients(last)   # accelerate's DeepSpeed boundary mark reads it
                    if rng is not None:
                        set_rng_state(rng)
                    with self._pass2_sync_context(model, last):
                        loss = super().training_step(model, inputs, num_items_in_batch)
                    perturbed_loss = loss if perturbed_loss is None else perturbed_loss + loss
            except BaseException:
                self.fsam.cancel()   # weights back to w before the error leaves the step
                raise
            finally:
                gradient_state._set_sync_gradients(True)
                if after_pass1 is not None:
                    set_rng_state(after_pass1)   # the RNG stream continues as in the plain Trainer
        self._record(self.fsam.descend_and_step(loss=perturbed_loss))

    def _pass2_sync_context(self, model, last: bool):
        """What the Trainer's loop wraps a micro-batch's backward in (``_run_epoch``): nothing at
        the boundary or under DeepSpeed, else ``accelerator.no_sync``."""
        if last or self.is_deepspeed_enabled:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def _record(self, stats: dict) -> None:
        """Sum FSAM's per-step figures (means over ranks, like the Trainer's loss) until the next log."""
        self._fsam_grad_norm = stats.get("clip_grad_norm")
        log = self._fsam_log
        log["steps"] = log.get("steps", 0) + 1
        log["skipped_steps"] = log.get("skipped_steps", 0) + int(stats.get("skipped", 0))
        if stats.get("perturbed") and not stats.get("skipped"):
            log["perturbed_steps"] = log.get("perturbed_steps", 0) + 1
            for key in ("perturbed_loss", "sharpness", "perturbation_norm"):
                log[key] = log.get(key, 0.0) + float(stats[key])
        if "mask_density" in stats:
            log["mask_density"] = float(stats["mask_density"])

    def _clip_grad_norm(self, model):
        """FSAM already clipped the gradient it stepped with; its norm before clipping."""
        return self._fsam_grad_norm

    def _get_grad_norm(self, model, grad_norm=None):
        return self._fsam_grad_norm if grad_norm is None else grad_norm

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's training log ("loss" = pass 1's) plus FSAM's figures since the last one:
        perturbed_loss and sharpness (means over perturbed steps), perturbation_norm, mask_density
        (at the last refresh), skipped_steps."""
        if "loss" in logs and self._fsam_log.get("steps"):
            log, self._fsam_log = self._fsam_log, {"mask_density": self._fsam_log.get("mask_density")}
            logs = dict(logs)
            perturbed = log.get("perturbed_steps", 0)
            if perturbed:
                for key in ("perturbed_loss", "sharpness", "perturbation_norm"):
                    logs[key] = round(log[key] / perturbed, 6)
            if log.get("mask_density") is not None:
                logs["mask_density"] = log["mask_density"]
            logs["skipped_steps"] = log.get("skipped_steps", 0)
        super().log(logs, start_time)

    # ---- checkpoints --------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's optimizer/scheduler files, plus this rank's FSAM state (its mask shards and
        step counter, CPU tensors) as :data:`FSAM_STATE_NAME`, written atomically."""
        with self._unstepped():   # FSDP's get_optimizer_state_dict needs the torch optimizer itself
            super()._save_optimizer_and_scheduler(output_dir)
        if self.fsam is None:
            return
        path = self._fsam_state_path(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        torch.save(self.fsam.state_dict(), f"{path}.tmp")
        os.replace(f"{path}.tmp", path)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """The Trainer's own loading; under FSDP1 the optimizer's state is created first. accelerate
        reads a sharded FSDP1 optimizer checkpoint into the template ``FSDP.optim_state_dict``
        gives, which is empty for an optimizer that has not stepped yet, so the Adam moments
        would silently not be restored; torch's ``get_optimizer_state_dict`` initialises them
        (zeros, without moving the weights)."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if checkpoint is not None and self.is_fsdp_enabled and plugin.fsdp_version == 1:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            optimizer = _unwrap_stepped(self.optimizer)
            get_optimizer_state_dict(self.model_wrapped, getattr(optimizer, "optimizer", optimizer))
        with self._unstepped():
            super()._load_optimizer_and_scheduler(checkpoint)

    @contextlib.contextmanager
    def _unstepped(self):
        """The Trainer's own optimizer and scheduler objects in place of the no-op-step handles."""
        handles = self.optimizer, self.lr_scheduler
        self.optimizer, self.lr_scheduler = _unwrap_stepped(self.optimizer), _unwrap_stepped(self.lr_scheduler)
        try:
            yield
        finally:
            self.optimizer, self.lr_scheduler = handles

    def _fsam_state_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, FSAM_STATE_NAME.format(rank=self.args.process_index,
                                                               world=self.args.world_size))

    def _load_fsam_state(self, checkpoint: str) -> None:
        path = self._fsam_state_path(checkpoint)
        if not os.path.isfile(path):
            found = sorted(f for f in os.listdir(checkpoint) if f.startswith("fsam_state_"))
            hint = (f"it holds {found}, written by a run with another number of processes: resume with the same "
                    "world size") if found else ("it was not written by an FSAM Trainer (or with save_only_model="
                                                  "True): start a new run from its weights instead of resuming")
            raise FileNotFoundError(f"resume_from_checkpoint={checkpoint}: no {os.path.basename(path)}; {hint}")
        self.fsam.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))


class FSAMTrainer(_FSAMTrainerMixin, Trainer):
    """``transformers.Trainer`` with shard-aware FSAM; one extra keyword, ``fsam_args``."""


class FSAMSeq2SeqTrainer(_FSAMTrainerMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` with shard-aware FSAM; one extra keyword, ``fsam_args``."""
