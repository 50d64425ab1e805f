"""Step time of AdamW, SAM (keep_ratio 1) and FSAM (keep_ratio 0.1): one process, and per backend at 2 gloo ranks.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.step_time [--backends single ddp zero0 zero1 zero2 zero3 fsdp1 fsdp2]
                                                           [--steps 16] [--size 9.6M|t5-small|t5-base]
                                                           [--intervals 2 4 8] [--fisher-examples 128]

Every optimizer gets its own copy of the same randomly initialised T5 and they take turns step by
step on the same batches in the same processes (so a change in the machine's load hits all of them
alike; ratios are what to compare on a noisy machine). Times are the CPU time of the process
(one thread), mean over the measured steps (a multiple of 8, so an ``interval`` run has the same
mix of perturbed and plain steps as its expected (1 + 1/k)).

Reported per backend: step time, FSAM/SAM and FSAM/AdamW, FSAM's own work per perturbed step
(norms, perturbation and exact restore) in ms and in *read passes*: its ratio to ``x.sum()`` over
a fp32 tensor as long as the rank's local entries, timed in the same process between the steps.
'single' (one process) also runs FSAM at ``--intervals`` k and times the mask refresh (the global
top-k, amortised over ``--mask-interval`` steps) and, with ``--fisher-examples`` N_F, the
'empirical' Fisher per refresh on N_F examples, both ways: one backward per example (the loop),
then the batched per-example gradients (``torch.func``; 1st and 2nd call). ``--size t5-small`` (60 M)
and ``t5-base`` (220 M) are T5 shapes with random init, vocab 32128 (slow on a CPU: opt in).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .common import random_batch, set_rank_env, spawn_ranks, synchronize, t5_model

BACKENDS = ["single", "ddp", "zero0", "zero1", "zero2", "zero3", "fsdp1", "fsdp2"]
MODES = [("adamw", None), ("sam", dict(rho=0.05, keep_ratio=1.0)), ("fsam", dict(rho=0.05, keep_ratio=0.1))]
SIZES = {"9.6M": dict(vocab=512, d_model=256, layers=4, heads=4),        # the default bench model
         "t5-small": dict(vocab=32128, d_model=512, layers=6, heads=8),  # ~60 M (gated-GELU, d_ff 4 d)
         "t5-base": dict(vocab=32128, d_model=768, layers=12, heads=12)}  # ~220 M


def _model(args):
    shape = SIZES[args.size]
    return t5_model(vocab=shape["vocab"], d_model=shape["d_model"], layers=shape["layers"], heads=shape["heads"])


def _batch(args, step: int, rank: int) -> dict:
    return random_batch(vocab=512, micro=args.micro, seed=1000 * step + rank)


def _clock() -> float:
    """CPU seconds of this process (one thread): less moved by other jobs than wall time."""
    return time.process_time()


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
    """CPU time spent inside some core functions (FSAM's own work)."""

    def __init__(self):
        self.seconds = {"select": 0.0, "norms+perturb+restore": 0.0}

    def reset(self):
        for key in self.seconds:
            self.seconds[key] = 0.0

    def install(self):
        import fsam_dist.core.fsam as core

        def timed(fn, key):
            def wrapper(*a, **k):
                synchronize()
                start = _clock()
                try:
                    return fn(*a, **k)
                finally:
                    synchronize()
                    self.seconds[key] += _clock() - start
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
    from fsam_dist.train.loss import seq2seq_loss_sum

    timer = _Timer()
    timer.install()
    runs = {mode: (_backend(name, _model(args), world, args),
                   FSAM(mask_interval=args.mask_interval, **kwargs) if kwargs else None)
            for mode, kwargs in MODES if mode in args.modes}
    first = next(iter(runs.values()))[0]   # the local entries, read after a backward (ZeRO's views need one)
    first.forward_backward(seq2seq_loss_sum, _batch(args, 0, rank), 1.0, last=True)
    local = sum(v.numel for v in first.views())
    first.zero_grad()
    out = _interleaved(runs, args, timer, local, lambda step: [_batch(args, step, rank)], dist.barrier)
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def _sum_time(x: torch.Tensor) -> float:
    synchronize()
    start = _clock()
    x.sum()
    synchronize()
    return _clock() - start


def _interleaved(runs: dict, args, timer: _Timer, local: int, batches, barrier=lambda: None) -> dict:
    """Step every run in turn (the order rotating) on the same batches; per run the mean CPU time
    of a step after warm-up and FSAM's own work per perturbed step; ``x.sum()`` over ``local``
    fp32 entries timed between the steps (the read-pass unit)."""
    from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
    from fsam_dist.train.step import train_step

    names = list(runs)
    times = {n: [] for n in names}
    own = {n: {k: 0.0 for k in timer.seconds} for n in names}
    perturbed = {n: 0 for n in names}
    x = torch.randn(local)
    sums = []
    for step in range(args.warmup + args.steps):
        order = names[step % len(names):] + names[:step % len(names)]
        for n in order:
            backend, fsam = runs[n]
            timer.reset()
            barrier()
            synchronize()
            start = _clock()
            train_step(backend, seq2seq_loss_sum, batches(step), step=step, count_targets=count_target_tokens,
                       fsam=fsam)
            synchronize()   # CUDA runs asynchronously: time the work, not its launch
            if step >= args.warmup:
                times[n].append(_clock() - start)
                for k, v in timer.seconds.items():
                    own[n][k] += v
                perturbed[n] += int(fsam is not None and fsam.perturbs_at(step))
            sums.append(_sum_time(x))
    return {"sum": statistics.median(sums), "local": local,
            **{n: {"mean": statistics.fmean(times[n]),
                   **{k: v / max(1, perturbed[n]) for k, v in own[n].items()}} for n in names}}


def run_backend(name: str, args) -> dict:
    return spawn_ranks(_worker, 2, name, args)[0]


def run_single(args) -> dict:
    """One process: AdamW, SAM, FSAM and FSAM at each ``--intervals`` k, interleaved; then the
    mask refresh and (``--fisher-examples``) the empirical Fisher, timed on FSAM's backend."""
    from fsam_dist.core import FSAM, compute_mask
    from fsam_dist.shards.local import LocalBackend
    from fsam_dist.train.loss import seq2seq_loss_sum
    from fsam_dist.train.step import empirical_fisher

    torch.set_num_threads(1)
    timer = _Timer()
    timer.install()

    def make(kwargs):
        model = _model(args)
        return LocalBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-4)), \
            (FSAM(mask_interval=args.mask_interval, **kwargs) if kwargs is not None else None)

    runs = {mode: make(kwargs) for mode, kwargs in MODES if mode in args.modes}
    for k in args.intervals:
        runs[f"fsam k={k}"] = make(dict(rho=0.05, keep_ratio=0.1, interval=k))
    backend = runs["fsam"][0] if "fsam" in runs else next(iter(runs.values()))[0]
    local = sum(v.numel for v in backend.views())
    out = _interleaved(runs, args, timer, local, lambda step: [_batch(args, step, 0)])
    views = backend.views()   # the last step's gradients were zeroed: score fresh ones
    backend.zero_grad()
    backend.forward_backward(seq2seq_loss_sum, _batch(args, 0, 0), 1.0 / 256, last=True)
    views = backend.views()
    refresh = []
    for _ in range(3):
        start = _clock()
        compute_mask(views, None, 0.1)
        refresh.append(_clock() - start)
    out["refresh"] = statistics.median(refresh)
    if args.fisher_examples:
        examples = [random_batch(vocab=512, micro=1, seed=10 ** 6 + i) for i in range(args.fisher_examples)]
        for key, batched in (("fisher loop", False), ("fisher", True), ("fisher again", True)):
            start = _clock()
            empirical_fisher(backend, seq2seq_loss_sum, examples, batched=batched)
            out[key] = _clock() - start
        # The floor of any per-example method: one forward+backward of the same N_F examples in
        # micro-batches of --micro (the summed gradient only), in eval mode like the Fisher.
        backend.model.eval()
        start = _clock()
        for i in range(0, len(examples), args.micro):
            part = examples[i:i + args.micro]
            backend.zero_grad()
            backend.forward_backward(seq2seq_loss_sum, {k: torch.cat([e[k] for e in part]) for k in part[0]},
                                     1.0, last=True)
        out["fisher floor"] = _clock() - start
        backend.zero_grad()
        backend.model.train()
    return out


