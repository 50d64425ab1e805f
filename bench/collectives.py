"""Count the collectives FSAM adds to a training step, separately from the backend's own.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.collectives [--world-sizes 2 4 8] [--backends ddp fsdp2 zero2 zero3]

:class:`CollectiveCounter` (usable in tests and benchmarks, never in the package) wraps the
collectives of ``torch.distributed`` (``all_reduce``, ``all_gather*``, ``reduce_scatter*``,
``broadcast``, ...) while it is active, and records each call: which collective, how many bytes,
and who called it:

* ``source='fsam'``: the call came through :mod:`fsam_dist.core.comm` -- every collective the FSAM
  code adds goes through there (norms, counts, non-finite flags, the top-k's histograms);
  ``label`` says which core function asked for it (:data:`LABELS`);
* ``source='backend'``: everything else seen at the Python level -- DeepSpeed's and FSDP's
  parameter all-gathers and gradient reduce-scatters. DDP's gradient all-reduce runs inside its
  C++ reducer and is *not* seen (its bytes are the model's gradient bytes per step, by design).

``bytes`` is the size of the collective's full buffer on this rank: the tensor for all_reduce /
broadcast, the gathered output for all_gather, the input for reduce_scatter. (A ring all-reduce
moves 2 (W-1)/W of that per rank; latency grows like log W or W with the algorithm.)

Run as a script, it trains a tiny model for a few steps per backend and world size and prints,
per step kind (AdamW, FSAM step without a mask refresh, FSAM step with one), the collectives FSAM
adds and the backend's, so the counts can be compared across model sizes and world sizes.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .common import set_rank_env, spawn_ranks

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "all_gather_object",
               "broadcast_object_list", "barrier")

LABELS = (
    ("core/select.py", "_select", "topk"),              # the radix select's histograms
    ("core/fsam.py", "perturb", "norms"),               # ‖g‖², ‖m⊙g‖², ‖e‖² (+ mask overlap at a refresh)
    ("core/fsam.py", "compute_mask", "mask"),           # anything else the mask computation reduces
    ("core/fsam.py", "ascend", "ascend"),
    ("core/norms.py", "grad_norm", "clip_norm"),        # the global norm for clipping (a base-step need)
    ("core/looksam.py", "sharpness_component", "looksam"),           # LookSAM: ⟨g, g₂⟩, ‖g‖², ‖g₂‖²
    ("core/looksam.py", "add_sharpness_component", "looksam_reuse"),  # LookSAM: ‖g‖², ‖g_v‖²
    ("train/step.py", "train_step", "step_flags"),      # target count, non-finite flags
)
"""(file, function, label): the first frame on the call stack that matches names the call."""

_COMM_FILE = os.path.join("fsam_dist", "core", "comm.py")


@dataclass
class Call:
    name: str
    bytes: int
    source: str    # 'fsam' or 'backend'
    label: str     # for 'fsam': see LABELS; for 'backend': the collective's name


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


def _payload(name: str, args, kwargs) -> int:
    """Bytes of the collective's full buffer on this rank (see the module docstring)."""
    if name in ("all_gather_into_tensor", "all_gather_single", "_all_gather_base"):
        return _tensor_bytes(kwargs.get("output_tensor", args[0] if args else None))
    if name in ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base"):
        return _tensor_bytes(kwargs.get("input", args[1] if len(args) > 1 else None))
    if name in ("all_gather", "reduce_scatter", "all_to_all"):
        return _tensor_bytes(args[0] if args else kwargs.get("tensor_list") or kwargs.get("output_tensor_list"))
    if name in ("barrier", "all_gather_object", "broadcast_object_list"):
        return 0
    return _tensor_bytes(args[0] if args else kwargs.get("tensor"))


def _classify() -> tuple[str, str]:
    frame = sys._getframe(2)   # the caller of the torch.distributed function
    through_comm = False
    while frame is not None:
        path, func = frame.f_code.co_filename, frame.f_code.co_name
        if path.endswith(_COMM_FILE):
            through_comm = True
        elif through_comm:
            for file, function, label in LABELS:
                if func == function and path.replace(os.sep, "/").endswith("fsam_dist/" + file):
                    return "fsam", label
        frame = frame.f_back
    return ("fsam", "other") if through_comm else ("backend", "")


