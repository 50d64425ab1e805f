"""The CLI's optimizer step: micro-batches, the global-batch loss normalisation and the
'empirical' Fisher, around :class:`fsam_dist.FSAMOptimizer` (the one two-pass implementation).

    pass 1 over the step's micro-batches → g        (all ranks agree to skip on NaN/inf)
    FSAM: refresh mask if due, w ← w + e             (fsam_dist.core)
    pass 2 over the same micro-batches → g₂          (same dropout RNG as pass 1 if same_dropout)
    w ← w − e exactly; clip; base step; scheduler step

With ``fsam.interval = k`` only steps ``t % k == 0`` have the perturbation and pass 2; the others
run exactly the plain base-optimizer step (``fsam=None``), bit for bit -- or, with
``fsam.reuse_direction`` (LookSAM), that step on g + α‖g‖/‖g_v‖ g_v, g_v kept from the last
perturbed step (α = ‖g_v‖/‖g‖ there by default).

The step's loss is the mean over every target of the global batch: each micro-batch's loss sum
is divided by the target count all-reduced over ranks, so splitting the batch over ranks or
micro-batches leaves the gradient unchanged.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch

from ..core import FSAM, fisher_scores, global_sums
from ..optimizer import FSAMOptimizer
from ..rng import rng_state
from ..shards.base import Backend, LossFn


def _run_pass(backend: Backend, loss_fn: LossFn, micro_batches: list[dict], scale: float) -> torch.Tensor:
    """Forward/backward over all micro-batches; returns this rank's loss sum (fp64, on the
    model's device: no host sync per micro-batch)."""
    total = None
    for i, mb in enumerate(micro_batches):
        loss_sum = backend.forward_backward(loss_fn, mb, scale, last=i == len(micro_batches) - 1).double()
        total = loss_sum if total is None else total + loss_sum
    return total


FISHER_CHUNK_BYTES = 1 << 30
"""The batched 'empirical' Fisher takes per-example gradients for at most this many bytes of
them at once (chunk × the eligible parameters' bytes), at least one example per chunk."""
FISHER_MAX_CHUNK = 16
"""...and at most this many examples per chunk (larger chunks were slower on the CPU: the
per-example gradients stop fitting in cache)."""


