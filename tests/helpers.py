"""Shared test helpers: tiny models, synthetic batches, and real multi-process gloo runs."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REQUIRE_ALL = "FSAM_TESTS_REQUIRE_ALL"
"""Set (to 1) by .ci/run: a test that cannot get what it needs fails instead of being skipped,
so CI never passes without running the SLURM, network-namespace and MPI tests."""


def unavailable(reason: str):
    """Skip the calling test with ``reason`` -- or fail it where :data:`REQUIRE_ALL` is set (CI,
    root, apt-get reachable: there a missing prerequisite is a defect, not a reason)."""
    import pytest

    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ALL}=1: prerequisites must be available here)", pytrace=False)
    pytest.skip(reason)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 240.0) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` real processes over gloo; return each rank's
    result. A rank that raises fails the call with its traceback; a run past ``timeout`` (a hang)
    is killed and fails the call."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_child, args=(world, free_port(), out_dir, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed run of {fn.__name__} did not finish in {timeout} s (hang?)")
        except mp.ProcessRaisedException as err:
            errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
            raise AssertionError(f"a rank of {fn.__name__} failed:\n" + "\n".join(errors or [str(err)])) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def tiny_t5(seed: int = 0, dropout: float = 0.0, vocab: int = 48):
    """A tiny gated-GELU T5 (smooth, so parity tests are not swamped by ReLU kinks)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2,
                   num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=dropout,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    return T5ForConditionalGeneration(cfg)


def synthetic_batch(n: int, seed: int, vocab: int = 48, src_len: int = 7, tgt_len: int = 5) -> dict:
    """``n`` examples of a reversal task, with varying target lengths (padding = -100)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, vocab, (n, src_len), generator=g)
    labels = src[:, :tgt_len].flip(1).clone()
    lengths = torch.randint(2, tgt_len + 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        labels[i, length:] = -100
    return {"input_ids": src, "attention_mask": torch.ones_like(src), "labels": labels}


def split_batch(batch: dict, parts: int, index: int) -> dict:
    """Contiguous ``index``-th of ``parts`` equal slices of a batch."""
    n = batch["input_ids"].size(0) // parts
    return {k: v[index * n:(index + 1) * n] for k, v in batch.items()}


def state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
