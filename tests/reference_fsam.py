"""A deliberately naive FSAM, independent of ``fsam_dist``: the reference for the parity tests.

Nothing here is imported from ``fsam_dist`` (a bug shared by the library's core and a reference
built on it would pass every parity test). It follows DESIGN.md §1 line by line, the plainest
way: dense tensors, ``torch.cat`` of every score, ``torch.sort(stable=True, descending=True)``
for the top-k (ties go to the lower global position: parameters in ``named_parameters()``
order, then element index), a Python loop over parameters for e, ``torch.optim.AdamW`` on a
plain module, its own batch-mean loss, and a plain global-norm clip. Slow and memory-hungry on
purpose; only for tiny models and synthetic tensors.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

EXCLUDE = (r"(^|\.)bias$", r"(?i)layer_?norm", r"(?i)(embed|shared\.weight$)", r"relative_attention_bias")
"""Parameters the Fisher mask does not apply to, as in the official FSAM code (and the library's
default): biases, layer norms, embeddings (T5's ``shared``), T5's relative attention bias."""


def eligible(name: str, exclude=EXCLUDE) -> bool:
    return not any(re.search(pattern, name) for pattern in exclude)


def topk_mask(scores: list[torch.Tensor], keep_ratio: float) -> list[torch.Tensor]:
    """:func:`first_k` with k = round(κ · N), N the number of scores."""
    return first_k(scores, round(keep_ratio * sum(s.numel() for s in scores)))


def first_k(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The first ``k`` entries of a stable descending sort of the concatenated scores (ties go to
    the earlier position), as one bool tensor per score tensor."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return [m.view(s.shape) for m, s in zip(torch.split(chosen, [s.numel() for s in scores]), scores)]


def perturbation(weights: list[torch.Tensor], grads: list[torch.Tensor], masks: list[torch.Tensor | None], *,
                 rho: float, norm: str = "full", excluded: str = "dense", adaptive: bool = False,
                 eps: float = 1e-12) -> list[torch.Tensor]:
    """e for each parameter (DESIGN.md §1). ``masks[i]`` is None for an excluded parameter.

    n = ‖g‖ over every parameter ('full') or ‖m ⊙ g‖ over the eligible ones ('masked'), with
    g → |w| ⊙ g in the norm and g → |w|² ⊙ g in the direction for ASAM (``adaptive``)."""
    total = 0.0
    masked = 0.0
    for w, g, m in zip(weights, grads, masks):
        normed = (w.abs() * g if adaptive else g).double()
        total += float((normed ** 2).sum())
        if m is not None:
            masked += float(((normed * m) ** 2).sum())
    n = math.sqrt(total if norm == "full" else masked)
    out = []
    for w, g, m in zip(weights, grads, masks):
        d = w * w * g if adaptive else g
        if m is not None:
            out.append(rho * d * m / (n + eps))
        elif excluded == "dense":
            out.append(rho * d / (n + eps))
        else:
            out.append(torch.zeros_like(w))
    return out


def mean_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Token cross-entropy averaged over every target of ``batch`` (labels -100 ignored)."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                   if "attention_mask" in batch else None, labels=labels).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)


class NaiveFSAM:
    """FSAM + AdamW on one plain module, one global batch per step.

    ``optimizer``/``scheduler``: built by the caller on ``model`` (torch.optim.AdamW, a LambdaLR).
    """

    def __init__(self, model: torch.nn.Module, optimizer, scheduler=None, *, rho: float, keep_ratio: float,
                 mask_interval: int, norm: str = "full", excluded: str = "dense", adaptive: bool = False,
                 clip: float = 0.0, eps: float = 1e-12, exclude=EXCLUDE) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.rho, self.keep_ratio, self.mask_interval = rho, keep_ratio, mask_interval
        self.norm, self.excluded, self.adaptive, self.clip, self.eps = norm, excluded, adaptive, clip, eps
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.eligible = [eligible(n, exclude) for n, _ in self.params]
        self.masks: list[torch.Tensor | None] | None = None
        self.refreshed: list[int] = []

    def gradients(self, batch: dict) -> tuple[float, list[torch.Tensor]]:
        loss = mean_loss(self.model, batch)
        grads = torch.autograd.grad(loss, [p for _, p in self.params], allow_unused=True)
        return float(loss.detach()), [torch.zeros_like(p) if g is None else g for (_, p), g in zip(self.params, grads)]

    def step(self, step: int, batch: dict) -> dict:
        loss, grads = self.gradients(batch)
        if self.masks is None or step % self.mask_interval == 0:
            scores = [g * g for g, ok in zip(grads, self.eligible) if ok]   # 'batch' Fisher
            chosen = iter(topk_mask(scores, self.keep_ratio))
            self.masks = [next(chosen) if ok else None for ok in self.eligible]
            self.refreshed.append(step)
        weights = [p.detach() for _, p in self.params]
        e = perturbation(weights, grads, self.masks, rho=self.rho, norm=self.norm, excluded=self.excluded,
                         adaptive=self.adaptive, eps=self.eps)
        saved = [w.clone() for w in weights]
        with torch.no_grad():
            for w, d in zip(weights, e):
                w.add_(d)
        perturbed_loss, grads = self.gradients(batch)
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)
        total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        if self.clip > 0 and total > self.clip:
            grads = [g * (self.clip / (total + 1e-6)) for g in grads]
        for (_, p), g in zip(self.params, grads):
            p.grad = g.detach().clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return {"loss": loss, "perturbed_loss": perturbed_loss, "grad_norm": total}

    def named_masks(self) -> dict[str, torch.Tensor]:
        return {n: m for (n, _), m in zip(self.params, self.masks) if m is not None}
