"""Resume at another world size: the global batch kept, and DeepSpeed's universal conversion.

The FSAM state reshards in :mod:`fsam_dist.core.reshard`, FSDP's through
torch.distributed.checkpoint (:meth:`FSDPBackend.load_state`); what is left is the run's global
batch (:func:`keep_global_batch`, before any process group) and converting a DeepSpeed ZeRO-1/2/3
checkpoint into DeepSpeed's universal format (:func:`write_universal`, called by
:func:`fsam_dist.train.checkpoint.load`). docs/reliability.md §6 lists what each backend does.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ..config import Config, ConfigError


def keep_global_batch(cfg: Config, saved_config: dict, saved_world: int, world_size: int, path: Path) -> str | None:
    """Resuming at ``world_size`` a run written at ``saved_world``: keep its global batch
    G = micro_batch_size × world × grad_accum_steps (so step t still reads examples t·G …). When
    this run's G differs and G is a multiple of micro_batch_size × world_size, set
    ``cfg.train.grad_accum_steps`` to the quotient and return the log line saying so; otherwise
    raise one ConfigError naming the fields. None when nothing changes."""
    try:
        saved_train = saved_config["train"]
        target = int(saved_train["micro_batch_size"]) * saved_world * int(saved_train["grad_accum_steps"])
    except (KeyError, TypeError, ValueError):
        return None   # different_run() reports a config it cannot read
    t = cfg.train
    if t.micro_batch_size * world_size * t.grad_accum_steps == target:
        return None
    per_step = t.micro_batch_size * world_size
    if target % per_step:
        raise ConfigError(
            f"train.grad_accum_steps: checkpoint {path} was written at {saved_world} processes with global batch "
            f"{target} (train.micro_batch_size × processes × train.grad_accum_steps); at {world_size} processes "
            f"with train.micro_batch_size {t.micro_batch_size} no whole train.grad_accum_steps keeps it ({target} "
            f"is not a multiple of {t.micro_batch_size} × {world_size}): set train.micro_batch_size and "
            f"train.grad_accum_steps so that micro_batch_size × {world_size} × grad_accum_steps = {target}, or "
            f"resume with a number of processes N for which micro_batch_size × N divides {target}")
    old, t.grad_accum_steps = t.grad_accum_steps, target // per_step
    return (f"resuming at {world_size} processes a run written at {saved_world}: train.grad_accum_steps "
            f"{old} → {t.grad_accum_steps} keeps the global batch at {target} "
            f"({t.micro_batch_size} × {world_size} × {t.grad_accum_steps})")


def write_universal(source: str | Path, out: str | Path) -> None:
    """Convert the DeepSpeed checkpoint ``source`` (``DeepSpeedBackend.save_state``'s directory)
    into a universal checkpoint under ``out`` (``out/state``, ``out/latest_universal``) with
    ``deepspeed.checkpoint.ds_to_universal`` -- as ``python -m deepspeed.checkpoint.ds_to_universal
    --input_folder SOURCE/state --output_folder OUT/state --inject_missing_state`` would (our
    checkpoints carry no universal-checkpoint info of their own). No collectives: rank 0 calls it."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ds_to_universal.main(argparse.Namespace(
        input_folder=os.path.join(str(source), "state"), output_folder=os.path.join(str(out), "state"),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
