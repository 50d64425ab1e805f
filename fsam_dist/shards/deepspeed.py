"""Where DeepSpeed ZeRO stages 0-3 keep the local shards (docs/design.md §3; facts: docs/backends.md).

* ZeRO-0 (fp32): every rank holds the full averaged gradient and weights, as DDP (``REPLICATED``).
* ZeRO-1/2: each rank owns a fragment of the flattened parameters: its fp32 master and reduced
  gradient. The perturbation goes into the master and ``update_lp_params()`` copies it into the
  replicated weights the forward reads; the restore is published by ``engine.step()``'s own
  all-gather (anything that could read the weights before that publishes it first).
* ZeRO-3: each parameter's padded partition ``p.ds_tensor`` (bf16: its fp32 master, copied into
  ``p.ds_tensor`` by ``publish``) and ``safe_get_local_grad``; ``publish`` releases every gathered
  copy so the next forward re-gathers it.

A fragment's global position is its parameter's start in the model-wide flattened order plus its
offset in the parameter, as in :class:`~fsam_dist.shards.local.LocalBackend`, so masks agree.
Internals without public API: :mod:`.deepspeed_internals`; building an engine: ``train/deepspeed_setup.py``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..core import DEFAULT_EXCLUDE, REPLICATED, ShardView, global_positions, grad_norm, is_eligible
from .base import Backend, LossFn, WholeModel
from .deepspeed_internals import (check_engine, load_universal, zero3_copy_masters, zero3_local, zero3_publish,
                                  zero12_address, zero12_clear_grads, zero12_fragment)


class DeepSpeedBackend(Backend):
    """The adapter of a DeepSpeed engine at ZeRO stage 0 (fp32), 1, 2 or 3 (fp32 or bf16).

    Args:
        engine: what ``deepspeed.initialize`` returned first, built with a torch optimizer over
            ``model.parameters()`` (so DeepSpeed compiles no fused Adam) and the LR scheduler,
            which the engine steps (to build one from a config dict:
            :func:`fsam_dist.train.deepspeed_setup.build_deepspeed`). ``gradient_clipping`` must
            equal the ``clip_grad_norm`` given to the step: DeepSpeed clips inside
            ``engine.step()``, and its default is 1.0.
        exclude: regexes of parameter names the Fisher mask does not apply to.

    The step marks the accumulation boundary of its own micro-batch loop and already divides the
    loss by the global target count, so ``engine.backward`` runs with ``scale_wrt_gas=False``.
    Not supported: ZeRO offload, fp16 (needs a GPU; untested).
    """

    def __init__(self, engine, exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDE) -> None:
        check_engine(engine)
        self.engine, self.optimizer, self.scheduler = engine, engine.optimizer, engine.lr_scheduler
        self.stage = int(engine.zero_optimization_stage())
        self.module = self.engine.module
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        dp_group = self.engine.data_parallel_group
        self.dp_rank = dist.get_rank(dp_group)
        self.trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.positions = global_positions([(n, getattr(p, "ds_numel", p.numel())) for n, p in self.trainable])
        self.eligible = {n: is_eligible(n, exclude) for n, _ in self.trainable}
        # ZeRO-1/2 (DeepSpeedZeroOptimizer, or BF16_Optimizer for bf16 with fp32 gradient
        # accumulation at stage 1) link fp32 master fragments; ZeRO-0 in fp32 is the torch optimizer.
        self.layout = {0: "replicated", 1: "fragments", 2: "fragments", 3: "zero3"}[self.stage]
        self.world_group = None
        self.group = REPLICATED if self.layout == "replicated" else dp_group
        # DeepSpeed averages gradients over the data-parallel ranks.
        self.loss_multiplier = float(dist.get_world_size(dp_group))
        # ZeRO-3: the gradient partitions handed out by the last views() (possibly copies), written
        # back before the step so an in-place change (LookSAM's g + α g_v) reaches the optimizer.
        self._zero3_grads: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.bit16 = bool(engine.bfloat16_enabled())
        self._unpublished = False   # ZeRO-1/2: restored masters not yet in the replicated weights

    def _publish_restored(self) -> None:
        """All-gather the restored masters if :meth:`publish` deferred it (same path on every rank)."""
        if self._unpublished:
            self._unpublished = False
            self.optimizer.update_lp_params()

    def at_boundary(self) -> bool:
        """Whether the last ``engine.backward`` ran at the accumulation boundary (gradients reduced)."""
        return bool(self.engine.is_gradient_accumulation_boundary())

    @property
    def model(self) -> torch.nn.Module:
        return self.engine

    def forward_backward(self, loss_fn: LossFn, micro_batch: dict, scale: float, last: bool) -> torch.Tensor:
        self._zero3_grads = []   # stale once this backward adds to the gradients
        self._publish_restored()
        self.engine.set_gradient_accumulation_boundary(last)
        loss_sum = loss_fn(self.engine, micro_batch)
        self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
        return loss_sum.detach()

    def whole_model(self) -> WholeModel | None:
        """ZeRO-0/1/2 without DeepSpeed's torch autocast: every rank's module holds the whole
        (replicated) weights; a deferred restore is published first. ZeRO-3: None (partitioned)."""
        if self.layout == "zero3" or self.engine.torch_autocast_enabled():
            return None
        self._publish_restored()

        def pieces(full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            out = []
            for name, p in self.trainable:   # the pieces views() lists, in its order
                address = (0, p.numel()) if self.layout == "replicated" else zero12_address(p)
                if address is not None and address[1] and self.eligible[name]:
                    out.append(full[name].reshape(-1).narrow(0, *address))
            return out

        return WholeModel(self.module, self.trainable, self.eligible, pieces)

    def views(self) -> list[ShardView]:
        views = []
        self._zero3_grads = []
        for name, p in self.trainable:
            if self.layout == "replicated":
                if p.grad is None:   # unused in this batch: its gradient is zero
                    p.grad = torch.zeros_like(p)
                piece = (0, p.detach().view(-1), p.grad.view(-1))
            elif self.layout == "zero3":
                *piece, padded = zero3_local(p, self.dp_rank)
                self._zero3_grads.append((p, padded))
            else:
                piece = zero12_fragment(p)
            if piece is not None and piece[1].numel():
                offset, weights, grad = piece
                views.append(ShardView(name, weights, grad, self.positions[name] + offset, self.eligible[name]))
        return views

    def publish(self, restored: bool) -> None:
        if self.layout == "fragments":
            if restored:   # engine.step() all-gathers the masters next (module docstring)
                self._unpublished = True
                return
            self.optimizer.update_lp_params()   # fp32 master → replicated weights (all-gather)
        elif self.layout == "zero3":
            if self.bit16:
                zero3_copy_masters(p for _, p in self.trainable)
            zero3_publish(self.optimizer, torch.device(self.engine.device))

    def zero_grad(self) -> None:
        self._zero3_grads = []
        self._publish_restored()   # a skipped step: no engine.step() publishes the restore
        if self.layout == "fragments":
            zero12_clear_grads(self.optimizer)
        else:
            # Not engine.zero_grad(): it only drops p.grad, and ZeRO-3's partitioned gradients
            # would accumulate g1 + g2 (its optimizer.zero_grad also resets micro_step_id).
            self.optimizer.zero_grad(set_to_none=True)

    def clip_and_step(self, max_norm: float) -> float:
        clipping = float(self.engine.gradient_clipping())
        if clipping != float(max_norm):
            raise ValueError(f"DeepSpeedBackend: the DeepSpeed config's gradient_clipping ({clipping}; DeepSpeed's "
                             f"default is 1.0) differs from clip_grad_norm ({max_norm}): DeepSpeed clips inside "
                             "engine.step(), so set them equal (0.0 = off)")
        if self.layout == "zero3" and self._zero3_grads:
            from deepspeed.utils import safe_set_local_grad

            for p, grad in self._zero3_grads:
                safe_set_local_grad(p, grad)
        norm = grad_norm(self.views(), self.group)
        applied, skipped = self.engine.global_steps, self.engine.skipped_steps
        self.engine.step()   # clips, steps the optimizer, then the scheduler; clears the gradients
        if self.engine.global_steps != applied + 1 or self.engine.skipped_steps != skipped:
            self._publish_restored()   # no optimizer step ran: nothing all-gathered the masters
        self._unpublished = False
        return norm

    def save_state(self, path: str) -> None:
        """``engine.save_checkpoint`` into the directory ``path`` (each rank writes its shards)."""
        self._publish_restored()
        self.engine.save_checkpoint(str(path), tag="state")

    def load_state(self, path: str, saved_world_size: int | None = None) -> None:
        """``engine.load_checkpoint`` of what :meth:`save_state` wrote. When :meth:`needs_universal`,
        ``path`` is a universal checkpoint (:func:`fsam_dist.train.elastic.write_universal`),
        loaded by :func:`~.deepspeed_internals.load_universal`."""
        if self.needs_universal(saved_world_size):
            load_universal(self.engine, str(path))
            return
        load_path, _ = self.engine.load_checkpoint(str(path), tag="state")
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeedBackend: no DeepSpeed checkpoint in {path}")

    def needs_universal(self, saved_world_size: int | None) -> bool:
        """ZeRO-1/2/3 state written at another data-parallel size (ZeRO-0's is replicated)."""
        dp = dist.get_world_size(self.engine.data_parallel_group)
        return saved_world_size is not None and saved_world_size != dp and self.stage > 0

    def full_weights_module(self) -> torch.nn.Module | None:
        """The module at stages 0-2 (every rank holds all current weights); None under ZeRO-3."""
        return None if self.layout == "zero3" else self.module

    def full_state_dict(self) -> dict | None:
        """The consolidated ``state_dict`` of the module on rank 0 (CPU tensors), None elsewhere (collective).

        Trainable parameters come from the fp32 masters (``safe_get_full_fp32_param``, one
        collective per parameter, except ZeRO-0 in fp32); frozen parameters and buffers as the
        module holds them (gathered under ZeRO-3). Tied parameters appear under each name.
        """
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        self._publish_restored()
        full = {}
        for _, p in self.trainable:
            value = p.detach() if self.layout == "replicated" else safe_get_full_fp32_param(p)
            if self.rank == 0:   # on the CPU: the whole model never sits on rank 0's GPU
                full[id(p)] = value.detach().reshape(getattr(p, "ds_shape", p.shape)).to("cpu", torch.float32,
                                                                                       copy=True)
        frozen = [p for p in self.module.parameters() if not p.requires_grad]
        gather = deepspeed.zero.GatheredParameters(frozen) if self.stage == 3 and frozen else contextlib.nullcontext()
        with gather:
            if self.rank != 0:
                return None
            state = self.module.state_dict(keep_vars=True)
            return {k: full[id(v)] if id(v) in full else v.detach().to("cpu", copy=True) for k, v in state.items()}
