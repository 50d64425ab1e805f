"""The generalisation study: fine-tune one pretrained start with AdamW, SAM, FSAM and variants over seeds, sizes and tasks.

Every run goes through the library (``fsam_dist.train.loop.run`` with a validated ``Config``, one
process, the ``single`` backend); runs execute in a pool of worker processes, one thread each.
Each run trains for a fixed number of steps and generates on a held-out file every
``eval_every`` steps. That file holds the corpus' *validation* examples followed by its *test*
examples; the scores are recomputed from the prediction files per part, the step with the best
*validation* score is chosen for each run (early stopping), and the *test* score at that step is
what the tables report. The test part never influences any choice.

Per (task, training-set size, method) the table gives the mean, the standard deviation and the
Student-t 95 % interval over seeds; per (task, size) the paired differences FSAM − SAM and
SAM − AdamW (same seeds: the same data order and dropout stream) with their intervals and paired
t-test p-values. A run whose directory already holds a finished run with the same settings is
reused, so an interrupted study continues where it stopped.

    python -m fsam_dist.study [--quick] [--out runs/study] [--workers 2] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .stats import paired, summary

REPO = Path(__file__).resolve().parents[2]
RHO = 0.05
EVALS = 6
"""Evaluations per run (the early-stopping candidates) where a task does not say."""


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: corpus, metric (``eval/<metric>``-style key of compute_metrics), direction."""

    name: str
    spec: str
    metric: str
    lower_is_better: bool
    eval_task: str
    sizes: tuple[int, ...]
    steps: dict = field(default_factory=dict)     # training-set size -> max steps
    evals: dict = field(default_factory=dict)     # training-set size -> evaluations per run (default EVALS)
    max_source_length: int = 32
    max_target_length: int = 32
    val_examples: int = 200
    test_examples: int = 400
    baselines: tuple[str, ...] = ()     # keys of BASELINES, scored on the same validation/test parts


TASKS = {
    "g2p": Task("g2p", "builtin:cmudict", "per", True, "g2p", (200, 1000), {200: 300, 1000: 900},
                evals={200: 6, 1000: 9}, val_examples=60, test_examples=200),
    "stress": Task("stress", "builtin:stress", "exact_match", False, "gec", (300, 3000), {300: 500, 3000: 600},
                   val_examples=300, test_examples=600, baselines=("majority", "vowel-groups")),
    "spelling": Task("spelling", "builtin:spelling", "exact_match", False, "gec", (300, 3000), {300: 600, 3000: 600},
                     val_examples=300, test_examples=600, baselines=("copy",)),
}
"""g2p: grapheme → phoneme, PER. stress: the lexical stress pattern of a held-out word, exact match.
spelling: spelling correction of held-out words, exact match (copying the input scores 0); it
does not learn at this scale (docs/results.md), so it is not in the default ``--tasks``.
(:mod:`fsam_dist.seq2seq.data.corpora.heldout`)."""

DEFAULT_TASKS = ("g2p", "stress")
"""What a full study runs (``--tasks`` picks others): the two tasks the miniature learns."""

# (label, fsam section). SAM perturbs every entry (nothing excluded), as keep_ratio 1 means.
METHODS = {
    "adamw": ("AdamW", {"enabled": False}),
    "sam": ("SAM (κ=1)", {"enabled": True, "keep_ratio": 1.0, "exclude": [], "rho": RHO}),
    "fsam": ("FSAM (κ=0.1)", {"enabled": True, "keep_ratio": 0.1, "rho": RHO}),
    "afsam": ("adaptive FSAM (ASAM, κ=0.1, ρ=0.5)", {"enabled": True, "keep_ratio": 0.1, "adaptive": True, "rho": 0.5}),
    "fsam-k4": ("FSAM, fsam.interval 4", {"enabled": True, "keep_ratio": 0.1, "interval": 4, "rho": RHO}),
}
PAIRS = (("fsam", "sam"), ("sam", "adamw"), ("fsam", "adamw"))
CORE = ("adamw", "sam", "fsam")
"""Run first, every seed, so that a study stopped early has whole seeds of these."""


@dataclass
class Plan:
    model: str
    out: Path
    tasks: list
    methods: list
    seeds: list
    sizes: dict          # task name -> sizes
    steps: dict          # (task, size) -> steps
    eval_every: dict     # (task, size) -> eval interval
    lr: float
    batch_size: int
    mask_interval: int
    workers: int
    rho: float | None = None     # overrides RHO (adaptive FSAM: 10x) when set


