"""One prepared GPU check (issue 17): what CI on CPUs cannot show, in one command of ≤ 8 minutes.

    make gpu-check                                   # python -m bench.gpu_check --out bench/gpu-check
    python -m bench.gpu_check --out DIR [--sections core_parity topk_mask ...] [--device cuda|cpu] [--quick]

Writes ``DIR/gpu_check.md`` (tables to paste into bench/README.md's GPU section) and
``DIR/gpu_check.json`` after every section, so a run cut short keeps what it measured. Sections:

* ``core_parity``: the tiny T5, fp32, FSAM with a mask refresh inside, on the device vs the CPU;
  per tensor ‖w − w_cpu‖ ≤ 1e-3 · ‖w_cpu − w₀‖ (relative to the distance travelled, as the
  tests compare) and the masks' Jaccard index. TF32 is switched off for it.
* ``topk_mask``: ``global_topk_mask`` at N = 1e7, 1e8, 1e9 (as memory allows) against
  ``torch.topk``, ``torch.kthvalue`` and one read pass (``x.sum()``); the mask equals a stable
  descending ``torch.sort`` where that fits (scores with many ties).
* ``bf16_steps``: autocast-bf16 FSAM steps: finite, perturbed (sharpness > 0), distance to the
  fp32 run, and the fraction of perturbed entries whose bf16 value the perturbation changed.
* ``deepspeed``: one rank, ZeRO-2 and ZeRO-3 bf16 (fp32 masters): FSAM steps finite and close to
  fp32; a NaN injected in pass 1 and in pass 2 skips the step with weights unchanged. fp16 is
  refused in preflight (not implemented; see docs/backends.md) and reported as such.
* ``fsdp2``: one rank, bf16 ``MixedPrecisionPolicy``, and with CPU offload (GPU only).
* ``step_time``: AdamW / SAM / FSAM on a t5-base-shaped random T5 (bf16 autocast): median step
  time and peak memory (``torch.cuda.max_memory_allocated``), ratios from the same run.
* ``host_syncs``: synchronisations per step kind (``torch.cuda.set_sync_debug_mode``; on the CPU,
  calls counted by bench/host_syncs.py) for V views × C chunks.
* ``nccl``: with ≥ 2 GPUs, ZeRO-3 and FSDP2 FSAM on 2 NCCL ranks vs one process; with one GPU it
  says so (two NCCL ranks cannot share one GPU).

Without CUDA (and without ``--device cpu``) it prints one line and exits 0. ``--device cpu
--quick`` runs every section's logic on small CPU tensors (tests/test_gpu_readiness.py runs it).
Exit status 1 if a section failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import random_batch, synchronize, t5_model

PARITY_C = 1e-3
"""core_parity: per tensor ‖w − w_cpu‖ ≤ PARITY_C · ‖w_cpu − w₀‖."""
BF16_C = 0.25
"""bf16 autocast vs fp32: ‖w_bf16 − w_fp32‖ ≤ BF16_C · ‖w_fp32 − w₀‖ over the model."""
BF16_WEIGHTS_C = 0.5
"""The same for DeepSpeed bf16, whose forward reads bf16 *weights* (measured 0.30 after 3 CPU steps)."""


@dataclass
class Context:
    device: torch.device
    quick: bool
    out: Path
    results: dict = field(default_factory=dict)


class Skip(Exception):
    """A section that cannot run here (the reason is reported)."""


# --- shared pieces --------------------------------------------------------------------------------

def _tiny():
    return t5_model(vocab=64, d_model=32, layers=2, heads=4)


def _batches(n: int, device, vocab: int = 64, micro: int = 4) -> list[dict]:
    return [{k: v.to(device) for k, v in random_batch(vocab=vocab, micro=micro, seed=s).items()} for s in range(n)]


def _train(backend, fsam, batches: list[dict], loss_fn=None, on_step=None) -> list[dict]:
    from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
    from fsam_dist.train.step import train_step

    out = []
    for step, batch in enumerate(batches):
        if on_step is not None:
            on_step(step)
        out.append(train_step(backend, loss_fn or seq2seq_loss_sum, [batch], step=step,
                              count_targets=count_target_tokens, fsam=fsam))
    return out


def _cpu_state(module) -> dict:
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in module.state_dict().items()}


def _relative_to_travel(got: dict, ref: dict, start: dict) -> dict[str, float]:
    """Per tensor ‖got − ref‖ / ‖ref − start‖ (tensors that did not move are left out)."""
    out = {}
    for k, r in ref.items():
        travelled = float((r - start[k]).norm())
        if travelled > 0:
            out[k] = float((got[k] - r).norm()) / travelled
    return out


def _model_distance(got: dict, ref: dict, start: dict) -> float:
    num = math.sqrt(sum(float((got[k] - ref[k]).square().sum()) for k in ref))
    den = math.sqrt(sum(float((ref[k] - start[k]).square().sum()) for k in ref))
    return num / den if den else 0.0


def _local(model, autocast=None):
    from fsam_dist.shards.local import LocalBackend

    return LocalBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-3), autocast_dtype=autocast)


def _fsam(**kw):
    from fsam_dist.core import FSAM

    return FSAM(**{"rho": 0.05, "keep_ratio": 0.1, "mask_interval": 5, **kw})


def _mask_bits(fsam) -> torch.Tensor:
    pieces = sorted(fsam.masks.items(), key=lambda item: item[0][1])
    return torch.cat([m.reshape(-1).to("cpu", torch.bool) for _, m in pieces])


def _timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


_PG = {"started": False}


def _one_rank_group(ctx: Context) -> None:
    """A world-1 process group (NCCL on a GPU, gloo on the CPU) for the DeepSpeed/FSDP sections."""
    import torch.distributed as dist

    from .common import free_port, set_rank_env

    if dist.is_initialized():
        return
    set_rank_env(0, 1, free_port())
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1,
                            device_id=ctx.device if ctx.device.type == "cuda" else None)
    _PG["started"] = True


# --- sections -------------------------------------------------------------------------------------

def core_parity(ctx: Context) -> dict:
    steps = 6 if ctx.quick else 10
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        runs = {}
        for where in ("cpu", ctx.device):
            model = _tiny().to(where)
            start = _cpu_state(model)
            fsam = _fsam()
            stats = _train(_local(model), fsam, _batches(steps, where))
            runs[str(where)] = (start, _cpu_state(model), _mask_bits(fsam), stats)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow_tf32
    (start, ref, ref_mask, _), (_, got, got_mask, stats) = runs["cpu"], runs[str(ctx.device)]
    rel = _relative_to_travel(got, ref, start)
    worst = max(rel, key=rel.get)
    jaccard = float((ref_mask & got_mask).sum()) / max(1, int((ref_mask | got_mask).sum()))
    ok = rel[worst] <= PARITY_C and jaccard >= 0.99 and all(math.isfinite(s["loss"]) for s in stats)
    return {"ok": ok, "summary": f"{steps} FSAM steps (refresh at 0 and 5), worst ‖w − w_cpu‖/‖w_cpu − w₀‖ "
                                 f"{rel[worst]:.2e} ({worst}), limit {PARITY_C:g}; mask Jaccard vs CPU {jaccard:.4f}",
            "worst_relative": rel[worst], "mask_jaccard": jaccard}


def topk_mask(ctx: Context) -> dict:
    from fsam_dist.core import global_topk_mask

    sizes = [10 ** 4, 10 ** 5] if ctx.quick else [10 ** 7, 10 ** 8, 10 ** 9]
    exact_up_to = 10 ** 5 if ctx.quick else 10 ** 8
    rows, ok = [], True
    for n in sizes:
        row = {"N": f"{n:.0e}"}
        try:
            g = torch.Generator(device=ctx.device).manual_seed(0)
            # 1000 distinct values: ties everywhere, so the tie-break by position is exercised.
            x = torch.randint(0, 1000, (n,), device=ctx.device, generator=g).float().div_(1000)
            k = n // 10
            repeat = 1 if n >= 10 ** 9 else 3
            row["select_s"] = _timed(lambda: global_topk_mask([x], [0], k), repeat)
            row["topk_s"] = _timed(lambda: torch.topk(x, k, sorted=False), repeat)
            row["kthvalue_s"] = _timed(lambda: torch.kthvalue(x, n - k + 1), repeat) \
                if ctx.device.type == "cuda" or n <= 10 ** 8 else None
            row["sum_s"] = _timed(lambda: x.sum(), repeat)
            row["select/sum"] = row["select_s"] / row["sum_s"]
            if n <= exact_up_to:
                mask = global_topk_mask([x], [0], k)[0]
                want = torch.zeros(n, dtype=torch.bool, device=ctx.device)
                want[torch.sort(x, descending=True, stable=True).indices[:k]] = True
                row["exact_vs_stable_sort"] = bool(torch.equal(mask, want))
                ok &= row["exact_vs_stable_sort"]
            x = None   # free it before the next size (the lambdas above have run)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:   # e.g. kthvalue's limits at 1e9
            row["note"] = "out of memory" if isinstance(err, torch.cuda.OutOfMemoryError) else str(err)[:120]
            ok &= "select_s" in row or isinstance(err, torch.cuda.OutOfMemoryError)   # the select itself failed
        _peak_reset(ctx.device)
        rows.append(row)
    return {"ok": ok, "table": rows,
            "summary": "exact where checked" if ok else "MASK DIFFERS from a stable sort"}


def bf16_steps(ctx: Context) -> dict:
    steps = 4 if ctx.quick else 10
    batches = _batches(steps, ctx.device)
    runs, flips = {}, []
    for dtype in (None, torch.bfloat16):
        model = _tiny().to(ctx.device)
        start = _cpu_state(model)
        backend, fsam = _local(model, autocast=dtype), _fsam()
        if dtype is not None:
            ascend = fsam.ascend

            def counted(views, *a, **k):
                before = [v.weights.clone() for v in views]
                out = ascend(views, *a, **k)
                changed = sum(int((v.weights.to(torch.bfloat16) != b.to(torch.bfloat16)).sum())
                              for v, b in zip(views, before))
                moved = sum(int((v.weights != b).sum()) for v, b in zip(views, before))
                flips.append(changed / max(1, moved))
                return out

            fsam.ascend = counted
        stats = _train(backend, fsam, batches)
        runs[dtype] = (start, _cpu_state(model), stats)
    start, ref, _ = runs[None]
    _, got, stats = runs[torch.bfloat16]
    distance = _model_distance(got, ref, start)
    finite = all(math.isfinite(s["loss"]) and math.isfinite(s.get("perturbed_loss", 0.0)) for s in stats)
    sharp = statistics.mean(s["sharpness"] for s in stats if "sharpness" in s)
    ok = finite and sharp > 0 and distance <= BF16_C
    return {"ok": ok, "summary": f"{steps} autocast-bf16 FSAM steps: finite {finite}, mean sharpness {sharp:.3g}, "
                                 f"‖w_bf16 − w_fp32‖/‖w_fp32 − w₀‖ = {distance:.3f} (limit {BF16_C}); "
                                 f"bf16 value changed for {statistics.mean(flips):.1%} of the entries the "
                                 "perturbation moved",
            "distance": distance, "sharpness": sharp, "bf16_flip_fraction": statistics.mean(flips)}


class _NaNAt:
    """Loss function that returns NaN at (step, pass): the overflow a loss scaler would see."""

    def __init__(self, step: int, which: int):
        from fsam_dist.train.loss import seq2seq_loss_sum

        self.loss, self.step, self.which, self.calls, self.current = seq2seq_loss_sum, step, which, 0, -1

    def at(self, step: int) -> None:
        self.current, self.calls = step, 0

    def __call__(self, model, batch):
        self.calls += 1
        loss = self.loss(model, batch)
        return loss * float("nan") if self.current == self.step and self.calls == self.which else loss


def _fp32_reference(ctx: Context) -> tuple[list[dict], dict, dict]:
    """The batches of a world-1 backend section, and one fp32 process's start and end weights on them."""
    batches = _batches(3 if ctx.quick else 8, ctx.device)
    reference = _tiny().to(ctx.device)
    start = _cpu_state(reference)
    _train(_local(reference), _fsam(), batches)
    return batches, start, _cpu_state(reference)


