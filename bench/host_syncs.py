"""Host synchronisations per FSAM step, by module: how often the CPU would wait for a GPU.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.host_syncs [--views 4 16] [--chunks 1 3] [--micro-batches 2]

On a GPU every ``.item()``, ``.cpu()``, ``.tolist()``, ``nonzero``, ``bool(t)``, ``float(t)`` and
``int(t)`` of a device tensor makes the host wait for the queued work. On the CPU nothing waits,
so this counts the *calls* (patched onto ``torch.Tensor``/``torch``) and attributes each to the
module of its immediate caller (a call made by torch or transformers internals counts as
'other'). It is an upper bound: a call on a tensor that already lives on the CPU (a Python
number wrapped in ``torch.tensor``) costs nothing on a GPU either. On a GPU,
``bench/gpu_check.py`` counts the real ones with ``torch.cuda.set_sync_debug_mode``.

The model is synthetic: V parameters ("views") of C × 2^20 entries each (C chunks of the core's
chunk size), a quadratic loss, one process (``LocalBackend``), A micro-batches per pass.
Reported per step kind: a perturbed step with a mask refresh, a perturbed step without one, and
a plain AdamW step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import os

import torch

PATCHED = {torch.Tensor: ("item", "cpu", "tolist", "nonzero", "__bool__", "__float__", "__int__"),
           torch: ("nonzero",)}


def _where(filename: str) -> str:
    """'core/fsam.py', 'train/step.py', ... for fsam_dist files, else 'other'."""
    marker = os.sep + "fsam_dist" + os.sep
    if marker in filename:
        return filename.split(marker, 1)[1].replace(os.sep, "/")
    return "other"


@contextlib.contextmanager
def counting():
    """Count the patched calls by the caller's module; yields the Counter."""
    counts: collections.Counter = collections.Counter()
    originals = []
    for owner, names in PATCHED.items():
        for name in names:
            original = getattr(owner, name)
            originals.append((owner, name, original))

            def wrapper(*a, __original=original, **k):
                caller = inspect.currentframe().f_back
                counts[_where(caller.f_code.co_filename)] += 1
                return __original(*a, **k)

            setattr(owner, name, wrapper)
    try:
        yield counts
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


@contextlib.contextmanager
def cuda_sync_warnings():
    """On a GPU: count the synchronisations CUDA really makes (``set_sync_debug_mode('warn')``
    warns once per synchronising call), by the caller's module; yields the Counter."""
    import warnings

    counts: collections.Counter = collections.Counter()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            counts[_where(w.filename)] += 1


class _Quadratic(torch.nn.Module):
    """V weight vectors of C·2^20 entries; loss_sum = Σ_i Σ_v ((w_v ⊙ x_i,v) - 1)² / n."""

    def __init__(self, views: int, chunks_per_view: int):
        super().__init__()
        from fsam_dist.core.views import CHUNK

        g = torch.Generator().manual_seed(0)
        n = chunks_per_view * CHUNK
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n, generator=g) * 0.1)
                                              for _ in range(views))


def _loss_sum(model, batch):
    total = 0.0
    for w in model.weights:
        total = total + ((w * batch["x"][: w.numel()] - 1.0).square().mean()) * batch["n"]
    return total


def count_step_syncs(*, views: int, chunks_per_view: int, micro_batches: int, device: str = "cpu",
                     counter=counting) -> dict:
    """Calls per module for one perturbed step with a refresh ('refresh'), one without
    ('perturbed') and a plain AdamW step ('adamw'); returned flattened for the perturbed step
    without refresh (per module and per layer: 'core', 'comm', 'train', 'shards', 'other',
    'total'), and every kind under 'by_kind'. ``counter``: :func:`counting` (calls, any device) or
    :func:`cuda_sync_warnings` (real synchronisations, on a GPU)."""
    from fsam_dist.core import FSAM
    from fsam_dist.shards.local import LocalBackend
    from fsam_dist.train.step import train_step

    from fsam_dist.core.views import CHUNK

    torch.manual_seed(0)
    model = _Quadratic(views, chunks_per_view).to(device)
    backend = LocalBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    fsam = FSAM(rho=0.05, keep_ratio=0.1, mask_interval=2)
    x = torch.randn(chunks_per_view * CHUNK, generator=torch.Generator().manual_seed(1)).to(device)
    batches = [{"x": x * (1 + 0.1 * i), "n": torch.tensor(4.0, device=device)} for i in range(micro_batches)]

    def step(i: int, f) -> collections.Counter:
        with counter() as counts:
            train_step(backend, _loss_sum, batches, step=i, count_targets=lambda mb: 4, fsam=f)
        return counts

    kinds = {"refresh": step(0, fsam), "perturbed": step(1, fsam), "adamw": step(2, None)}
    out = {}
    for kind, counts in kinds.items():
        groups = collections.Counter()
        for module, n in counts.items():
            groups[module] += n
            if module != "other":
                groups["comm" if module == "core/comm.py" else module.split("/")[0]] += n
        groups["total"] = sum(counts.values())
        out[kind] = dict(groups)
    return {**out["perturbed"], "by_kind": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for v in args.views:
        for c in args.chunks:
            found = count_step_syncs(views=v, chunks_per_view=c, micro_batches=args.micro_batches)
            rows.append({"V": v, "C": c, "A": args.micro_batches, **found["by_kind"]})
    modules = sorted({m for r in rows for kind in ("refresh", "perturbed", "adamw") for m in r[kind]
                      if "/" in m or m == "other"})
    print(f"| V | C/view | A | step | total | {' | '.join(modules)} |")
    print("|---|---|---|---|---|" + "---|" * len(modules))
    for r in rows:
        for kind in ("refresh", "perturbed", "adamw"):
            counts = r[kind]
            print(f"| {r['V']} | {r['C']} | {r['A']} | {kind} | {counts['total']} | "
                  + " | ".join(str(counts.get(m, 0)) for m in modules) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
