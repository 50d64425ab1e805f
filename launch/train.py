"""Fine-tune a T5/BART model with FSAM on any backend.

    python launch/train.py --config configs/t5_tiny.yaml                               # one process
    torchrun --nproc_per_node 2 launch/train.py --config ... backend.name=ddp          # DDP
    deepspeed --num_gpus 2 launch/train.py --config ... backend.deepspeed_config=configs/deepspeed/zero3.json
    accelerate launch --config_file configs/accelerate/fsdp2.yaml launch/train.py --config ...
    mpirun -n 2 python launch/train.py --config ...                                      # MPI

``key.path=value`` arguments override the YAML (parsed as YAML scalars).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "OMP_NUM_THREADS" not in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
    # The deepspeed launcher, unlike torchrun, leaves every process one thread per core (~3x slower on CPU).
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))

from fsam_dist.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config(args.config, args.overrides)
        from fsam_dist.train.loop import run

        run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