def deepspeed(ctx: Context) -> dict:
    from fsam_dist.config import Config, ConfigError
    from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build
    from fsam_dist.train.deepspeed_setup import build_deepspeed
    from fsam_dist.train.backends import preflight
    from fsam_dist.train.distributed import DistEnv

    _one_rank_group(ctx)
    import deepspeed as ds

    if ctx.device.type == "cpu":
        skip_cpu_shm_build()
    ds.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
    batches, start, ref = _fp32_reference(ctx)
    rows, ok = [], True
    for stage in (2, 3):
        row = {"stage": stage, "precision": "bf16"}
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                  "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
                  "data_types": {"grad_accum_dtype": "fp32"}, "steps_per_print": 10 ** 9}
        model = _tiny()
        backend = build_deepspeed(model, config, torch.optim.AdamW(model.parameters(), lr=1e-3))
        stats = _train(backend, _fsam(), batches)
        got = {k: v.float() for k, v in backend.full_state_dict().items()}
        row["distance_to_fp32"] = _model_distance(got, ref, start)
        row["finite"] = all(math.isfinite(s["loss"]) for s in stats)
        row["sharpness>0"] = statistics.mean(s["sharpness"] for s in stats if "sharpness" in s) > 0
        for which, name in ((1, "nan_pass1_skips"), (2, "nan_pass2_skips")):
            before = {k: v.clone() for k, v in backend.full_state_dict().items()}
            loss = _NaNAt(0, which)
            loss.at(0)
            stat = _train(backend, _fsam(), batches[:1], loss_fn=loss)[0]
            after = backend.full_state_dict()
            row[name] = bool(stat["skipped"]) and all(torch.equal(before[k], after[k]) for k in before)
        ok &= row["finite"] and row["sharpness>0"] and row["distance_to_fp32"] <= BF16_WEIGHTS_C and \
            row["nan_pass1_skips"] and row["nan_pass2_skips"]
        rows.append(row)
        del backend
    try:
        cfg = Config.model_validate({"model": {"name_or_path": "m"}, "data": {"train_file": "t"},
                                     "train": {"precision": "fp16"},
                                     "backend": {"deepspeed_config": "configs/deepspeed/zero2.json"}})
        preflight(cfg, DistEnv(0, 1, 0, "torchrun"), "deepspeed")
        fp16 = "accepted (unexpected)"
        ok = False
    except ConfigError:
        fp16 = "refused in preflight (not implemented; the loss-scaler path is pending)"
    return {"ok": ok, "table": rows, "summary": f"ZeRO-2/3 bf16 at world 1; fp16: {fp16}"}


