"""What the examples share and you would replace: a tiny random model, a toy task, process set-up."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def arguments(*flags: str) -> argparse.Namespace:
    """``--steps N`` (default 20) and the given boolean ``flags``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    for flag in flags:
        parser.add_argument(flag, action="store_true")
    return parser.parse_args()


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group when launched by torchrun/deepspeed."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda" if cuda else "cpu")


def tiny_t5():
    """A random T5 with a few thousand parameters (use ``from_pretrained`` on your checkpoint)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def reversal_batch(step: int, size: int, rank: int, world: int, device) -> dict:
    """This rank's share of a global batch of a toy task: reverse 6 random tokens."""
    g = torch.Generator().manual_seed(step)
    src = torch.randint(2, 32, (size, 6), generator=g)
    mine = slice(rank * size // world, (rank + 1) * size // world)
    return {"input_ids": src[mine].to(device), "attention_mask": torch.ones_like(src[mine]).to(device),
            "labels": src[mine].flip(1).to(device)}


def micro_batches(batch: dict, count: int) -> list[dict]:
    n = batch["input_ids"].size(0) // count
    return [{k: v[i * n:(i + 1) * n] for k, v in batch.items()} for i in range(count)]
