"""What the FSAM math sees of a model: a list of local shard views.

A backend adapter (``fsam_dist.shards``) turns "a model on some backend, after a backward pass"
into ``list[ShardView]``; the core never learns which backend it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

CHUNK = 1 << 20
"""Entries per chunk in every full pass over a view or a mask (a multiple of 8, so chunks start on
a byte of a packed mask): no temporary in the core is larger than this."""


def chunks(n: int, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each chunk of ``range(n)``: the one loop every full pass uses."""
    for start in range(0, n, size):
        yield start, min(n, start + size)

DEFAULT_EXCLUDE = (
    r"(^|\.)bias$",
    r"(?i)layer_?norm",
    r"(?i)(embed|shared\.weight$)",
    r"relative_attention_bias",
)
"""Parameters the Fisher mask does not apply to (``re.search`` on the name), as in the official
FSAM code: biases, layer norms, embeddings (T5's ``shared``), T5's relative attention bias."""


@dataclass
class ShardView:
    """One contiguous piece of one trainable parameter that this rank owns.

    ``weights`` and ``grad`` are 1-D views of the same length, in the parameter's flattened
    (row-major) order. Writing into ``weights`` must change the weights the next forward reads --
    directly, or after the adapter's ``publish()`` hook (ZeRO-1/2 refresh their bit16 copies).
    """

    name: str
    """Parameter name as in ``model.named_parameters()``."""
    weights: torch.Tensor
    """Local weights to perturb (1-D, fp32 where a fp32 master exists)."""
    grad: torch.Tensor
    """Local gradient of those entries (1-D, reduced over data parallel), any float dtype."""
    position: int
    """Global index of ``weights[0]`` in the model-wide flattened order: parameters in
    ``named_parameters()`` order, then element index. Used only to break ties in the mask."""
    eligible: bool = True
    """Whether the Fisher mask applies; excluded entries are perturbed densely or not at all."""

    def __post_init__(self) -> None:
        if self.weights.dim() != 1 or self.grad.dim() != 1:
            raise ValueError(f"{self.name}: ShardView tensors must be 1-D views, got "
                             f"{tuple(self.weights.shape)} and {tuple(self.grad.shape)}")
        if self.weights.numel() != self.grad.numel():
            raise ValueError(f"{self.name}: weights ({self.weights.numel()}) and grad "
                             f"({self.grad.numel()}) differ in length")
        if self.position < 0:
            raise ValueError(f"{self.name}: negative global position {self.position}")

    @property
    def numel(self) -> int:
        return self.weights.numel()

    @property
    def key(self) -> tuple[str, int]:
        """(name, position): how masks and saved state refer to this view."""
        return (self.name, self.position)


def is_eligible(name: str, exclude: list[str] | tuple[str, ...]) -> bool:
    """A parameter is eligible for the Fisher mask unless a regex in ``exclude`` matches
    (``re.search``) its name."""
    return not any(re.search(pattern, name) for pattern in exclude)


def global_positions(named_numels: list[tuple[str, int]]) -> dict[str, int]:
    """Start position of each parameter in the model-wide flattened order."""
    positions, start = {}, 0
    for name, numel in named_numels:
        positions[name] = start
        start += numel
    return positions