def fsdp2(ctx: Context) -> dict:
    from fsam_dist.train.fsdp_wrap import wrap_fsdp

    _one_rank_group(ctx)
    batches, start, ref = _fp32_reference(ctx)
    rows, ok = [], True
    variants = [("bf16 MixedPrecisionPolicy", {"mixed_precision": "bf16"})]
    if ctx.device.type == "cuda":
        variants.append(("CPU offload", {"cpu_offload": True}))
    for label, kwargs in variants:
        _peak_reset(ctx.device)
        backend = wrap_fsdp(_tiny(), 2, lambda params: torch.optim.AdamW(params, lr=1e-3), device=ctx.device,
                              **kwargs)
        stats = _train(backend, _fsam(), batches)
        got = {k: v.float().cpu() for k, v in backend.full_state_dict().items()}
        row = {"variant": label, "distance_to_fp32": _model_distance(got, ref, start),
               "finite": all(math.isfinite(s["loss"]) for s in stats),
               "sharpness>0": statistics.mean(s["sharpness"] for s in stats if "sharpness" in s) > 0,
               "peak_GiB": _peak_gib(ctx.device)}
        limit = BF16_C if "bf16" in label else PARITY_C * 10
        ok &= row["finite"] and row["sharpness>0"] and row["distance_to_fp32"] <= limit
        rows.append(row)
        del backend
    note = "" if ctx.device.type == "cuda" else " (CPU offload needs a GPU: not run)"
    return {"ok": ok, "table": rows, "summary": f"FSDP2 at world 1{note}"}


