"""Loading and training a large T5 with FSAM on ZeRO-3 / FSDP2: peak RSS per rank at load and during steps, step times.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m bench.large_model --create t5-large --dir /tmp/t5-large
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m bench.large_model --dir /tmp/t5-large --world 4 \\
        --backends zero3 fsdp2 --steps 2

``--create t5-large`` writes a randomly initialised T5 of t5-large's shape (d_model 1024, d_ff 4096,
24 + 24 layers, 16 heads, vocab 32128: 738 M parameters, 2.95 GB in fp32) with ``save_pretrained``
as sharded safetensors (500 MB files), no tokenizer needed; ``--create`` also takes
``t5-base`` / ``small:<d_model>,<layers>,<vocab>``.

Each backend runs in ``--world`` fresh gloo processes (one thread each) through the CLI's own
path: ``train/loading.py`` (``load_for_backend``) then ``train/backends.py`` (``build_backend``)
with the default FSDP2 settings or ``configs/deepspeed/zero3.json``. Per rank:

* **baseline**: ``VmRSS`` after the process group, the imports and a meta-device build of the
  model (ZeRO-3: and a 4 × 4 layer built under ``zero.Init``), so import and first-use costs do
  not count as loading;
* **model peak**: ``VmHWM`` (the kernel's exact high-water mark of resident memory) over
  ``load_for_backend`` alone, minus the baseline (ZeRO-3: the partitioned model is complete here;
  FSDP: rank 0's full model, meta modules elsewhere);
* **load peak**: the same over loading *and* building the backend (FSDP: sharding and the
  broadcast from rank 0; ZeRO-3: ``deepspeed.initialize``, which adds its own flat fp32 and
  gradient partitions, whatever the loading); ``--plain`` makes every rank ``from_pretrained``
  the whole model first (the old path), for comparison;
* **step peak**: ``VmHWM`` reset after loading (``/proc/self/clear_refs``) and read after the
  steps, minus the baseline: weights, gradients, AdamW state, FSAM's mask and restore data and
  every transient;
* **step times**: ``--steps`` AdamW steps, then ``--steps`` FSAM steps (ρ 0.05, κ 0.1, a mask
  refresh at the first), one micro-batch of 1 example (32 source / 16 target tokens) per rank;
  the first step of each kind is a warm-up, the median of the rest is reported.

Workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (as bench/memory.py) so freed tensors leave RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from .common import free_port, memory_status, reset_peak_rss, set_rank_env

LIVE_PARAMETERS = 10 ** 8
"""ZeRO-3's stage3_max_live_parameters and stage3_max_reuse_distance in this bench (see _worker)."""
SUB_GROUP_SIZE = 25 * 10 ** 6
"""ZeRO-3's sub_group_size in this bench: 100 MB of fp32 per optimizer sub-group (see _worker)."""

SHAPES = {"t5-large": (1024, 24, 16, 32128, 4096), "t5-base": (768, 12, 12, 32128, 3072),
          "t5-1b": (1280, 24, 20, 32128, 5120)}   # 1.14 B: between t5-large and t5-3b
"""name → (d_model, layers, heads, vocab, d_ff)."""


def make_model(spec: str, out: str) -> int:
    """Write a random T5 of shape ``spec`` to ``out`` as sharded safetensors; returns its parameter count."""
    from transformers import T5Config, T5ForConditionalGeneration

    if spec.startswith("small:"):
        d_model, layers, vocab = (int(x) for x in spec[len("small:"):].split(","))
        heads, d_ff = 8, 4 * d_model
    else:
        d_model, layers, heads, vocab, d_ff = SHAPES[spec]
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                      num_heads=heads, feed_forward_proj="relu", dropout_rate=0.1, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = T5ForConditionalGeneration(config)
    numel = sum(p.numel() for p in shapes.parameters())
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="500MB")
    return numel


