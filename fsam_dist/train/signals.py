"""Stop at a step boundary on a signal: SLURM's time-limit warning (``#SBATCH --signal=USR1@N``).

:class:`StopRequest` records a SIGUSR1 in a handler (nothing else happens in the handler); after
every step the training loop asks :meth:`StopRequest.agreed`, one all-reduce (max) of this rank's
flag, so that every rank stops after the same step even when the signal reached only some of
them. The loop then writes a checkpoint (atomic, :mod:`.checkpoint`), leaves ``STOPPED`` in the
output directory for the batch script (launch/slurm/train.sbatch requeues the job or exits so
that the next ``sbatch`` resumes) and returns without the final model.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import torch

STOP_SIGNALS = (signal.SIGUSR1,)
MARKER = "STOPPED"
"""File in ``train.output_dir`` saying the last run stopped on a signal (JSON: step, signal, checkpoint)."""


class StopRequest:
    """Whether a stop signal arrived; installs its handler only in the main thread."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.installed = False

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handler)
            self.installed = True
        return self

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """Collective (every rank, after every step): whether any rank received a stop signal."""
        from ..core import all_reduce

        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            all_reduce(flag, "max")
        return bool(flag[0])

    def describe(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"


def write_marker(output_dir: Path, step: int, what: str, checkpoint: Path | None) -> None:
    (Path(output_dir) / MARKER).write_text(json.dumps({"step": step, "signal": what,
                                                       "checkpoint": None if checkpoint is None else str(checkpoint)}))


def clear_marker(output_dir: Path) -> None:
    (Path(output_dir) / MARKER).unlink(missing_ok=True)
