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


def empirical_fisher(backend: Backend, loss_fn: LossFn, examples: Iterable[dict]) -> list[torch.Tensor]:
    """Σ over single examples of the squared gradient of the example's log-likelihood.

    Every rank must be given the *same* examples: each backward is then averaged over identical
    gradients, so it yields that one example's gradient whatever the world size. Runs in eval
    mode (no dropout) under a forked RNG, so training randomness is untouched.
    """
    scores: list[torch.Tensor] | None = None
    model = backend.model
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            for example in examples:
                backend.zero_grad()
                backend.forward_backward(loss_fn, example, backend.loss_multiplier / backend.world_size, last=True)
                squares = fisher_scores(backend.views())
                scores = squares if scores is None else [s.add_(q) for s, q in zip(scores, squares)]
    finally:
        model.train(was_training)
        backend.zero_grad()
    if scores is None:
        raise ValueError("empirical Fisher: the Fisher loader yielded no examples")
    return scores


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
