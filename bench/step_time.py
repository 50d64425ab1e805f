"""Step time of AdamW, SAM (keep_ratio 1) and FSAM (keep_ratio 0.1) per backend, 2 gloo ranks.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.step_time [--backends ddp zero0 zero1 zero2 zero3 fsdp1 fsdp2]
                                                           [--steps 12] [--d-model 256] [--layers 4]

For each backend, two real processes build the same randomly initialised T5, then run AdamW,
SAM and FSAM one after another in the same processes on the same batches (so the three are
measured under the same conditions; ratios are what to compare on a noisy machine). Reported:
median step time (rank 0, after warm-up), FSAM/SAM and FSAM/AdamW, and the share of FSAM's step
spent in its own work — mask selection (including the Fisher scores; one refresh every
``--mask-interval`` steps, amortised) and norms/perturb/restore. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .common import random_batch, set_rank_env, spawn_ranks, synchronize, t5_model

BACKENDS = ["ddp", "zero0", "zero1", "zero2", "zero3", "fsdp1", "fsdp2"]
MODES = [("adamw", None), ("sam", dict(rho=0.05, keep_ratio=1.0)), ("fsam", dict(rho=0.05, keep_ratio=0.1))]


def _model(args):
    return t5_model(vocab=512, d_model=args.d_model, layers=args.layers, heads=4)


def _batch(args, step: int, rank: int) -> dict:
    return random_batch(vocab=512, micro=args.micro, seed=1000 * step + rank)


def _backend(name: str, model, world: int, args):
    optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-4)   # noqa: E731
    if name == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        from fsam_dist.shards.local import LocalBackend

        return LocalBackend(DistributedDataParallel(model), optimizer_factory(model.parameters()))
    if name.startswith("zero"):
        from fsam_dist.train.deepspeed_setup import build_deepspeed

        ds = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_optimization": {"stage": int(name[-1])}, "steps_per_print": 10 ** 9}
        return build_deepspeed(model, ds, optimizer_factory(model.parameters()))
    from fsam_dist.train.fsdp_wrap import wrap_fsdp

    return wrap_fsdp(model, version=int(name[-1]), optimizer_factory=optimizer_factory)


class _Timer:
    """Wall time spent inside some core functions (FSAM's own work)."""

    def __init__(self):
        self.seconds = {"select": 0.0, "norms+perturb+restore": 0.0}

    def install(self):
        import fsam_dist.core.fsam as core

        def timed(fn, key):
            def wrapper(*a, **k):
                synchronize()
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    synchronize()
                    self.seconds[key] += time.perf_counter() - start
            return wrapper

        core.compute_mask = timed(core.compute_mask, "select")
        core.perturb = timed(core.perturb, "norms+perturb+restore")
        core.restore = timed(core.restore, "norms+perturb+restore")


def _worker(rank: int, world: int, port: int, name: str, args, queue) -> None:
    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    if name.startswith("zero"):
        import deepspeed

        from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build

        skip_cpu_shm_build()
        deepspeed.init_distributed(dist_backend="gloo")
    from fsam_dist.core import FSAM
    from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
    from fsam_dist.train.step import train_step

    timer = _Timer()
    timer.install()
    out = {}
    for mode, kwargs in MODES:
        backend = _backend(name, _model(args), world, args)
        fsam = FSAM(mask_interval=args.mask_interval, **kwargs) if kwargs else None
        times = []
        for key in timer.seconds:
            timer.seconds[key] = 0.0
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                for key in timer.seconds:
                    timer.seconds[key] = 0.0
            dist.barrier()
            synchronize()
            start = time.perf_counter()
            train_step(backend, seq2seq_loss_sum, [_batch(args, step, rank)], step=step,
                       count_targets=count_target_tokens, fsam=fsam)
            synchronize()   # CUDA runs asynchronously: time the work, not its launch
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        out[mode] = {"median": statistics.median(times), **{k: v / args.steps for k, v in timer.seconds.items()}}
        del backend
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def run_backend(name: str, args) -> dict:
    return spawn_ranks(_worker, 2, name, args)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro", type=int, default=8, help="micro-batch per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mask-interval", type=int, default=10)
    args = parser.parse_args()
    n = sum(p.numel() for p in _model(args).parameters())
    print(f"T5 d_model {args.d_model}, {args.layers}+{args.layers} layers, {n / 1e6:.1f} M parameters; 2 gloo ranks, "
          f"1 thread each; micro-batch {args.micro}/rank; mask refresh every {args.mask_interval} steps; "
          f"median of {args.steps} steps after {args.warmup} warm-up\n", flush=True)
    print("| backend | AdamW | SAM | FSAM | FSAM/SAM | FSAM/AdamW | FSAM select share | FSAM norms+perturb share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.backends:
        r = run_backend(name, args)
        a, s, f = r["adamw"]["median"], r["sam"]["median"], r["fsam"]["median"]
        print(f"| {name} | {a * 1e3:.0f} ms | {s * 1e3:.0f} ms | {f * 1e3:.0f} ms | {f / s:.3f} | {f / a:.2f} | "
              f"{r['fsam']['select'] / f:.1%} | {r['fsam']['norms+perturb+restore'] / f:.1%} |", flush=True)


if __name__ == "__main__":
    main()
