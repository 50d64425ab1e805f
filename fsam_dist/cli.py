"""``fsam-train --config FILE [key.path=value ...]`` (also ``launch/train.py``)."""

from __future__ import annotations

import argparse
import os
import sys

USAGE = """Fine-tune a T5/BART model with FSAM on any backend.

    python launch/train.py --config configs/t5_cmudict.yaml                            # one process
    torchrun --nproc_per_node 2 launch/train.py --config ... backend.name=ddp          # DDP
    deepspeed --num_gpus 2 launch/train.py --config ... backend.deepspeed_config=configs/deepspeed/zero3.json
    accelerate launch --config_file configs/accelerate/fsdp2.yaml launch/train.py --config ...
    mpirun -n 2 python launch/train.py --config ...                                      # MPI

key.path=value arguments override the YAML (parsed as YAML scalars).
"""


def main(argv: list[str] | None = None) -> int:
    if "OMP_NUM_THREADS" not in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        # The deepspeed launcher, unlike torchrun, leaves every process one thread per core (~3x slower
        # on CPU). Effective only before torch is imported, hence here.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args(argv)

    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        from .train.loop import run

        run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
