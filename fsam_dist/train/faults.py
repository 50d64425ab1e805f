"""Fault injection: a test and operations hook, inert unless ``FSAM_FAULT`` is set.

The reliability suite (tests/test_reliability.py, docs/reliability.md) uses it to put a NaN/inf
or a SIGKILL at an exact place of a real multi-process run::

    FSAM_FAULT="rank=1,step=5,at=pass2,action=nan"
    FSAM_FAULT="rank=1,step=3,at=pass1,action=inf,target=grad;rank=0,step=8,at=checkpoint,action=kill"

Faults are separated by ``;``; each is ``key=value`` pairs:

``rank``    the rank it fires on (``*``, the default: every rank). A single process is rank 0.
``step``    the optimizer step as numbered in metrics.jsonl (1 = the first step); for
            ``at=checkpoint`` the N of the ``checkpoints/step-N`` being written.
``at``      where, within that step:

            * ``pass1`` -- the last micro-batch of pass 1 (after the earlier ones accumulated);
            * ``pass2`` -- the last micro-batch of pass 2 (the weights are perturbed, w + e);
            * ``between_passes`` -- the first micro-batch of pass 2, before its forward: the
              perturbation has just been applied (a kill here dies holding w + e);
            * ``fisher`` -- the gradient of the first single-example backward of an 'empirical'
              Fisher refresh (whatever ``target`` says), so the step's Fisher scores are
              non-finite (needs ``fsam.fisher: empirical``; the 'batch' scores are pass 1's g²,
              which ``pass1`` covers);
            * ``checkpoint`` -- while ``checkpoints/step-N`` is written: ``kill`` fires after this
              rank's backend state and rank file are written, before the barrier and COMPLETE;
              ``corrupt`` fires on rank 0 after the manifest is written and flips a byte of
              ``rank-R.pt`` (R = ``rank``, default 0), i.e. a write the disk damaged.
``action``  ``nan`` | ``inf`` (the value put into ``target``) | ``kill`` (SIGKILL this process,
            before the micro-batch's forward) | ``corrupt`` (``at=checkpoint`` only).
``target``  ``loss`` (default: this rank's loss is non-finite, its gradient stays finite) or
            ``grad`` (the loss stays finite, every gradient entry of this rank's backward is
            non-finite, before any reduction).

Before a kill, one line ``fsam-fault: SIGKILL rank R step N at AT t=<unix time>`` goes to stderr
(the tests measure how long the launcher takes to bring the job down from it).

The training loop asks :func:`from_env` once; when the variable is unset it gets None and uses
the plain loss function and checkpoint save (no wrapper, no per-step cost). Otherwise it wraps the
loss function once (:meth:`FaultPlan.wrap`) and announces each step (:meth:`FaultPlan.start_step`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ENV = "FSAM_FAULT"
PLACES = ("pass1", "pass2", "between_passes", "fisher", "checkpoint")
ACTIONS = ("nan", "inf", "kill", "corrupt")
TARGETS = ("loss", "grad")


@dataclass(frozen=True)
class Fault:
    step: int
    at: str
    action: str
    rank: int | None = None       # None: every rank
    target: str = "loss"

    @property
    def value(self) -> float:
        return float("nan") if self.action == "nan" else float("inf")


def parse(spec: str, fisher: str = "batch") -> list[Fault]:
    """The faults of an ``FSAM_FAULT`` value; a malformed one is a ValueError naming it."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        try:
            fields = dict(item.split("=", 1) for item in part.split(","))
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            unknown = set(fields) - {"rank", "step", "at", "action", "target"}
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)}")
            rank = fields.get("rank", "*")
            fault = Fault(step=int(fields["step"]), at=fields["at"], action=fields["action"],
                          rank=None if rank == "*" else int(rank), target=fields.get("target", "loss"))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{ENV}: cannot parse {part!r} ({err}); expected e.g. "
                             "'rank=1,step=5,at=pass2,action=nan'") from None
        if fault.at not in PLACES or fault.action not in ACTIONS or fault.target not in TARGETS:
            raise ValueError(f"{ENV}: {part!r}: at must be one of {PLACES}, action one of {ACTIONS}, "
                             f"target one of {TARGETS}")
        if (fault.at == "checkpoint" and fault.action not in ("kill", "corrupt")) or \
                (fault.action == "corrupt" and fault.at != "checkpoint"):
            raise ValueError(f"{ENV}: {part!r}: at=checkpoint takes action=kill or corrupt; corrupt only "
                             "goes with at=checkpoint")
        if fault.at == "fisher" and fisher != "empirical":
            raise ValueError(f"{ENV}: {part!r}: at=fisher needs fsam.fisher=empirical (the 'batch' Fisher "
                             "scores are pass 1's g²: inject at=pass1 instead)")
        faults.append(fault)
    return faults


