"""FSAM in your own PyTorch loop: one process or DDP (the four added lines are marked FSAM).

    python examples/custom_loop_ddp.py --steps 20                        # one process
    torchrun --nproc_per_node 2 examples/custom_loop_ddp.py --steps 20   # DDP, 2 processes (CPU: gloo)

A tiny random T5 learns to reverse tokens, 2 micro-batches accumulated per pass.
"""

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

import fsam_dist
from common import arguments, micro_batches, reversal_batch, setup, tiny_t5


def backward_pass(model, micro, ddp: bool) -> torch.Tensor:
    """Forward/backward over the micro-batches; DDP reduces at the last one only."""
    total = 0.0
    for i, mb in enumerate(micro):
        sync = model.no_sync() if ddp and i < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            loss = model(**mb).loss / len(micro)
            loss.backward()
        total += loss.detach()
    return total


def main() -> None:
    args = arguments()
    rank, world, device = setup()
    model = tiny_t5().to(device)
    if world > 1:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sam = fsam_dist.FSAMOptimizer(model, optimizer, rho=0.05, keep_ratio=0.1, mask_interval=10)   # FSAM
    for step in range(args.steps):
        micro = micro_batches(reversal_batch(step, 16, rank, world, device), 2)
        optimizer.zero_grad()
        loss = backward_pass(model, micro, world > 1)        # pass 1
        if sam.ascend(loss=loss):                            # FSAM: w <- w + e (global norm and mask)
            backward_pass(model, micro, world > 1)           # FSAM: pass 2 at w + e
        stats = sam.descend_and_step()                       # FSAM: w <- w - e, optimizer.step()
        if rank == 0:
            print(f"step {step + 1}: loss {stats['loss']:.4f} perturbed {stats['perturbed']} "
                  f"skipped {stats['skipped']}", flush=True)


if __name__ == "__main__":
    main()
