"""The process's random-number state as plain data: saved and replayed by the two-pass step
(same dropout in both passes) and by checkpoints.

CUDA semantics: the CPU generator and, where CUDA is initialised, the *current* device's
generator only -- every launcher here drives one device per process, and a state holding every
visible device's generator could not be loaded on a machine with a different device count.
"""

from __future__ import annotations

import torch


def rng_state() -> dict:
    """The CPU generator's state and, if CUDA is initialised, the current device's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Replay what :func:`rng_state` returned (a CUDA state is ignored where there is no CUDA)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
