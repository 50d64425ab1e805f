"""Time ``global_topk_mask`` against torch.topk / torch.kthvalue on the same scores.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.select [--sizes 1e5 1e6 1e7 1e8] [--repeats 3]

(Run it as a module: as a script, this file's name would shadow the standard library's ``select``.)

One process: median wall time per call, k = 10 % of N (FSAM's default keep ratio), scores like
squared gradients (|N(0,1)|², many near zero). ``x.sum()`` is one plain read pass — the memory
bound. World size 2: the same per-rank N over gloo, with the number and size of all-reduces.
Prints a Markdown table (paste into bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fsam_dist.core import comm
from fsam_dist.core.select import global_topk_mask

from .common import spawn_ranks


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scores(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).square_()


def one_process(n: int, repeats: int) -> dict:
    x = scores(n)
    k = n // 10
    return {
        "global_topk_mask": timed(lambda: global_topk_mask([x], [0], k), repeats),
        "torch.topk": timed(lambda: torch.topk(x, k, sorted=False), repeats),
        "torch.kthvalue": timed(lambda: torch.kthvalue(x, n - k + 1), repeats),
        "x.sum()": timed(lambda: x.sum(), repeats),
    }


def _rank(rank: int, world: int, port: int, n: int, repeats: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = scores(n, seed=rank)
    calls = []
    original = comm.dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    comm.dist.all_reduce = counting
    global_topk_mask([x], [rank * n], world * n // 10)
    count, elements = len(calls), sum(calls)
    comm.dist.all_reduce = original
    t = timed(lambda: global_topk_mask([x], [rank * n], world * n // 10), repeats)
    if rank == 0:
        queue.put((t, count, elements))
    dist.destroy_process_group()


def two_processes(n: int, repeats: int) -> tuple[float, int, int]:
    return spawn_ranks(_rank, 2, n, repeats, timeout=600)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--world-sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7],
                        help="per-rank N for the 2-process runs")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats}\n")
    print("| N (one process) | global_topk_mask | torch.topk | torch.kthvalue | x.sum() "
          "| select / kthvalue | select / topk |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sizes):
        r = one_process(n, args.repeats)
        print(f"| {n:.0e} | {r['global_topk_mask'] * 1e3:.1f} ms | {r['torch.topk'] * 1e3:.1f} ms | "
              f"{r['torch.kthvalue'] * 1e3:.1f} ms | {r['x.sum()'] * 1e3:.1f} ms | "
              f"{r['global_topk_mask'] / r['torch.kthvalue']:.2f} | {r['global_topk_mask'] / r['torch.topk']:.2f} |",
              flush=True)
    print("\n| N per rank (2 gloo ranks) | global_topk_mask | all-reduces | int64 elements reduced |")
    print("|---:|---:|---:|---:|")
    for n in (int(s) for s in args.world_sizes):
        t, count, elements = two_processes(n, args.repeats)
        print(f"| {n:.0e} | {t * 1e3:.1f} ms | {count} | {elements} |", flush=True)


if __name__ == "__main__":
    main()
