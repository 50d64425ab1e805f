"""Step time of FSAM with a perturbation interval k against AdamW, one process.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.interval [--intervals 1 2 4 8] [--windows 4]
                                                         [--d-model 256] [--layers 4]

``fsam.interval = k`` runs FSAM's two passes at steps t % k == 0 and a plain AdamW step
otherwise, so the expected cost is (1 + 1/k) × AdamW (plus FSAM's own work on the perturbed
steps). One process trains the same randomly initialised T5 on the same batches with AdamW, then
FSAM at each k (keep ratio 0.1, mask refresh every 8 steps) and FSAM + LookSAM
(``reuse_direction``) at each k of ``--looksam``, each on its own copy of the model,
taking turns window by window in this process (so load changes on a shared machine hit every run
alike). The time per step of a run is the mean over a window of 8 consecutive steps (8 = lcm of
1, 2, 4, 8: every window holds the same mix of perturbed and plain steps, and one refresh); the
table gives the median over ``--windows`` windows after one warm-up window, and its ratio to
AdamW's. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from fsam_dist.core import FSAM

from .common import random_batch, t5_model
from fsam_dist.shards.local import LocalBackend
from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
from fsam_dist.train.step import train_step


def _model(args):
    return t5_model(vocab=args.vocab, d_model=args.d_model, layers=args.layers, heads=4)


def _batch(args, step: int) -> dict:
    return random_batch(vocab=args.vocab, micro=args.micro, seed=step)


def make_run(args, run: tuple[int, bool] | None):
    """(backend, fsam) of one run: its own copy of the same initial model; ``run`` = (interval,
    LookSAM's reuse_direction), or None for AdamW."""
    model = _model(args)
    backend = LocalBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    fsam = None if run is None else FSAM(rho=0.05, keep_ratio=0.1, mask_interval=8, interval=run[0],
                                         reuse_direction=run[1])
    return backend, fsam


def measure(args, intervals: list[tuple[int, bool] | None]) -> dict:
    """Median over windows of the mean step time (seconds) per run. The runs take turns window
    by window in this process, so a change in the machine's load hits all of them alike."""
    runs = {k: make_run(args, k) for k in intervals}
    means: dict = {k: [] for k in intervals}
    window = args.window
    for w in range(args.windows + 1):
        for k, (backend, fsam) in runs.items():
            start = time.perf_counter()
            for step in range(w * window, (w + 1) * window):
                train_step(backend, seq2seq_loss_sum, [_batch(args, step)], step=step,
                           count_targets=count_target_tokens, fsam=fsam)
            if w:   # the first window is warm-up
                means[k].append((time.perf_counter() - start) / window)
    return {k: statistics.median(v) for k, v in means.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--looksam", nargs="*", type=int, default=[2, 4, 8],
                        help="intervals also run with reuse_direction (LookSAM)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--micro", type=int, default=8)
    args = parser.parse_args()
    args.window = math.lcm(*args.intervals, *args.looksam)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    n = sum(p.numel() for p in _model(args).parameters())
    print(f"T5 d_model {args.d_model}, {args.layers}+{args.layers} layers, {n / 1e6:.1f} M parameters; one process, "
          f"{torch.get_num_threads()} thread(s); micro-batch {args.micro}; FSAM keep 0.1, mask refresh every 8 steps; "
          f"median over {args.windows} windows of {args.window} steps (after 1 warm-up window)\n", flush=True)
    runs = [(k, False) for k in args.intervals] + [(k, True) for k in args.looksam]
    times = measure(args, [None, *runs])
    adamw = times[None]
    print("| run | step time | × AdamW | expected (1 + 1/k) |")
    print("|---|---:|---:|---:|")
    print(f"| AdamW | {adamw * 1e3:.0f} ms | 1.00 | 1.00 |")
    for k, looksam in runs:
        label = f"FSAM k={k}" + (" + LookSAM" if looksam else "")
        t = times[(k, looksam)]
        print(f"| {label} | {t * 1e3:.0f} ms | {t / adamw:.2f} | {1 + 1 / k:.2f} |")


if __name__ == "__main__":
    main()