def _single_table(r: dict, args) -> None:
    a = r["adamw"]["mean"]
    print(f"\nOne process ('single'), {r['local'] / 1e6:.2f} M local entries; x.sum() of them: {r['sum'] * 1e3:.2f} ms "
          f"(CPU time, median); mask refresh every {args.mask_interval} steps\n")
    print("| run | step (CPU) | × AdamW | expected | FSAM own work / perturbed step | own work in read passes |")
    print("|---|---:|---:|---:|---:|---:|")
    expected = {"adamw": 1.0, "sam": 2.0, "fsam": 2.0, **{f"fsam k={k}": 1 + 1 / k for k in args.intervals}}
    for n, e in expected.items():
        if n not in r:
            continue
        own = r[n]["norms+perturb+restore"]
        print(f"| {n} | {r[n]['mean'] * 1e3:.0f} ms | {r[n]['mean'] / a:.3f} | {e:.3f} | "
              + (f"{own * 1e3:.1f} ms | {own / r['sum']:.1f} |" if n != "adamw" else "– | – |"))
    f = r["fsam"]["mean"] if "fsam" in r else a
    print(f"\nMask refresh (global top-k of g², {r['local'] / 1e6:.2f} M entries): {r['refresh'] * 1e3:.0f} ms = "
          f"{r['refresh'] / args.mask_interval / f:.2%} of an FSAM step amortised over {args.mask_interval} steps")
    for key, what in (("fisher loop", "one backward per example"), ("fisher", "batched (torch.func), 1st call"),
                      ("fisher again", "batched, 2nd call"),
                      ("fisher floor", f"floor: one forward+backward of the examples in micro-batches of {args.micro}")):
        if key in r:
            print(f"Empirical Fisher, N_F = {args.fisher_examples}, {what}: {r[key] * 1e3:.0f} ms per refresh = "
                  f"{r[key] / args.mask_interval / f:.2%} of an FSAM step amortised over {args.mask_interval} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    parser.add_argument("--modes", nargs="+", default=[m for m, _ in MODES], choices=[m for m, _ in MODES])
    parser.add_argument("--steps", type=int, default=16, help="measured steps (a multiple of 8)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro", type=int, default=8, help="micro-batch per rank")
    parser.add_argument("--size", default="9.6M", choices=list(SIZES))
    parser.add_argument("--mask-interval", type=int, default=100)
    parser.add_argument("--intervals", type=int, nargs="*", default=[2, 4, 8], help="'single': FSAM interval rows")
    parser.add_argument("--fisher-examples", type=int, default=0, help="'single': time the empirical Fisher (N_F)")
    args = parser.parse_args()
    if "adamw" not in args.modes and "single" in args.backends:
        parser.error("--modes must include adamw for 'single' (the ratios are to it)")
    n = sum(p.numel() for p in _model(args).parameters())
    print(f"T5 {args.size} ({n / 1e6:.1f} M parameters, random init), 1 thread per process; micro-batch "
          f"{args.micro}/rank; mask refresh every {args.mask_interval} steps; mean CPU time of {args.steps} steps "
          f"after {args.warmup} warm-up, the optimizers interleaved step by step\n", flush=True)
    if "single" in args.backends:
        began = time.perf_counter()
        _single_table(run_single(args), args)
        print(f"\n('single' took {time.perf_counter() - began:.0f} s)\n", flush=True)
    rows = [b for b in args.backends if b != "single"]
    if not rows:
        return
    print("2 gloo ranks (rank 0's figures; own work in read passes: per rank, over its local entries)\n")
    print("| backend | local entries | AdamW | SAM | FSAM | FSAM/SAM | FSAM/AdamW | "
          "FSAM own work / perturbed step | own work in read passes | took |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in rows:
        began = time.perf_counter()
        r = run_backend(name, args)
        # Without adamw (one mode per run, where two copies of the model do not fit in memory)
        # the ratios are nan here and are taken across runs.
        a = r["adamw"]["mean"] if "adamw" in r else float("nan")
        f = r["fsam"]["mean"] if "fsam" in r else float("nan")
        s = r["sam"]["mean"] if "sam" in r else float("nan")
        own = r["fsam"]["norms+perturb+restore"] if "fsam" in r else float("nan")
        print(f"| {name} | {r['local'] / 1e6:.2f} M | {a * 1e3:.0f} ms | {s * 1e3:.0f} ms | {f * 1e3:.0f} ms | "
              f"{f / s:.3f} | {f / a:.3f} | {own * 1e3:.1f} ms | {own / r['sum']:.1f} | "
              f"{time.perf_counter() - began:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