def step_time(ctx: Context) -> dict:
    if ctx.quick:
        shape, micro, warmup, steps = dict(vocab=128, d_model=32, layers=2, heads=4), 4, 1, 2
    else:   # t5-base-shaped (gated-GELU: ~250 M parameters)
        shape, micro, warmup, steps = dict(vocab=32128, d_model=768, layers=12, heads=12), 16, 3, 10
    batches = _batches(warmup + steps, ctx.device, vocab=shape["vocab"], micro=micro)
    autocast = torch.bfloat16 if ctx.device.type == "cuda" else None
    rows = []
    for mode, kw in (("AdamW", None), ("SAM", {"keep_ratio": 1.0}), ("FSAM", {"keep_ratio": 0.1})):
        model = t5_model(**shape).to(ctx.device)
        backend, fsam = _local(model, autocast=autocast), (_fsam(mask_interval=100, **kw) if kw else None)
        _peak_reset(ctx.device)
        times = []

        def tick(step, times=times):
            synchronize()
            times.append(time.perf_counter())

        _train(backend, fsam, batches, on_step=tick)
        tick(None)
        durations = [b - a for a, b in zip(times, times[1:])][warmup:]
        rows.append({"mode": mode, "median_step_s": statistics.median(durations), "peak_GiB": _peak_gib(ctx.device),
                     "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6})
        del backend, model
    base = {r["mode"]: r for r in rows}
    for r in rows:
        r["time/AdamW"] = r["median_step_s"] / base["AdamW"]["median_step_s"]
        if r["peak_GiB"] is not None:
            r["memory/AdamW"] = r["peak_GiB"] / base["AdamW"]["peak_GiB"]
    return {"ok": True, "table": rows, "summary": f"{'bf16 autocast' if autocast else 'fp32'}, micro-batch {micro}, "
                                                  f"median of {steps} steps "
                                                  "(mask refresh at step 0, inside the warm-up)"}


def host_syncs(ctx: Context) -> dict:
    from .host_syncs import count_step_syncs, counting, cuda_sync_warnings

    shapes = [(4, 1), (8, 2)] if not ctx.quick else [(2, 1), (4, 1)]
    rows = []
    for views, chunks in shapes:
        for label, counter in (("calls", counting),) + ((("cuda syncs", cuda_sync_warnings),)
                                                       if ctx.device.type == "cuda" else ()):
            found = count_step_syncs(views=views, chunks_per_view=chunks, micro_batches=2, device=str(ctx.device),
                                     counter=counter)
            for kind, counts in found["by_kind"].items():
                rows.append({"V": views, "C": chunks, "A": 2, "count": label, "step": kind,
                             "total": counts["total"], "core": counts.get("core", 0), "comm": counts.get("comm", 0),
                             "train": counts.get("train", 0), "shards": counts.get("shards", 0),
                             "other": counts.get("other", 0)})
    return {"ok": True, "table": rows, "summary": "per step kind; 'other' = torch/transformers internals "
                                                  "(e.g. the optimizer)"}


def _nccl_rank(rank: int, world: int, port: int, batches: list, queue) -> None:
    import torch.distributed as dist

    from fsam_dist.train.deepspeed_setup import build_deepspeed
    from fsam_dist.train.fsdp_wrap import wrap_fsdp

    from .common import set_rank_env

    set_rank_env(rank, world, port)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    import deepspeed as ds

    ds.init_distributed(dist_backend="nccl")
    mine = [{k: v[rank::world].to(device) for k, v in b.items()} for b in batches]
    out = {}
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9}
    model = _tiny()
    zero3 = build_deepspeed(model, config, torch.optim.AdamW(model.parameters(), lr=1e-3))
    _train(zero3, _fsam(), mine)
    out["zero3"] = zero3.full_state_dict()
    fsdp = wrap_fsdp(_tiny(), 2, lambda params: torch.optim.AdamW(params, lr=1e-3), device=device)
    _train(fsdp, _fsam(), mine)
    out["fsdp2"] = fsdp.full_state_dict()
    if rank == 0:
        queue.put({k: {n: t.float().cpu() for n, t in v.items()} for k, v in out.items()})
    dist.destroy_process_group()


def nccl(ctx: Context) -> dict:
    count = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    if count < 2:
        raise Skip(f"{count} GPU(s) visible: two NCCL ranks cannot share one GPU, so the NCCL parity needs ≥ 2")
    from .common import spawn_ranks

    batches = [{k: v.cpu() for k, v in b.items()} for b in _batches(6, "cpu")]
    results = spawn_ranks(_nccl_rank, 2, batches, timeout=300)[0]
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = _tiny().to(ctx.device)
    start = _cpu_state(reference)
    torch.backends.cuda.matmul.allow_tf32 = allow
    _train(_local(reference), _fsam(), [{k: v.to(ctx.device) for k, v in b.items()} for b in batches])
    ref = _cpu_state(reference)
    rows, ok = [], True
    for name, got in results.items():
        rel = _relative_to_travel(got, ref, start)
        rows.append({"backend": name, "worst_relative": max(rel.values())})
        ok &= max(rel.values()) <= PARITY_C
    return {"ok": ok, "table": rows, "summary": "2 NCCL ranks vs one process, 6 FSAM steps"}


SECTIONS = {f.__name__: f for f in (core_parity, topk_mask, bf16_steps, deepspeed, fsdp2, step_time, host_syncs,
                                     nccl)}


# --- report ---------------------------------------------------------------------------------------

def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def write_report(ctx: Context, meta: dict) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "gpu_check.json").write_text(json.dumps({**meta, "sections": ctx.results}, indent=1, default=str))
    lines = ["# GPU check", "", f"{meta['date']} · {meta['device_name']} · torch {meta['torch']} · "
             f"command: `{meta['command']}`", ""]
    for name, result in ctx.results.items():
        lines += [f"## {name} — {result['status']} ({result.get('seconds', 0):.0f} s)", "",
                  result.get("summary", ""), ""]
        table = result.get("table")
        if table:
            keys = list(dict.fromkeys(k for row in table for k in row))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in table]
            lines.append("")
        if result.get("error"):
            lines += ["```", result["error"].rstrip(), "```", ""]
    (ctx.out / "gpu_check.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/gpu-check", help="directory for gpu_check.md and gpu_check.json")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU test of this script)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_check.py needs a GPU (torch.cuda.is_available() is False); nothing was run "
              "(--device cpu --quick runs its logic on the CPU)")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    ctx = Context(device, args.quick, Path(args.out))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
            "gpus": torch.cuda.device_count() if device.type == "cuda" else 0, "quick": args.quick,
            "command": " ".join(["python -m bench.gpu_check", *(argv if argv is not None else sys.argv[1:])])}
    failed = False
    for name in args.sections:
        began = time.perf_counter()
        try:
            result = SECTIONS[name](ctx)
            result["status"] = "ok" if result.pop("ok") else "fail"
        except Skip as why:
            result = {"status": "skipped", "summary": str(why)}
        except Exception:   # one broken section must not cost the others' figures
            result = {"status": "fail", "error": traceback.format_exc()}
        result["seconds"] = time.perf_counter() - began
        failed |= result["status"] == "fail"
        ctx.results[name] = result
        write_report(ctx, meta)
        print(f"{name}: {result['status']} ({result['seconds']:.0f} s) {result.get('summary', '')}", flush=True)
    if _PG["started"]:
        import torch.distributed as dist

        dist.destroy_process_group()
    print(f"report: {ctx.out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
