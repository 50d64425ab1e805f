"""Seq2seq loss as a *sum* over target tokens (the step divides by the global target count)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def seq2seq_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sum of token cross-entropies of ``batch['labels']`` (``-100`` = padding, ignored)."""
    labels = batch["labels"]
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    logits = outputs.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_target_tokens(batch: dict) -> int:
    """Targets that count in the loss: label tokens that are not padding."""
    return int((batch["labels"] != IGNORE_INDEX).sum())