# ----------------------------------------------------------------------------------------- eval file
def write_eval_file(task: Task, folder: Path, val: int, test: int) -> tuple[Path, int]:
    """``folder/<task>-eval.jsonl``: ``val`` validation then ``test`` test examples; returns (path, n_val).
    ``test`` 0 writes validation examples only (choosing a budget without generating on test)."""
    from ..seq2seq.data import load_examples

    folder.mkdir(parents=True, exist_ok=True)
    v, _ = load_examples(task.spec, "validation", max_examples=val)
    t = load_examples(task.spec, "test", max_examples=test)[0] if test else []
    path = folder / f"{task.name}-eval.jsonl"
    text = "".join(json.dumps({"source": ex["source"], "target": ex["target"], "id": ex["id"]}, ensure_ascii=False)
                   + "\n" for ex in v + t)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path, len(v)


def run_config(plan: Plan, task: Task, size: int, method: str, seed: int, eval_file: Path, run_dir: Path) -> dict:
    steps = plan.steps[(task.name, size)]
    fsam = {"mask_interval": plan.mask_interval, **METHODS[method][1]}
    if plan.rho is not None and method != "adamw":
        fsam["rho"] = plan.rho * (10 if fsam.get("adaptive") else 1)
    return {
        "model": {"name_or_path": str(plan.model)},
        "data": {"train_file": task.spec, "eval_file": str(eval_file), "max_train_examples": size,
                 "max_source_length": task.max_source_length, "max_target_length": task.max_target_length},
        "optim": {"lr": plan.lr, "weight_decay": 0.01, "scheduler": "linear", "warmup_steps": max(1, steps // 20),
                  "clip_grad_norm": 1.0},
        "fsam": fsam,
        "backend": {"name": "single"},
        "train": {"max_steps": steps, "micro_batch_size": plan.batch_size, "output_dir": str(run_dir),
                  "eval_every": plan.eval_every[(task.name, size)], "log_every": 50, "seed": seed, "resume": "none"},
        "eval": {"batch_size": 100, "max_new_tokens": task.max_target_length, "task": task.eval_task},
    }


def _run_one(job: dict) -> dict:
    """Worker: train one configuration (reusing a finished run with the same config)."""
    import torch

    torch.set_num_threads(1)
    run_dir = Path(job["config"]["train"]["output_dir"])
    marker = run_dir / "study-config.json"
    wanted = json.dumps(job["config"], sort_keys=True)
    if (run_dir / "final").is_dir() and marker.is_file() and marker.read_text() == wanted:
        return {**job, "reused": True}
    from ..config import validate, Config
    from ..train.loop import run

    cfg = validate(Config, job["config"])
    start = time.time()
    run(cfg)
    marker.write_text(wanted)
    return {**job, "reused": False, "seconds": time.time() - start}


# ----------------------------------------------------------------------------------------- scoring
def score_run(run_dir: Path, task: Task, n_val: int) -> dict:
    """Validation and test scores at every evaluated step; the early-stopping step (best validation)
    and the test score there; mean step time."""
    from ..seq2seq.metrics import compute_metrics

    by_step = {}
    for pred_file in sorted((run_dir / "predictions").glob("step-*.jsonl")):
        step = int(pred_file.stem.split("-")[1])
        rows = [json.loads(line) for line in pred_file.read_text().splitlines() if line.strip()]
        parts = {"val": rows[:n_val], "test": rows[n_val:]}
        by_step[step] = {part: compute_metrics([r["prediction"] for r in rs], [r["target"] for r in rs],
                                               task.eval_task)[task.metric] if rs else math.nan
                         for part, rs in parts.items()}
    if not by_step:
        raise FileNotFoundError(f"{run_dir} has no prediction files")
    sign = 1 if task.lower_is_better else -1
    best = min(by_step, key=lambda s: (sign * by_step[s]["val"], s))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time"] for r in records if "step_time" in r]
    return {"best_step": best, "val": by_step[best]["val"], "test": by_step[best]["test"],
            "final_test": by_step[max(by_step)]["test"], "curve": {s: v for s, v in sorted(by_step.items())},
            "step_time": statistics.mean(times[len(times) // 10:]) if times else math.nan}


def _majority(task: Task):
    from collections import Counter

    from ..seq2seq.data import load_examples

    common = Counter(ex["target"] for ex in load_examples(task.spec, "train")[0]).most_common(1)[0][0]
    return lambda source: common


def _vowel_groups(task: Task):
    from ..seq2seq.data.corpora.heldout import stress_heuristic

    return stress_heuristic


BASELINES = {
    "copy": ("copy the input (no model)", lambda task: (lambda source: source)),
    "majority": ("the commonest training target (no model)", _majority),
    "vowel-groups": ("one syllable per vowel group, stress on the first (no model)", _vowel_groups),
}
"""Predictions without a model, so a reader sees what fine-tuning adds: name -> (label, task -> source -> prediction)."""


def baseline_scores(task: Task, eval_file: Path, n_val: int) -> dict:
    """Each of the task's baselines scored with the task's metric on the validation and test parts."""
    from ..seq2seq.metrics import compute_metrics

    rows = [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()]
    out = {}
    for name in task.baselines:
        predict = BASELINES[name][1](task)
        out[name] = {part: compute_metrics([predict(r["source"]) for r in rs], [r["target"] for r in rs],
                                           task.eval_task)[task.metric] if rs else math.nan
                     for part, rs in (("val", rows[:n_val]), ("test", rows[n_val:]))}
    return out


def aggregate(scores: dict, plan: Plan) -> list[dict]:
    """Rows per (task, size): each method summarised over the seeds it has; each paired difference
    over the seeds both sides have; step times relative to AdamW's mean."""
    out = []
    for task in plan.tasks:
        for size in plan.sizes[task.name]:
            cell = {m: {seed: scores[(task.name, size, m, seed)] for seed in plan.seeds
                        if (task.name, size, m, seed) in scores} for m in plan.methods}
            cell = {m: runs for m, runs in cell.items() if runs}
            if not cell:
                continue
            base_time = statistics.mean(r["step_time"] for r in cell["adamw"].values()) if "adamw" in cell else None
            methods = {}
            for m, by_seed in cell.items():
                runs = list(by_seed.values())
                methods[m] = {**summary(r["test"] for r in runs), "values": [r["test"] for r in runs],
                              "seeds": list(by_seed), "val_mean": statistics.mean(r["val"] for r in runs),
                              "best_steps": [r["best_step"] for r in runs],
                              "step_time_ratio": (statistics.mean(r["step_time"] for r in runs) / base_time
                                                  if base_time else math.nan)}
            diffs = {}
            for a, b in PAIRS:
                common = [s for s in plan.seeds if s in cell.get(a, {}) and s in cell.get(b, {})]
                if common:
                    diffs[f"{a}-{b}"] = paired([cell[a][s]["test"] for s in common],
                                               [cell[b][s]["test"] for s in common])
            out.append({"task": task.name, "metric": task.metric, "lower_is_better": task.lower_is_better,
                        "size": size, "steps": plan.steps[(task.name, size)],
                        "seeds": sorted({s for runs in cell.values() for s in runs}),
                        "methods": methods, "differences": diffs})
    return out


def markdown(rows: list[dict]) -> str:
    """The study's tables: per-method test scores, then the paired differences."""
    lines = ["| task (metric) | train examples | steps | method | test mean | std | 95 % CI | seeds | "
             "validation mean | chosen step (median) | runs stopped at the last evaluation | step time vs AdamW |",
             "|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        arrow = "↓" if row["lower_is_better"] else "↑"
        for m, s in row["methods"].items():
            last = sum(step == row["steps"] for step in s["best_steps"])
            lines.append(f"| {row['task']} ({row['metric']} {arrow}) | {row['size']} | {row['steps']} | "
                         f"{METHODS[m][0]} | {s['mean']:.2f} | {s['std']:.2f} | [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
                         f" | {s['n']} | {s['val_mean']:.2f} | {statistics.median(s['best_steps']):.0f} | "
                         f"{last}/{s['n']} | {s['step_time_ratio']:.2f}× |")
        for name, b in row.get("baselines", {}).items():
            lines.append(f"| {row['task']} ({row['metric']} {arrow}) | {row['size']} | 0 | {BASELINES[name][0]} | "
                         f"{b['test']:.2f} | | | | {b['val']:.2f} | | | |")
    lines += ["", "| task (metric) | train examples | difference | mean | 95 % CI | paired t-test p | seeds |",
              "|---|---:|---|---:|---|---:|---:|"]
    for row in rows:
        arrow = "↓" if row["lower_is_better"] else "↑"
        for name, d in row["differences"].items():
            a, b = name.split("-", 1)
            lines.append(f"| {row['task']} ({row['metric']} {arrow}) | {row['size']} | {METHODS[a][0]} − "
                         f"{METHODS[b][0]} | {d['mean']:+.2f} | [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] | "
                         f"{d['p_value']:.3f} | {d['n']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], output: Path) -> Path:
    """One panel per (task, size): each method's test mean with its 95 % interval and the seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.8), squeeze=False)
    for ax, row in zip(axes[0], rows):
        names = list(row["methods"])
        for i, m in enumerate(names):
            s = row["methods"][m]
            err = 0 if math.isnan(s["half_width"]) else s["half_width"]
            ax.errorbar([i], [s["mean"]], yerr=[err], fmt="o", capsize=4, color=f"C{i}")
            ax.scatter([i + 0.15] * len(s["values"]), s["values"], s=8, color=f"C{i}", alpha=0.5)
        ax.set_xticks(range(len(names)), names, rotation=35)
        arrow = "lower is better" if row["lower_is_better"] else "higher is better"
        ax.set(title=f"{row['task']}, {row['size']} examples", ylabel=f"test {row['metric']} ({arrow})")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


# ------------------------------------------------------------------------------------------- driver
def make_plan(args) -> Plan:
    from ..seq2seq.pretrain import RESERVED_WORDS

    tasks = [TASKS[t] for t in args.tasks]
    sizes = {t.name: tuple(args.sizes) if args.sizes else t.sizes for t in tasks}
    if max(sizes.get("g2p", [0])) > RESERVED_WORDS:
        raise SystemExit(f"--sizes: g2p training sets come from the {RESERVED_WORDS} words kept out of pretraining")
    if max([*sizes.get("spelling", []), *sizes.get("stress", []), 0]) > 9000:
        raise SystemExit("--sizes: stress and spelling training sets come from the ~9 100 usable words kept out of "
                         "pretraining (at most 9000)")
    steps, every = {}, {}
    for t in tasks:
        for n in sizes[t.name]:
            steps[(t.name, n)] = args.steps or t.steps.get(n) or max(t.steps.values())
            every[(t.name, n)] = max(1, math.ceil(steps[(t.name, n)] / (args.evals or t.evals.get(n) or EVALS)))
    seeds = list(dict.fromkeys(args.seed_list)) if getattr(args, "seed_list", None) else list(range(args.seeds))
    return Plan(model=args.model, out=args.out, tasks=tasks, methods=args.methods, seeds=seeds,
                sizes=sizes, steps=steps, eval_every=every, lr=args.lr, batch_size=args.batch_size,
                mask_interval=args.mask_interval, workers=args.workers, rho=args.rho)


def jobs_for(plan: Plan, eval_files: dict) -> list[dict]:
    """Every run, in the order that makes a study stopped early most useful: AdamW/SAM/FSAM before
    the other methods, and within each, one (task, size) cell with all its seeds before the next."""
    jobs = []
    phases = [[m for m in plan.methods if m in CORE], [m for m in plan.methods if m not in CORE]]
    cells = [(task, size) for task in plan.tasks for size in plan.sizes[task.name]]
    cells.sort(key=lambda cell: plan.sizes[cell[0].name].index(cell[1]))   # every task's first size first
    for methods in phases:
        for task, size in cells:
            for seed in plan.seeds:
                for method in methods:
                    run_dir = plan.out / task.name / str(size) / method / f"seed-{seed}"
                    jobs.append({"key": [task.name, size, method, seed],
                                 "config": run_config(plan, task, size, method, seed, eval_files[task.name][0],
                                                      run_dir)})
    return jobs


def run_study(plan: Plan, val_examples: int | None = None, test_examples: int | None = None,
              train: bool = True) -> dict:
    plan.out.mkdir(parents=True, exist_ok=True)
    eval_files = {t.name: write_eval_file(t, plan.out, t.val_examples if val_examples is None else val_examples,
                                          t.test_examples if test_examples is None else test_examples)
                  for t in plan.tasks}
    jobs = jobs_for(plan, eval_files)
    start = time.time()
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    print(f"study: {len(jobs)} runs in {plan.workers} worker process(es) -> {plan.out}", flush=True)
    done = 0
    if train and plan.workers > 1:
        # A worker killed from outside (the out-of-memory killer) breaks the executor, which says
        # so, where a multiprocessing.Pool would wait for its lost run forever.
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        with ProcessPoolExecutor(plan.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                for future in as_completed([pool.submit(_run_one, job) for job in jobs]):
                    done += 1
                    _progress(done, len(jobs), future.result(), start)
            except BrokenProcessPool:
                raise SystemExit(f"study: a worker process died ({done} of {len(jobs)} runs finished; killed from "
                                 f"outside, e.g. out of memory?). Run the same command again: finished runs are "
                                 f"reused, unfinished ones start over.") from None
    elif train:
        for job in jobs:
            done += 1
            _progress(done, len(jobs), _run_one(job), start)
    tasks = {t.name: t for t in plan.tasks}
    scores = {}
    for job in jobs:
        name, size, method, seed = job["key"]
        if not (Path(job["config"]["train"]["output_dir"]) / "final").is_dir():
            continue
        scores[(name, size, method, seed)] = score_run(Path(job["config"]["train"]["output_dir"]), tasks[name],
                                                       eval_files[name][1])
    rows = aggregate(scores, plan)
    baselines = {t.name: baseline_scores(t, *eval_files[t.name]) for t in plan.tasks}
    for row in rows:
        row["baselines"] = baselines[row["task"]]
    result = {"rows": rows, "wall_seconds": round(time.time() - start, 1),
              "settings": {"model": str(plan.model), "lr": plan.lr, "batch_size": plan.batch_size,
                           "mask_interval": plan.mask_interval, "rho": {m: (METHODS[m][1].get("rho") if plan.rho is None or m == "adamw" else
                                                                            plan.rho * (10 if METHODS[m][1].get("adaptive") else 1))
                                                                        for m in plan.methods},
                           "methods": {m: METHODS[m] for m in plan.methods}, "seeds": plan.seeds,
                           "steps": {f"{t}/{n}": s for (t, n), s in plan.steps.items()},
                           "eval_every": {f"{t}/{n}": s for (t, n), s in plan.eval_every.items()},
                           "tasks": {t.name: {**asdict(t), "steps": None, "val_examples": eval_files[t.name][1]}
                                     for t in plan.tasks}},
              "runs": [{"task": k[0], "size": k[1], "method": k[2], "seed": k[3], **v} for k, v in scores.items()]}
    (plan.out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (plan.out / "results.md").write_text(markdown(rows))
    if rows:
        plot(rows, plan.out / "results.png")
    else:
        print(f"study: no finished runs of this plan in {plan.out}", flush=True)
    return result


def _progress(done: int, total: int, result: dict, start: float) -> None:
    name, size, method, seed = result["key"]
    how = "reused" if result.get("reused") else f"{result['seconds']:.0f} s"
    print(f"[{done}/{total}, {time.time() - start:.0f} s] {name} {size} {method} seed {seed}: {how}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fsam_dist.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: g2p only, 200 examples, AdamW/SAM/FSAM, 2 seeds, 150 steps")
    ap.add_argument("--model", default=None, help="pretrained start (default: .demo/pretrained-t5-v2, built if missing)")
    ap.add_argument("--out", type=Path, default=None, help="default runs/study (runs/study-quick with --quick)")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None,
                    help=f"default {' '.join(DEFAULT_TASKS)} (spelling: tried, does not learn at this scale)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, ...)")
    ap.add_argument("--seed-list", type=int, nargs="+", default=None,
                    help="these seeds instead of 0 … --seeds − 1 (to split a study across processes or machines; "
                         "give each its own --out, or they would train the same run at once)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="training-set sizes (every task)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: per task and size)")
    ap.add_argument("--evals", type=int, default=None,
                    help=f"evaluations per run, the early-stopping candidates (default: per task and size, else {EVALS})")
    ap.add_argument("--val-examples", type=int, default=None)
    ap.add_argument("--test-examples", type=int, default=None)
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: tabulate the runs of this plan that have finished")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (chosen on the g2p validation split)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mask-interval", type=int, default=50)
    ap.add_argument("--rho", type=float, default=None,
                    help=f"perturbation radius of SAM/FSAM rows (default {RHO}; adaptive FSAM gets 10x)")
    ap.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                    help="worker processes (one run each, one thread)")
    args = ap.parse_args(argv)
    quick = {"tasks": ["g2p"], "methods": ["adamw", "sam", "fsam"], "seeds": 2, "sizes": [200], "steps": 150,
             "evals": 3, "val_examples": 100, "test_examples": 200}
    full = {"tasks": list(DEFAULT_TASKS), "methods": list(METHODS), "seeds": 5}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if "adamw" not in args.methods:
        ap.error("--methods: include adamw (step times and differences are relative to it)")
    args.out = args.out or REPO / ("runs/study-quick" if args.quick else "runs/study")
    if args.model is None:
        from ..seq2seq.pretrain import CACHE, pretrain

        args.model = str(pretrain(REPO / CACHE))
    plan = make_plan(args)
    result = run_study(plan, args.val_examples, args.test_examples, train=not args.report_only)
    print("\n" + markdown(result["rows"]))
    print(f"{plan.out / 'results.md'}, {plan.out / 'results.png'}, {plan.out / 'results.json'} "
          f"({result['wall_seconds']:.0f} s)")
    return 0
