"""Shard-aware FSAM (Fisher-masked SAM): the same answer on one process, DDP, DeepSpeed ZeRO and FSDP.

``fsam_dist.FSAMOptimizer`` is the entry point for your own training loop (imported on first
use, so ``import fsam_dist.core`` stays torch-only).
"""

__all__ = ["FSAMOptimizer", "FSAMUsageError"]


def __getattr__(name: str):
    if name in __all__:
        from . import optimizer

        return getattr(optimizer, name)
    raise AttributeError(f"module 'fsam_dist' has no attribute {name!r}")
