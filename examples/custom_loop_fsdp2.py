"""FSAM in your own loop on FSDP2 (``fully_shard``): norms and the Fisher top-k over all shards.

    torchrun --nproc_per_node 2 examples/custom_loop_fsdp2.py --steps 20   # CPU: gloo

Build the optimizer after ``fully_shard`` (it replaces the parameters by sharded DTensors).
FSDP1 works the same with ``FullyShardedDataParallel(model, use_orig_params=True)``.
"""


import torch
from torch.distributed.fsdp import fully_shard

import fsam_dist
from common import arguments, micro_batches, reversal_batch, setup, tiny_t5


def backward_pass(model, micro) -> torch.Tensor:
    total = 0.0
    for i, mb in enumerate(micro):
        model.set_requires_gradient_sync(i == len(micro) - 1)   # reduce-scatter at the last micro-batch
        loss = model(**mb).loss / len(micro)
        loss.backward()
        total += loss.detach()
    return total


def main() -> None:
    args = arguments()
    rank, world, device = setup()
    model = tiny_t5().to(device)
    for block in [m for m in model.modules() if type(m).__name__ == "T5Block"]:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sam = fsam_dist.FSAMOptimizer(model, optimizer, rho=0.05, keep_ratio=0.1, mask_interval=10, clip_grad_norm=1.0)
    for step in range(args.steps):
        micro = micro_batches(reversal_batch(step, 16, rank, world, device), 2)
        optimizer.zero_grad()
        loss = backward_pass(model, micro)
        if sam.ascend(loss=loss):
            backward_pass(model, micro)
        stats = sam.descend_and_step()   # also clips to the global norm 1.0
        if rank == 0:
            print(f"step {step + 1}: loss {stats['loss']:.4f} grad norm {stats['clip_grad_norm']:.3f}", flush=True)


if __name__ == "__main__":
    main()
