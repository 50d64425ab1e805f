"""``make demo``: AdamW vs SAM vs FSAM fine-tuning a pretrained miniature T5 on 300 words of grapheme-to-phoneme, CPU.

1. Pretrains a small T5 once (``python -m fsam_dist.seq2seq.pretrain``: span corruption and
   prefix-LM on offline text, ~3 CPU minutes on an idle core, cached in ``.demo/pretrained-t5-v2``) — no pretrained
   weights can be downloaded here, and the paper's setting is fine-tuning a *pretrained* model on
   *little* data.
2. Fine-tunes it on ``--train-examples`` CMUdict words with AdamW, SAM (keep ratio 1, nothing
   excluded) and FSAM (keep ratio 0.1), ``--seeds`` seeds each, through the CLI
   (``python launch/train.py``, one process per run, ``--parallel`` runs at a time), evaluating the
   validation phoneme error rate (PER, lower is better) before training and ``--evals`` times during it.
3. Prints a table (mean ± standard deviation over seeds, step time relative to AdamW) and one line
   on what it shows, and writes ``.demo/demo.png``: training loss, validation PER and sharpness
   (perturbed minus unperturbed loss, measured by SAM/FSAM on their steps) against the step.

    python -m fsam_dist.demo [--steps 200] [--train-examples 300] [--seeds 2] [--lr 1e-3] [--out .demo]
                             [--runs adamw sam fsam fsam-k4 ...]

The seeded study with intervals over 5 seeds, two sizes and two tasks: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RUNS = [
    ("adamw", "AdamW", {"enabled": False}),
    ("sam", "SAM (keep 1.0)", {"enabled": True, "keep_ratio": 1.0, "exclude": []}),
    ("fsam", "FSAM (keep 0.1)", {"enabled": True, "keep_ratio": 0.1}),
]
EXTRA_RUNS = [   # --runs: the perturbation interval and LookSAM (docs/scaling.md §4)
    ("fsam-k2", "FSAM interval 2", {"enabled": True, "keep_ratio": 0.1, "interval": 2}),
    ("fsam-k4", "FSAM interval 4", {"enabled": True, "keep_ratio": 0.1, "interval": 4}),
    ("fsam-k4-looksam", "FSAM interval 4 + LookSAM (measured α)",
     {"enabled": True, "keep_ratio": 0.1, "interval": 4, "reuse_direction": True}),
    ("fsam-k4-looksam-0.7", "FSAM interval 4 + LookSAM (α 0.7)",
     {"enabled": True, "keep_ratio": 0.1, "interval": 4, "reuse_direction": True, "reuse_alpha": 0.7}),
]


def config(model_dir: Path, run_dir: Path, fsam: dict, steps: int, train_examples: int, seed: int,
           evals: int, lr: float = 1e-3) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": "builtin:cmudict", "max_train_examples": train_examples, "max_eval_examples": 200,
                 "max_source_length": 32, "max_target_length": 32},
        "optim": {"lr": lr, "weight_decay": 0.01, "scheduler": "linear", "warmup_steps": steps // 20,
                  "clip_grad_norm": 1.0},
        "fsam": {"rho": 0.05, "mask_interval": 50, **fsam},
        "backend": {"name": "single"},
        "train": {"max_steps": steps, "micro_batch_size": 32, "output_dir": str(run_dir),
                  "eval_every": max(1, steps // evals), "log_every": 25, "seed": seed, "resume": "none"},
        "eval": {"batch_size": 100, "max_new_tokens": 32, "at_start": True},
    }


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    final_eval = [r for r in records if "eval/per" in r][-1]
    evals = [r for r in records if "eval/per" in r]
    return {"per": final_eval["eval/per"], "exact": final_eval["eval/exact_match"],
            "best_per": min(r["eval/per"] for r in evals),
            "start_per": [r for r in records if "eval/per" in r][0]["eval/per"],
            # the mean, not the median: with fsam.interval most steps are the cheap ones
            "step_time": statistics.mean(r["step_time"] for r in train[len(train) // 10:]),
            "loss": statistics.mean(r["loss"] for r in train[-20:])}


def run_all(jobs: list[tuple[str, Path, Path]], parallel: int, steps: int, env: dict) -> dict:
    """Run ``python launch/train.py --config CFG`` for every (name, config, run dir), ``parallel`` at a
    time, with one progress bar per running job (read from its metrics.jsonl); logs in the run dirs."""
    from tqdm import tqdm

    pending, running, walls = list(jobs), {}, {}
    free_slots = list(range(parallel))
    while pending or running:
        while pending and free_slots:
            name, cfg_path, run_dir = pending.pop(0)
            slot = free_slots.pop(0)
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            log = open(run_dir / "train.log", "w")
            proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg_path)],
                                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            bar = tqdm(total=steps, desc=f"{name:>12}", position=slot, unit="step", leave=False, dynamic_ncols=True)
            running[name] = (proc, log, bar, slot, run_dir, time.time())
        time.sleep(1.0)
        for name, (proc, log, bar, slot, run_dir, start) in list(running.items()):
            records = read_metrics(run_dir)
            done = max((r["step"] for r in records if "loss" in r), default=0)
            bar.update(done - bar.n)
            evals = [r for r in records if "eval/per" in r]
            if evals:
                bar.set_postfix(val_per=f"{evals[-1]['eval/per']:.1f}")
            if proc.poll() is None:
                continue
            bar.close()
            log.close()
            del running[name]
            free_slots.append(slot)
            if proc.returncode != 0:
                for other in running.values():
                    other[0].terminate()
                raise RuntimeError(f"the {name} run failed ({proc.returncode}); see {run_dir / 'train.log'}")
            walls[name] = time.time() - start
            tqdm.write(f"   {name}: done in {walls[name]:.0f} s, validation PER {evals[-1]['eval/per']:.1f}")
    return walls


def plot(groups: dict, labels: dict, output: Path) -> Path:
    """Training loss, validation PER and sharpness against the step; one colour per method, one
    line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import smooth

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (key, run_dirs) in enumerate(groups.items()):
        for j, run_dir in enumerate(run_dirs):
            records = read_metrics(run_dir)
            train = [r for r in records if "loss" in r and not r.get("skipped")]
            label = labels[key] if j == 0 else None
            window = max(1, len(train) // 25)
            axes[0].plot([r["step"] for r in train], smooth([r["loss"] for r in train], window), color=f"C{i}",
                         alpha=0.8, label=label)
            points = [(r["step"], r["eval/per"]) for r in records if "eval/per" in r]
            axes[1].plot(*zip(*points), marker="o", color=f"C{i}", alpha=0.8, label=label)
            sharp = [r for r in train if "sharpness" in r]
            if sharp:
                axes[2].plot([r["step"] for r in sharp], smooth([r["sharpness"] for r in sharp], window),
                             color=f"C{i}", alpha=0.8, label=label)
    axes[0].set(xlabel="step", ylabel="training loss (smoothed)", title="Training loss")
    starts = [p[1] for run_dirs in groups.values() for d in run_dirs
              for p in [(r["step"], r["eval/per"]) for r in read_metrics(d) if "eval/per" in r][:1]]
    axes[1].set(xlabel="step", ylabel="PER % (lower is better)", title="Validation phoneme error rate")
    if starts and max(starts) > 100:     # the untrained format gives PER > 100: keep the curves readable
        axes[1].set_ylim(0, 100)
        axes[1].set_title(f"Validation phoneme error rate (step 0: {max(starts):.0f}, off the scale)")
    axes[2].set(xlabel="step", ylabel="L(w + e) − L(w) (smoothed)",
                title="Sharpness along each method's own e (AdamW: none)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def verdict(per: dict, labels: dict) -> str:
    """One sentence on what the table shows, from the paired differences over seeds."""
    from .study.stats import paired, summary

    def diff(a: str, b: str) -> str:
        d = paired(per[a], per[b]) if len(per[a]) > 1 else summary([per[a][0] - per[b][0]])
        spread = "" if d["n"] < 2 else f" ± {d['half_width']:.1f} (95 % CI, {d['n']} seeds)"
        return f"{labels[a]} − {labels[b]} = {d['mean']:+.1f} PER{spread}"

    parts = [diff(k, "adamw") for k in per if k != "adamw"]
    if "fsam" in per and "sam" in per:
        parts.append(diff("fsam", "sam"))
    return ("What this shows: " + "; ".join(parts) + ". A difference whose interval contains 0 is not shown "
            "by this demo; see docs/results.md for the 5-seed study at two training-set sizes.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train-examples", type=int, default=300, help="the limited-data setting")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate (1e-3 was chosen on the validation split, docs/results.md)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--evals", type=int, default=5, help="validation evaluations per run (plus one at step 0)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one process each)")
    parser.add_argument("--out", type=Path, default=REPO / ".demo")
    parser.add_argument("--model", type=Path, default=None,
                        help="start from this model directory instead of the pretrained miniature")
    known = {key: (key, label, fsam) for key, label, fsam in RUNS + EXTRA_RUNS}
    parser.add_argument("--runs", nargs="+", choices=list(known), default=[key for key, _, _ in RUNS],
                        help="which runs, in order (adamw first: step times are reported relative to it)")
    args = parser.parse_args(argv)
    if args.runs[0] != "adamw":
        parser.error("--runs: start with adamw (step times are reported relative to it)")
    from .seq2seq.pretrain import CACHE, RESERVED_WORDS, pretrain

    if args.train_examples > RESERVED_WORDS:
        parser.error(f"--train-examples: at most {RESERVED_WORDS} (the words kept out of pretraining)")
    runs = [known[key] for key in args.runs]
    labels = {key: label for key, label, _ in runs}
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model_dir = args.model or args.out / CACHE.name
    if args.model is None:
        if not (model_dir / "config.json").is_file():
            print(f"Pretraining the miniature T5 once (cached in {model_dir}; a few CPU minutes):", flush=True)
        model_dir = pretrain(model_dir)
        info = json.loads((model_dir / "fsam_pretrain.json").read_text())
        start_text = (f"pretrained miniature T5 ({info['parameters']:,} parameters, span corruption + prefix-LM on "
                      f"{info['corpus']})")
    else:
        start_text = str(model_dir)
    print(f"fsam-dist demo: {start_text} fine-tuned on {args.train_examples} CMUdict words (grapheme → phoneme), "
          f"{args.steps} steps, {args.seeds} seed(s), {args.parallel} runs at a time, CPU\n", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    jobs, groups = [], {key: [] for key, _, _ in runs}
    for seed in range(args.seeds):
        for key, label, fsam in runs:
            name = f"{key}-s{seed}"
            run_dir = args.out / "runs" / name
            cfg_path = args.out / f"{name}.yaml"
            cfg_path.write_text(yaml.safe_dump(config(model_dir, run_dir, fsam, args.steps, args.train_examples,
                                                      seed, args.evals, args.lr), allow_unicode=True))
            print(f"   {name}: python launch/train.py --config {cfg_path}", flush=True)
            jobs.append((name, cfg_path, run_dir))
            groups[key].append(run_dir)
    try:
        walls = run_all(jobs, args.parallel, args.steps, env)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    results = {key: [summarise(d) for d in dirs] for key, dirs in groups.items()}
    png = plot(groups, labels, args.out / "demo.png")
    base = statistics.mean(r["step_time"] for r in results["adamw"])

    def pm(values: list[float], digits: int = 1) -> str:
        spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.{digits}f}{spread}"

    print(f"\n| run | validation PER ↓ (start {results['adamw'][0]['start_per']:.1f}) | best of the evaluations | "
          f"exact match ↑ | final train loss | wall time per run | step time vs AdamW |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, label, _ in runs:
        rs = results[key]
        wall = statistics.mean(walls[f"{key}-s{s}"] for s in range(args.seeds))
        print(f"| {label} | {pm([r['per'] for r in rs])} | {pm([r['best_per'] for r in rs])} | "
              f"{pm([r['exact'] for r in rs])} | "
              f"{pm([r['loss'] for r in rs], 3)} | {wall:.0f} s | "
              f"{statistics.mean(r['step_time'] for r in rs) / base:.2f}× |")
    print(f"\nmean ± standard deviation over {args.seeds} seed(s), 200 validation words, at the final step "
          f"(and the best of the {args.evals} evaluations).")
    print(verdict({key: [r["per"] for r in rs] for key, rs in results.items()}, labels))
    print(f"plot (training loss, validation PER, sharpness): {png}; total {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
