"""What every benchmark shares: the random T5, its batches, and spawning gloo ranks."""

from __future__ import annotations

import os
import socket
import time
from queue import Empty

import torch


def t5_model(*, vocab: int, d_model: int, layers: int, heads: int):
    """A randomly initialised T5 (gated-GELU, no dropout), the same for a given seed-0 config."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=4 * d_model, num_layers=layers,
        num_heads=heads, feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0,
        pad_token_id=0))


def random_batch(*, vocab: int, micro: int, seed: int) -> dict:
    """``micro`` random 32-token sources with 16-token targets."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, vocab, (micro, 32), generator=g)
    return {"input_ids": src, "attention_mask": torch.ones_like(src),
            "labels": torch.randint(2, vocab, (micro, 16), generator=g)}


def synchronize() -> None:
    """Wait for the GPU's queued work (a no-op on the CPU): timings around CUDA work need it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_env(rank: int, world: int, port: int) -> None:
    """The torchrun-style variables ``init_process_group`` (and DeepSpeed) read."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def spawn_ranks(target, world: int, *args, results: int = 1, timeout: float = 1800) -> list:
    """Run ``target(rank, world, port, *args, queue)`` in ``world`` spawned processes; return the
    first ``results`` objects they put on the queue."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out, deadline = [], time.monotonic() + timeout
    while len(out) < results:
        try:
            out.append(queue.get(timeout=5))
        except Empty:
            # A rank that died (e.g. killed by the kernel's OOM killer) never reports: stop the
            # others rather than wait for it.
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                why = ", ".join(f"rank {r} exited with {code}" + (" (killed: out of memory?)" if code == -9 else "")
                                for r, code in dead) or f"no result within {timeout:.0f} s"
                raise RuntimeError(f"benchmark ranks failed: {why}")
    for p in procs:
        p.join()
    return out


def memory_status() -> dict[str, int]:
    """This process's resident memory now (``VmRSS``) and its peak (``VmHWM``), in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS, so the next peak is measured from here (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