class CollectiveCounter:
    """Record the collectives of ``torch.distributed`` while active (a context manager).

    ``calls`` is the list of :class:`Call`; :meth:`mark` starts a new named segment (e.g. one per
    step) and :meth:`summary` aggregates a segment. Only this process's calls are seen. Patching
    is by attribute on ``torch.distributed``, which is how the core (``comm.dist.all_reduce``),
    DeepSpeed and FSDP call them; a function imported by name before activation is not seen.
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.segments: dict[str, tuple[int, int]] = {}
        self._current: tuple[str, int] | None = None
        self._saved: dict = {}
        self._inside = threading.local()

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def counting(*args, **kwargs):
            if getattr(self._inside, "active", False):   # a collective implemented by another one
                return fn(*args, **kwargs)
            source, label = _classify()
            self.calls.append(Call(name, _payload(name, args, kwargs), source, label or name))
            self._inside.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside.active = False
        return counting

    def __enter__(self) -> "CollectiveCounter":
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        self.mark(None)
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    def mark(self, segment: str | None) -> None:
        """End the current segment (if any) and start ``segment`` (None: just end)."""
        if self._current is not None:
            name, start = self._current
            self.segments[name] = (start, len(self.calls))
        self._current = None if segment is None else (segment, len(self.calls))

    def segment(self, name: str) -> list[Call]:
        if self._current is not None and self._current[0] == name:
            return self.calls[self._current[1]:]
        start, end = self.segments[name]
        return self.calls[start:end]

    @staticmethod
    def summary(calls: list[Call]) -> dict:
        """{'fsam': {label: (count, bytes)}, 'backend': {name: (count, bytes)}} and totals."""
        out: dict = {"fsam": {}, "backend": {}}
        for c in calls:
            count, nbytes = out[c.source].get(c.label, (0, 0))
            out[c.source][c.label] = (count + 1, nbytes + c.bytes)
        for source in ("fsam", "backend"):
            out[f"{source}_total"] = (sum(v[0] for v in out[source].values()), sum(v[1] for v in out[source].values()))
        return out


# ---- the benchmark: a tiny model, a few steps per backend ------------------------------------------

class TinyNet(torch.nn.Module):
    """A small MLP language-model-ish net with the parameter kinds FSAM distinguishes: an
    embedding and biases and layer norms (excluded from the mask) and weight matrices."""

    def __init__(self, vocab: int = 64, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer_norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.layer_norm(x))))


def tiny_loss_sum(model, batch: dict) -> torch.Tensor:
    logits = model(batch["tokens"])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["targets"].reshape(-1),
                                             reduction="sum")


def tiny_count(batch: dict) -> int:
    return batch["targets"].numel()


def tiny_batch(step: int, rank: int, vocab: int = 64, n: int = 2, length: int = 8) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    return {"tokens": tokens, "targets": tokens.flip(1)}


def make_backend(kind: str, model: torch.nn.Module):
    """'single'/'ddp' (LocalBackend), 'fsdp1'/'fsdp2' (wrap_fsdp), 'zero0'..'zero3' (DeepSpeedBackend)."""
    opt = lambda params: torch.optim.AdamW(params, lr=1e-3)   # noqa: E731
    if kind in ("single", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        from fsam_dist.shards.local import LocalBackend

        wrapped = DistributedDataParallel(model) if kind == "ddp" else model
        return LocalBackend(wrapped, opt(wrapped.parameters()))
    if kind.startswith("fsdp"):
        from fsam_dist.train.fsdp_wrap import wrap_fsdp

        return wrap_fsdp(model, version=int(kind[-1]), optimizer_factory=opt, wrap_classes=("Block",))
    if kind.startswith("zero"):
        import deepspeed

        from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build
        from fsam_dist.train.deepspeed_setup import build_deepspeed

        skip_cpu_shm_build()
        deepspeed.init_distributed(dist_backend="gloo")
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": int(kind[-1])}, "steps_per_print": 10 ** 9}
        return build_deepspeed(model, ds, opt(model.parameters()))
    raise ValueError(f"unknown backend {kind!r}")


STEP_KINDS = ("adamw", "fsam_refresh", "fsam", "fsam_refresh_jaccard", "fsam_skipped_interval", "looksam_refresh",
              "looksam_reuse")


def measure(rank: int, world: int, kind: str, widths: list[int], mask_interval: int = 2,
            interval: int = 1) -> dict:
    """Per model width: the collectives of each step kind (see :data:`STEP_KINDS`), rank ``rank``.

    Steps: one AdamW step (fsam=None); then FSAM with ``mask_interval`` 2 and ``interval`` 2 at
    steps 0 (first refresh), 1 (not perturbed: the interval), 2 (refresh, with the Jaccard
    overlap), 4... (no refresh: mask_interval is 4 there); then LookSAM (interval 2,
    ``reuse_direction``) from fresh weights: step 0 (refresh, g_v kept), step 1 (g_v reused). Returns
    {width: {step kind: summary}} plus {'numel': {width: entries}}.
    """
    from fsam_dist.core import FSAM
    from fsam_dist.train.step import train_step

    out: dict = {"numel": {}}
    for width in widths:
        torch.manual_seed(0)
        model = TinyNet(width=width)
        out["numel"][width] = sum(p.numel() for p in model.parameters())
        backend = make_backend(kind, model)
        fsam = FSAM(rho=0.05, keep_ratio=0.1, mask_interval=2, interval=2)
        plan = [("adamw", None, 0), ("fsam_refresh", fsam, 0), ("fsam_skipped_interval", fsam, 1),
                ("fsam_refresh_jaccard", fsam, 2)]
        counter = CollectiveCounter()
        results = {}
        with counter:
            for label, f, step in plan:
                counter.mark(label)
                train_step(backend, tiny_loss_sum, [tiny_batch(step, rank)], step=step, count_targets=tiny_count,
                           fsam=f)
            # a perturbed step without a refresh
            fsam.mask_interval = 100
            counter.mark("fsam")
            train_step(backend, tiny_loss_sum, [tiny_batch(4, rank)], step=4, count_targets=tiny_count, fsam=fsam)
            looksam = FSAM(rho=0.05, keep_ratio=0.1, mask_interval=100, interval=2, reuse_direction=True)
            for label, step in (("looksam_refresh", 0), ("looksam_reuse", 1)):
                counter.mark(label)
                train_step(backend, tiny_loss_sum, [tiny_batch(step, rank)], step=step, count_targets=tiny_count,
                           fsam=looksam)
            counter.mark(None)
        for label in STEP_KINDS:
            results[label] = CollectiveCounter.summary(counter.segment(label))
        out[width] = results
        del backend
    return out


def _child(rank: int, world: int, port: int, kind: str, widths: list[int], queue) -> None:
    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = measure(rank, world, kind, widths)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run(kind: str, world: int, widths: list[int]) -> dict:
    return spawn_ranks(_child, world, kind, widths, timeout=900)[0]


def _fmt(pair) -> str:
    count, nbytes = pair
    return f"{count} / {nbytes} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--backends", nargs="+", default=["ddp", "fsdp2", "zero2", "zero3"])
    parser.add_argument("--widths", nargs="+", type=int, default=[32, 128])
    args = parser.parse_args()
    print("Collectives on rank 0 per step, as count / bytes. FSAM's (through fsam_dist.core.comm) by purpose; the "
          "backend's own (Python-level; DDP's C++ gradient all-reduce is not seen).\n")
    print("| backend | world | params | step | FSAM: top-k | FSAM: norms | FSAM: step flags | FSAM total "
          "| backend total |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for kind in args.backends:
        for world in args.world_sizes:
            result = run(kind, world, args.widths)
            for width in args.widths:
                for step in STEP_KINDS:
                    s = result[width][step]
                    f = s["fsam"]
                    print(f"| {kind} | {world} | {result['numel'][width]} | {step} | {_fmt(f.get('topk', (0, 0)))} | "
                          f"{_fmt(f.get('norms', (0, 0)))} | {_fmt(f.get('step_flags', (0, 0)))} | "
                          f"{_fmt(s['fsam_total'])} | {_fmt(s['backend_total'])} |", flush=True)


if __name__ == "__main__":
    main()
