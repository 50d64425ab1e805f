"""The two-pass FSAM optimizer step, the same for every backend.

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

from ..core import FSAM, count_nonfinite, global_sums
from ..shards.base import Backend, LossFn


def _rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _run_pass(backend: Backend, loss_fn: LossFn, micro_batches: list[dict], scale: float) -> tuple[float, int]:
    """Forward/backward over all micro-batches; returns (local loss sum, local non-finite count)."""
    loss_total = torch.zeros((), dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        loss_total += backend.forward_backward(loss_fn, mb, scale, last=i == len(micro_batches) - 1).double().cpu()
    bad = count_nonfinite([v.grad for v in backend.views()]) + int(not bool(torch.isfinite(loss_total)))
    return loss_total, bad


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
                squares = [v.grad.to(torch.float32).square() for v in backend.views() if v.eligible]
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
    stats: dict = {"targets": total_targets, "skipped": 0}
    reuse = None
    if fsam is not None:
        stats["perturbed"] = 0
        if not fsam.perturbs_at(step):
            # interval: a plain base-optimizer step (LookSAM: on a corrected gradient)
            fsam, reuse = None, fsam if fsam.reuse_direction else None

    scores = None
    if fsam is not None and fsam.fisher == "empirical" and fsam.refresh_due(step):
        if fisher_examples is None:
            raise ValueError("fisher='empirical' needs fisher_examples")
        scores = empirical_fisher(backend, loss_fn, fisher_examples())
        # NaN Fisher scores count as a non-finite pass 1: the step is skipped everywhere.
        scores_bad = count_nonfinite(scores)
    else:
        scores_bad = 0

    rng = _rng_state() if same_dropout else None
    backend.zero_grad()
    loss_sum, bad = _run_pass(backend, loss_fn, micro_batches, scale)
    loss_sum, bad = global_sums([loss_sum, torch.tensor(float(bad + scores_bad))], backend.world_group).tolist()
    stats["loss"] = loss_sum / total_targets
    if bad:
        backend.skip_step()
        stats["skipped"] = 1
        return stats

    if fsam is not None:
        try:
            stats.update(fsam.ascend(backend.views(), step, backend.group, scores=scores))
            stats["perturbed"] = 1
            backend.publish(restored=False)
            backend.zero_grad()
            if rng is not None:
                _set_rng_state(rng)
            loss_sum, bad = _run_pass(backend, loss_fn, micro_batches, scale)
        finally:
            # Whatever happened in pass 2, the weights go back to w before anything else.
            fsam.descend(backend.views())
            backend.publish(restored=True)
        loss_sum, bad = global_sums([loss_sum, torch.tensor(float(bad))], backend.world_group).tolist()
        stats["perturbed_loss"] = loss_sum / total_targets
        stats["sharpness"] = stats["perturbed_loss"] - stats["loss"]
        if bad:
            backend.skip_step()
            stats["skipped"] = 1
            return stats
        if fsam.reuse_direction:
            stats.update(fsam.look(backend.views(), backend.group))
    elif reuse is not None:
        stats.update(reuse.reuse(backend.views(), backend.group))

    stats["clip_grad_norm"] = backend.clip_and_step(clip_grad_norm)
    return stats