def empirical_fisher(backend: Backend, loss_fn: LossFn, examples: Iterable[dict], *,
                     chunk: int | None = None, batched: bool = True) -> list[torch.Tensor]:
    """Σ over single examples of the squared gradient of the example's log-likelihood.

    Every rank must be given the *same* examples. Runs in eval mode (no dropout) under a forked
    RNG, so training randomness is untouched. Two ways, the same scores to fp32 rounding:

    * **batched** where the rank holds every trainable parameter whole
      (:meth:`~fsam_dist.shards.base.Backend.whole_model`: one process, DDP, ZeRO-0/1/2):
      per-example gradients of the eligible parameters with ``torch.func`` --
      ``vmap(grad(functional_call))`` over chunks of ``chunk`` examples of the same shapes
      (default: :data:`FISHER_MAX_CHUNK`, fewer where the chunk's gradients would pass
      :data:`FISHER_CHUNK_BYTES`); every rank computes the same gradients on its own (no
      collective), squares them and keeps its views' pieces. A value equal in every example of a
      chunk (e.g. the all-ones attention mask of an unpadded example) is passed unbatched.
      ``randomness='different'``: a model that draws random numbers in eval mode gets independent
      draws per example, as in the loop (not the same numbers).
    * **loop** where parameters are sharded (ZeRO-3, FSDP), or where the batched way raised on
      any rank (data-dependent control flow under ``vmap``, out of memory, examples that are not
      single-example batches: warned once): one backward per example through the backend, whose
      reduction averages identical gradients, so it yields that one example's gradient whatever
      the world size. Every rank agrees on the way with one all-reduce of a flag (the loop's
      collectives then run on every rank). ``batched=False`` forces the loop (benchmarks, tests).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("empirical Fisher: the Fisher loader yielded no examples")
    model = backend.model
    was_training = model.training
    whole = backend.whole_model() if batched else None
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            scores, why = None, None
            if whole is not None:
                whole.module.eval()
                try:
                    scores = _batched_fisher(whole, loss_fn, examples, chunk)
                except (RuntimeError, ValueError, NotImplementedError) as err:   # OOM is a RuntimeError
                    why = f"{type(err).__name__}: {err}"
                failed = global_sums([torch.tensor(float(why is not None))], backend.world_group)
                if float(failed[0]) > 0:
                    scores = None
                    _warn_once(backend, why or "another rank could not")
            if scores is None:
                scores = _looped_fisher(backend, loss_fn, examples)
    finally:
        model.train(was_training)
        backend.zero_grad()
    return scores


def _warn_once(backend: Backend, why: str) -> None:
    if not getattr(backend, "_fisher_warned", False):
        backend._fisher_warned = True
        warnings.warn(f"empirical Fisher: the batched per-example gradients (torch.func.vmap) failed "
                      f"({why.splitlines()[0][:300]}); using one backward per example", RuntimeWarning,
                      stacklevel=3)


def _looped_fisher(backend: Backend, loss_fn: LossFn, examples: list[dict]) -> list[torch.Tensor]:
    scores = None
    for example in examples:
        backend.zero_grad()
        backend.forward_backward(loss_fn, example, backend.loss_multiplier / backend.world_size, last=True)
        squares = fisher_scores(backend.views())
        scores = squares if scores is None else [s.add_(q) for s, q in zip(scores, squares)]
    return scores


class _LossModule(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` can swap its parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _batched_fisher(whole, loss_fn: LossFn, examples: list[dict], chunk: int | None) -> list[torch.Tensor]:
    """Σ_i g_i² of the eligible parameters, g_i by ``vmap(grad(...))`` over chunks of examples."""
    from torch.func import functional_call, grad, vmap

    for ex in examples:
        if not isinstance(ex, dict) or not all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 1
                                               for v in ex.values()):
            raise ValueError("an example is not a dict of tensors of batch size 1")
    wrapper = _LossModule(whole.module, loss_fn)
    params = {f"model.{n}": p.detach() for n, p in whole.trainable if whole.eligible[n]}
    fixed = {f"model.{n}": p.detach() for n, p in whole.trainable if not whole.eligible[n]}
    per_example = sum(p.numel() * p.element_size() for p in params.values())
    if chunk is None:
        chunk = max(1, min(FISHER_MAX_CHUNK, FISHER_CHUNK_BYTES // max(1, per_example)))

    def loss(diff: dict, batch: dict) -> torch.Tensor:
        return functional_call(wrapper, {**diff, **fixed}, (batch,), tie_weights=True)

    def example_loss(diff: dict, batched: dict, shared: dict) -> torch.Tensor:
        return loss(diff, {**{k: v.unsqueeze(0) for k, v in batched.items()}, **shared})

    one_grad = grad(loss)
    per_example_grads = vmap(grad(example_loss), in_dims=(None, 0, None), randomness="different")
    totals = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    groups: dict[tuple, list[dict]] = {}   # examples of the same shapes, in order of appearance
    for ex in examples:
        groups.setdefault(tuple((k, tuple(v.shape), v.dtype) for k, v in ex.items()), []).append(ex)
    for group in groups.values():
        for start in range(0, len(group), chunk):
            part = group[start:start + chunk]
            stacked = {k: torch.cat([ex[k] for ex in part]) for k in part[0]}
            same = [k for k, v in stacked.items() if bool((v == v[:1]).all())]   # one sync per key
            with torch.no_grad(), whole.context(), warnings.catch_warnings():
                # (the module's own parameters record no graph; torch's notes that an op has no
                # batching rule and runs per example are not news to the user)
                warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                if len(same) == len(stacked):   # one example, or copies of one: no vmap
                    grads = {k: g.unsqueeze(0) for k, g in one_grad(params, part[0]).items()}
                    copies = float(len(part))
                else:
                    grads = per_example_grads(params, {k: v for k, v in stacked.items() if k not in same},
                                              {k: part[0][k] for k in same})
                    copies = 1.0
            for name in list(grads):
                g = grads.pop(name).to(torch.float32).square_().sum(0)
                totals[name].add_(g if copies == 1.0 else g.mul_(copies))
    return whole.pieces({name[len("model."):]: t for name, t in totals.items()})


def train_step(backend: Backend, loss_fn: LossFn, micro_batches: list[dict], *, step: int,
               count_targets: Callable[[dict], int], fsam: FSAM | None = None, clip_grad_norm: float = 0.0,
               same_dropout: bool = True, fisher_examples: Callable[[], Iterable[dict]] | None = None) -> dict:
    """One optimizer step (FSAM two-pass, or a plain step when ``fsam`` is None).

    Args:
        backend: the adapter (``fsam_dist.shards``).
        loss_fn: ``loss_fn(model, micro_batch)`` → sum of the per-target losses.
        micro_batches: this rank's micro-batches of the step.
        step: optimizer step index (drives the mask refresh schedule and, with
            ``fsam.interval > 1``, which steps are perturbed).
        count_targets: number of targets in a micro-batch (e.g. label tokens).
        fsam: the FSAM state, or None for the base optimizer alone. At a step that is not a
            perturbing one (``not fsam.perturbs_at(step)``) the step is exactly the one with
            ``fsam=None``: no FSAM work, no FSAM collectives.
        clip_grad_norm: global-norm clip applied to the gradient the base optimizer uses (0 = off).
        same_dropout: replay pass 1's RNG state in pass 2 (then ρ = 0 is the base optimizer).
        fisher_examples: called at an 'empirical' refresh; yields single-example batches,
            identical on every rank.

    Returns:
        Statistics: ``loss`` (global mean at w), ``perturbed_loss`` (at w + e), ``sharpness``,
        ``grad_norm``, ``perturbation_norm``, ``skipped`` (1 if the step was skipped),
        ``perturbed`` (1 if FSAM perturbed this step; with an ``fsam`` only), ...
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    local_targets = sum(int(count_targets(mb)) for mb in micro_batches)
    total_targets = float(global_sums([torch.tensor(float(local_targets))], backend.world_group)[0])
    if total_targets <= 0:
        raise ValueError("train_step: the global batch has no targets")
    scale = backend.loss_multiplier / total_targets
    sam = FSAMOptimizer.for_backend(backend, fsam, clip_grad_norm=clip_grad_norm, step=step)

    scores = None
    if fsam is not None and fsam.perturbs_at(step) and fsam.fisher == "empirical" and fsam.refresh_due(step):
        if fisher_examples is None:
            raise ValueError("fisher='empirical' needs fisher_examples")
        scores = empirical_fisher(backend, loss_fn, fisher_examples())

    rng = rng_state() if same_dropout else None
    backend.zero_grad()
    loss = _run_pass(backend, loss_fn, micro_batches, scale)
    # NaN Fisher scores count as a non-finite pass 1: the step is skipped everywhere.
    second = None
    if sam.ascend(loss=loss, rng_state=rng, fisher_scores=scores):
        try:
            second = _run_pass(backend, loss_fn, micro_batches, scale)
        except BaseException:
            sam.cancel()   # the weights go back to w before anything else
            raise
    stats = {"targets": total_targets, **sam.descend_and_step(loss=second)}
    stats["loss"] = stats.pop("loss_sum") / total_targets
    stats.pop("perturbed_loss", None)
    if "perturbed_loss_sum" in stats:
        stats["perturbed_loss"] = stats.pop("perturbed_loss_sum") / total_targets
        stats["sharpness"] = stats["perturbed_loss"] - stats["loss"]
    if fsam is None:
        stats.pop("perturbed")
    return stats
