"""FSAM in your own loop on a DeepSpeed engine (ZeRO 0-3).

    deepspeed --num_gpus 2 examples/custom_loop_deepspeed.py --stage 3 --steps 20   # CPU: 2 processes, gloo

What the engine expects around the two passes:
* call ``engine.backward(loss)`` in both passes and never ``engine.step()`` yourself:
  ``sam.descend_and_step()`` calls it (it clips, steps the optimizer and the engine's scheduler);
* each pass must end at a gradient-accumulation boundary: with M micro-batches set
  ``gradient_accumulation_steps: M`` and call ``engine.set_gradient_accumulation_boundary(i == M - 1)``
  before each backward (the engine divides each loss by M); ``sam.ascend()`` raises otherwise;
* ``sam.ascend()`` clears the gradients between the passes (ZeRO's own buffers too);
* ``gradient_clipping`` in the config must equal ``clip_grad_norm`` (DeepSpeed's default is 1.0).
"""

import argparse
import os

import deepspeed
import torch

import fsam_dist
from common import micro_batches, reversal_batch, tiny_t5

MICRO = 2


def backward_pass(engine, micro) -> torch.Tensor:
    total = 0.0
    for i, mb in enumerate(micro):
        engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
        loss = engine(**mb).loss
        engine.backward(loss)
        total += loss.detach() / len(micro)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--local_rank", type=int, default=0)   # passed by the deepspeed launcher
    args = parser.parse_args()
    if not torch.cuda.is_available():
        from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build

        skip_cpu_shm_build()   # the CPU shared-memory op serves inference only; building it takes ~1 min
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model = tiny_t5()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)   # a torch optimizer: no fused-Adam build
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 16 // world // MICRO, "gradient_accumulation_steps": MICRO,
        "gradient_clipping": 0.0, "zero_optimization": {"stage": args.stage}, "steps_per_print": 10 ** 9})
    sam = fsam_dist.FSAMOptimizer(engine, rho=0.05, keep_ratio=0.1, mask_interval=10, clip_grad_norm=0.0)
    for step in range(args.steps):
        micro = micro_batches(reversal_batch(step, 16, rank, world, engine.device), MICRO)
        loss = backward_pass(engine, micro)
        if sam.ascend(loss=loss):
            backward_pass(engine, micro)
        stats = sam.descend_and_step()
        if rank == 0:
            print(f"step {step + 1}: loss {stats['loss']:.4f} perturbed {stats['perturbed']}", flush=True)


if __name__ == "__main__":
    main()