def from_env(rank: int, fisher: str = "batch") -> FaultPlan | None:
    """This rank's faults from ``FSAM_FAULT``, or None when it is unset or empty."""
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return None
    return FaultPlan(parse(spec, fisher), rank)


def _kill(rank: int, step: int, at: str) -> None:
    print(f"fsam-fault: SIGKILL rank {rank} step {step} at {at} t={time.time():.3f}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``value`` (NaN/inf).
    (``setup_context`` form, so it also runs under the batched Fisher's ``torch.func`` transforms.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, value):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.value = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


class FaultPlan:
    """The faults that fire on this rank."""

    def __init__(self, faults: list[Fault], rank: int) -> None:
        self.rank = rank
        self.faults = [f for f in faults if f.rank is None or f.rank == rank]
        self.all_faults = faults

    def _find(self, step: int, places: set[str]) -> Fault | None:
        return next((f for f in self.faults if f.step == step and f.at in places), None)

    def start_step(self, step: int) -> None:
        """Optimizer step ``step`` (1-based) begins: the wrapped loss function counts its calls anew."""
        self.step = step
        self.calls = {"train": 0, "fisher": 0}

    def wrap(self, loss_fn: Callable, micro_batches: int) -> Callable:
        """``loss_fn`` wrapped once for the whole run: at the step :meth:`start_step` announced it
        puts that step's faults in place (``micro_batches`` per pass locates pass 1 and pass 2)."""
        m = micro_batches
        self.start_step(0)
        if not any(f.at != "checkpoint" for f in self.faults):
            return loss_fn   # nothing fires in the steps on this rank: no wrapper

        def wrapped(model, batch):
            # DeepSpeed's engine.eval() only switches engine.module; DDP/FSDP1 wrap .module too
            if getattr(model, "module", model).training:
                i = self.calls["train"]
                self.calls["train"] += 1
                places = {p for p, hit in (("pass1", i == m - 1), ("between_passes", i == m),
                                           ("pass2", i == 2 * m - 1)) if hit}
            else:   # the empirical Fisher runs in eval mode
                places = {"fisher"} if self.calls["fisher"] == 0 else set()
                self.calls["fisher"] += 1
            fault = self._find(self.step, places) if places else None
            if fault is None:
                return loss_fn(model, batch)
            if fault.action == "kill":
                _kill(self.rank, self.step, fault.at)
            loss = loss_fn(model, batch)
            if fault.target == "grad" or fault.at == "fisher":   # the Fisher scores are gradients
                return _PoisonGrad.apply(loss, fault.value)
            return loss + fault.value

        return wrapped

    def checkpoint_hook(self, step: int, phase: str, directory: Path) -> None:
        """Called by :func:`fsam_dist.train.checkpoint.save`: phase 'written' on every rank once
        its files are written, phase 'manifest' on rank 0 after the manifest is written."""
        if phase == "written":
            fault = self._find(step, {"checkpoint"})
            if fault is not None and fault.action == "kill":
                _kill(self.rank, step, "checkpoint")
        elif phase == "manifest":
            for fault in self.all_faults:
                if fault.step == step and fault.action == "corrupt":
                    target = Path(directory) / f"rank-{fault.rank or 0}.pt"
                    data = bytearray(target.read_bytes())
                    data[len(data) // 2] ^= 0xFF
                    target.write_bytes(bytes(data))
                    print(f"fsam-fault: corrupted {target}", file=sys.stderr, flush=True)