def _batch(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    src = torch.randint(2, 100, (1, 32), generator=g)
    return {"input_ids": src, "attention_mask": torch.ones_like(src),
            "labels": torch.randint(2, 100, (1, 16), generator=g)}


def _worker(rank: int, world: int, port: int, name: str, model_dir: str, steps: int, plain: bool, queue,
            precision: str = "fp32") -> None:
    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoConfig

    from fsam_dist.config import Config
    from fsam_dist.core import FSAM
    from fsam_dist.seq2seq.model import load_model
    from fsam_dist.train import distributed
    from fsam_dist.train.backends import build_backend, deepspeed_config, fill_hidden_sized
    from fsam_dist.train.loading import load_for_backend, meta_model
    from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
    from fsam_dist.train.step import train_step

    dist.init_process_group("gloo", rank=rank, world_size=world)
    backend_name = "deepspeed" if name == "zero3" else "fsdp"
    cfg = Config.model_validate({
        "model": {"name_or_path": model_dir}, "data": {"train_file": "unused (batches are made here)"},
        "backend": {"name": backend_name, **({"deepspeed_config": "configs/deepspeed/zero3.json"}
                                              if name == "zero3" else {})},
        "optim": {"lr": 1e-4, "clip_grad_norm": 1.0}, "train": {"micro_batch_size": 1, "max_steps": max(1, 2 * steps), "precision": precision}})
    ds_config = None
    if name == "zero3":
        import deepspeed

        from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build

        skip_cpu_shm_build()
        deepspeed.init_distributed(dist_backend="gloo")
        ds_config = deepspeed_config(cfg, world)
    env = distributed.detect_env()
    config = AutoConfig.from_pretrained(model_dir)
    if ds_config is not None:
        ds_config = fill_hidden_sized(ds_config, config, cfg.backend.deepspeed_config)
        # DeepSpeed's defaults are sized for GPUs with room to spare: it keeps up to
        # stage3_max_live_parameters (1e9: the whole 738 M model) gathered, reuses them within
        # stage3_max_reuse_distance (1e9), and runs the optimizer over sub-groups of
        # sub_group_size (1e9) partition entries, each with a gradient buffer, a flattened
        # gradient copy and AdamW's temporaries as large as the sub-group (the rank's whole
        # partition). With them a fp32 rank of this model passed 6.3 GB and 4 ranks did not fit
        # this 24 GiB machine; these bound the transients to ~0.4 GB.
        ds_config["zero_optimization"].update(stage3_max_live_parameters=LIVE_PARAMETERS,
                                              stage3_max_reuse_distance=LIVE_PARAMETERS,
                                              sub_group_size=SUB_GROUP_SIZE)
    warm = meta_model(config)   # imports and first-use costs before the baseline
    del warm
    if name == "zero3":   # zero.Init's own first-use costs (fixed, not the model's) too
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            torch.nn.Linear(4, 4)
    dist.barrier()
    baseline = memory_status()["VmRSS"]
    reset_peak_rss()
    start = time.perf_counter()
    if plain:
        model, from_rank0 = load_model(model_dir), False
    else:
        loaded = load_for_backend(backend_name, ds_config, rank, model_dir, config)
        model, from_rank0 = loaded.model, loaded.from_rank0
    model_peak = memory_status()["VmHWM"] - baseline
    model.train()
    backend = build_backend(backend_name, cfg, env, model, torch.device("cpu"), ds_config, from_rank0=from_rank0)
    dist.barrier()
    load_seconds = time.perf_counter() - start
    load_peak = memory_status()["VmHWM"] - baseline
    reset_peak_rss()
    times: dict[str, list[float]] = {"adamw": [], "fsam": []}
    fsam = FSAM(rho=0.05, keep_ratio=0.1, mask_interval=100)
    for mode in ("adamw", "fsam"):
        for step in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            train_step(backend, seq2seq_loss_sum, [_batch(rank, step)], step=step, count_targets=count_target_tokens,
                       fsam=fsam if mode == "fsam" else None, clip_grad_norm=1.0)
            dist.barrier()
            times[mode].append(time.perf_counter() - t0)
    step_peak = memory_status()["VmHWM"] - baseline
    queue.put({"rank": rank, "baseline": baseline, "model_peak": model_peak, "load_peak": load_peak, "load_seconds": load_seconds,
               "step_peak": step_peak, "times": times})
    dist.barrier()
    dist.destroy_process_group()


def measure(model_dir: str, name: str, world: int, steps: int = 0, plain: bool = False, precision: str = "fp32",
            timeout: float = 3600) -> list[dict]:
    """Per-rank results (sorted by rank) of one backend ('zero3' | 'fsdp2') in ``world`` fresh processes."""
    import queue as queues

    import torch.multiprocessing as mp

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, name, model_dir, steps, plain, queue, precision))
             for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                results.append(queue.get(timeout=2))
            except queues.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: a rank failed (exit codes {failed}) or the run passed {timeout} s")
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return sorted(results, key=lambda r: r["rank"])


def fp32_bytes(model_dir: str) -> int:
    """Bytes of the model's parameters in fp32 (each tied parameter once)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(model_dir))
    return 4 * sum(p.numel() for p in model.parameters())


def _median(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values[1:] if len(values) > 1 else values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="model directory (written by --create)")
    parser.add_argument("--create", help="write a random model of this shape first: t5-large, t5-base, t5-1b, "
                                       "small:<d_model>,<layers>,<vocab>")
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--backends", nargs="+", default=["zero3", "fsdp2"], choices=["zero3", "fsdp2"])
    parser.add_argument("--steps", type=int, default=2, help="AdamW steps, then FSAM steps (first is a warm-up)")
    parser.add_argument("--plain", action="store_true", help="every rank loads the whole model (old path)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="train.precision (bf16: ZeRO-3 holds bf16 partitions next to its fp32 master)")
    args = parser.parse_args()
    if args.create:
        numel = make_model(args.create, args.dir)
        print(f"wrote {args.create}: {numel / 1e6:.0f} M parameters to {args.dir}", flush=True)
    size = fp32_bytes(args.dir)
    gib = 2 ** 30
    print(f"model: {size / 4 / 1e6:.0f} M parameters, fp32 {size / gib:.2f} GiB; world {args.world}", flush=True)
    print("| backend | rank | model peak / fp32 model | load peak (GiB) | load peak / fp32 model | step peak (GiB) "
          "| load (s) | AdamW step (s) | FSAM step (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.backends:
        for r in measure(args.dir, name, args.world, args.steps, args.plain, args.precision):
            print(f"| {name}{' (plain)' if args.plain else ''} | {r['rank']} | {r['model_peak'] / size:.2f} | "
                  f"{r['load_peak'] / gib:.2f} | "
                  f"{r['load_peak'] / size:.2f} | {r['step_peak'] / gib if args.steps else float('nan'):.2f} | "
                  f"{r['load_seconds']:.0f} | "
                  f"{_median(r['times']['adamw'])} | {_median(r['times']['fsam'])} |", flush=True)
            print("raw " + json.dumps({"backend": name, **r}), flush=True)


if __name__ == "__main__":
    main()
