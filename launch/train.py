"""Fine-tune a T5/BART model with FSAM on any backend (see ``--help``).

    python launch/train.py --config configs/t5_cmudict.yaml
    torchrun --nproc_per_node 2 launch/train.py --config configs/t5_cmudict.yaml backend.name=ddp
    deepspeed --num_gpus 2 launch/train.py --config configs/t5_cmudict.yaml \\
        backend.deepspeed_config=configs/deepspeed/zero3.json
    accelerate launch --config_file configs/accelerate/fsdp2.yaml launch/train.py --config configs/t5_cmudict.yaml
    mpirun -n 2 python launch/train.py --config configs/t5_cmudict.yaml
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fsam_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
