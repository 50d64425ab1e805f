"""Where a run's numbers go: ``metrics.jsonl`` (always) and TensorBoard event files (optional).

Training records carry ``step`` and the step statistics (loss, perturbed_loss, sharpness, grad_norm,
perturbation_norm, mask_density, mask_jaccard, skipped, lr, step_time, target_tokens_per_s);
evaluation records carry ``step`` and ``eval/<metric>`` keys. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("fsam_dist")


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.file = open(output_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.tensorboard: the tensorboard package is missing (pip install tensorboard); "
                            "writing metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def truncate_after(path: Path, last_step: int) -> None:
    """Drop records after the step a run resumes from (they are about to be recomputed)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
