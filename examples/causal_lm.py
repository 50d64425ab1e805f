"""FSAM fine-tuning a decoder-only causal LM in your own loop (DDP or FSDP2), with step(closure).

    torchrun --nproc_per_node 2 examples/causal_lm.py --steps 20            # DDP
    torchrun --nproc_per_node 2 examples/causal_lm.py --fsdp2 --steps 20    # FSDP2
    python examples/causal_lm.py --steps 20                                 # one process

A tiny random Llama learns a repeating-token language; load yours with
``AutoModelForCausalLM.from_pretrained(path)``. Dropout masks are replayed in pass 2
(``same_dropout=True``), so ``rho=0`` gives exactly the plain AdamW run.
"""


import torch
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import fsam_dist
from common import arguments, setup


def batch(step: int, rank: int, world: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 32, (16, 1), generator=g)
    ids = (start + torch.arange(12) % 4) % 32   # a pattern the model can learn
    return ids[rank * 16 // world:(rank + 1) * 16 // world].to(device)


def main() -> None:
    args = arguments("--fsdp2")
    rank, world, device = setup()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                         attention_dropout=0.1)).to(device)
    if args.fsdp2:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif world > 1:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sam = fsam_dist.FSAMOptimizer(model, optimizer, rho=0.05, keep_ratio=0.1, mask_interval=10)
    for step in range(args.steps):
        ids = batch(step, rank, world, device)

        def closure():
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss

        sam.step(closure)
        if rank == 0:
            stats = sam.last_stats
            print(f"step {step + 1}: loss {stats['loss']:.4f} sharpness {stats.get('sharpness', 0.0):.2e}", flush=True)


if __name__ == "__main__":
    main()
