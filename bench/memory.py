"""Peak memory per rank of AdamW, SAM and FSAM on each backend, and the size of FSAM's own state.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.memory [--backends single ddp zero2 zero3 fsdp2]
                                                       [--d-model 512] [--layers 3] [--vocab 4096]
                                                       [--size t5-small|t5-base] [--modes AdamW "FSAM (κ=0.1)"]

Method. Every (backend, mode) runs in fresh processes (1 for 'single', 2 gloo ranks otherwise)
on the same randomly initialised T5 and batches, for ``--warmup`` steps and then ``--steps``
measured steps (the mask is refreshed every 2 steps, so refreshes fall in both). Two numbers:

* **FSAM state** (exact): the bytes of the tensors FSAM holds on the rank, read right after
  each perturbation (``FSAM.state_nbytes()``: the compact mask, and the restore data of the pending
  perturbation; the maximum over the measured steps). Compared with the *full copy* a
  conventional SAM keeps to restore the weights: 4 bytes × the rank's local trainable entries.
* **Peak RSS** (``VmHWM`` of the process, Linux): reset after the warm-up by writing 5 to
  ``/proc/self/clear_refs`` -- so import and engine-construction peaks do not count, but the
  weights, gradients, optimizer state and the mask, allocated by then, do -- and read after the
  measured steps: the high-water mark of resident memory during training steps, which includes
  every transient (activations, gradient buckets, FSAM's temporaries). ``tracemalloc`` cannot
  see torch's CPU allocations and ``torch.cuda.max_memory_allocated`` has no CPU counterpart,
  so RSS is what the OS charges. Its difference to the AdamW run of the same backend is what
  SAM / FSAM add. The workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (unless set): every
  allocation of 128 KiB or more is its own mapping, returned to the OS when freed, so RSS follows
  the live tensors instead of glibc's heap fragmentation (without it, chunk-sized temporaries
  made the SAM and FSAM peaks tens of MB higher, differing from run to run).

Modes: AdamW (one pass), SAM (keep_ratio 1, no parameter excluded: every entry perturbed),
FSAM (keep_ratio 0.1, default exclusions: biases, layer norms, embeddings, relative attention
bias are perturbed densely where their gradient is non-zero) and FSAM with interval 2 and
``reuse_direction`` (LookSAM: its g_v buffer is gradient-sized, so state ≈ 1 full copy more).
Prints a Markdown table: rank 0's row, and the largest state / full-copy ratio over the ranks.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from .common import memory_status, random_batch, reset_peak_rss, set_rank_env, spawn_ranks, t5_model

MODES = {
    "AdamW": None,
    "SAM (κ=1)": dict(rho=0.05, keep_ratio=1.0, exclude=()),
    "FSAM (κ=0.1)": dict(rho=0.05, keep_ratio=0.1),
    "FSAM + LookSAM (k=2)": dict(rho=0.05, keep_ratio=0.1, interval=2, reuse_direction=True),
}
BACKENDS = ["single", "ddp", "zero0", "zero1", "zero2", "zero3", "fsdp1", "fsdp2"]


SIZES = {"t5-small": dict(vocab=32128, d_model=512, layers=6, heads=8),    # ~60 M, random init
         "t5-base": dict(vocab=32128, d_model=768, layers=12, heads=12)}   # ~220 M


def _model(args):
    if args.size:
        return t5_model(**SIZES[args.size])
    return t5_model(vocab=args.vocab, d_model=args.d_model, layers=args.layers, heads=8)


def _batch(args, step: int, rank: int) -> dict:
    return random_batch(vocab=SIZES[args.size]["vocab"] if args.size else args.vocab, micro=args.micro,
                        seed=1000 * step + rank)


def _backend(name: str, model, exclude, args):
    from fsam_dist.core import DEFAULT_EXCLUDE

    exclude = DEFAULT_EXCLUDE if exclude is None else exclude
    optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-4)   # noqa: E731
    if name in ("single", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        from fsam_dist.shards.local import LocalBackend

        wrapped = DistributedDataParallel(model) if name == "ddp" else model
        return LocalBackend(wrapped, optimizer_factory(wrapped.parameters()), exclude=exclude)
    if name.startswith("zero"):
        from fsam_dist.train.deepspeed_setup import build_deepspeed

        ds = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_optimization": {"stage": int(name[-1])}, "steps_per_print": 10 ** 9}
        return build_deepspeed(model, ds, optimizer_factory(model.parameters()), exclude=exclude)
    from fsam_dist.train.fsdp_wrap import wrap_fsdp

    return wrap_fsdp(model, version=int(name[-1]), optimizer_factory=optimizer_factory, exclude=exclude)


def _worker(rank: int, world: int, port: int, name: str, mode: str, args, queue) -> None:
    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    distributed = name != "single"
    if distributed:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        if name.startswith("zero"):
            import deepspeed

            from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build

            skip_cpu_shm_build()
            deepspeed.init_distributed(dist_backend="gloo")
    from fsam_dist.core import FSAM
    from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
    from fsam_dist.train.step import train_step

    kwargs = MODES[mode]
    exclude = kwargs.get("exclude") if kwargs else None
    backend = _backend(name, _model(args), exclude, args)
    fsam = FSAM(mask_interval=2, **{k: v for k, v in kwargs.items() if k != "exclude"}) if kwargs else None
    state_bytes = []
    if fsam is not None:
        ascend = fsam.ascend

        def recording_ascend(*a, **k):
            stats = ascend(*a, **k)
            state_bytes.append(fsam.state_nbytes())
            return stats

        fsam.ascend = recording_ascend
    times = []
    local = []   # trainable entries this rank owns: counted from the views the step reads
    views = backend.views

    def counting_views():
        found = views()
        if not local:
            local.append(sum(v.numel for v in found))
        return found

    backend.views = counting_views
    import time

    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if distributed:
                dist.barrier()
            state_bytes.clear()
            reset_peak_rss()
            baseline = memory_status()["VmRSS"]
        start = time.perf_counter()
        train_step(backend, seq2seq_loss_sum, [_batch(args, step, rank)], step=step,
                   count_targets=count_target_tokens, fsam=fsam)
        times.append(time.perf_counter() - start)
    peak = memory_status()["VmHWM"]
    local = local[0]
    worst = max(state_bytes, key=lambda s: s["total"]) if state_bytes else \
        {"mask": 0, "restore": 0, "reuse": 0, "total": 0, "perturbed_entries": 0}
    queue.put({"rank": rank, "peak": peak, "baseline": baseline, "local": local, "state": worst,
               "step": statistics.median(times[args.warmup:])})
    if distributed:
        dist.destroy_process_group()


def run(name: str, mode: str, args) -> list[dict]:
    world = 1 if name == "single" else args.world
    return sorted(spawn_ranks(_worker, world, name, mode, args, results=world), key=lambda r: r["rank"])


def main() -> None:
    # Allocations of 128 KiB and more are mmap-ed and given back to the OS when freed, whatever
    # glibc's dynamic threshold would do: RSS then follows the live tensors, not the heap's
    # fragmentation. Read by glibc at process start, so set for the spawned workers here.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["single", "ddp", "zero2", "zero3", "fsdp2"],
                        choices=BACKENDS)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", choices=list(SIZES), help="a realistic T5 shape instead of --d-model/--layers/--vocab")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    n = sum(p.numel() for p in _model(args).parameters())
    shape = SIZES[args.size] if args.size else dict(d_model=args.d_model, layers=args.layers, vocab=args.vocab)
    print(f"T5 d_model {shape['d_model']}, {shape['layers']}+{shape['layers']} layers, vocab {shape['vocab']}: {n / 1e6:.2f} M "
          f"parameters (fp32); {args.world} gloo ranks (1 for single); micro-batch {args.micro}; peaks over "
          f"{args.steps} steps after {args.warmup} warm-up; rank 0 shown (rank 1 within a few MB)\n", flush=True)
    print("| backend | mode | local entries | peak RSS | Δ peak vs AdamW | FSAM state: mask | restore data "
          "(B / perturbed entry) | LookSAM g_v | state total | state / full copy (4 B × local) | worst rank |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    mb = 2 ** 20
    for name in args.backends:
        adamw_peak = None
        for mode in args.modes:
            ranks = run(name, mode, args)
            r = ranks[0]
            worst = max(x["state"]["total"] / (4 * x["local"]) for x in ranks)
            if adamw_peak is None:
                adamw_peak = r["peak"]
            s = r["state"]
            print(f"| {name} | {mode} | {r['local'] / 1e6:.2f} M | {r['peak'] / mb:.0f} MB | "
                  f"{(r['peak'] - adamw_peak) / mb:+.1f} MB | {s['mask'] / mb:.2f} MB | {s['restore'] / mb:.2f} MB "
                  f"({s['restore'] / max(1, s.get('perturbed_entries', 0)):.2f}) | {s.get('reuse', 0) / mb:.2f} MB | "
                  f"{s['total'] / mb:.2f} MB | {s['total'] / (4 * r['local']):.3f} | {worst:.3f} |", flush=True)


if __name__ == "__main__":
    main()
