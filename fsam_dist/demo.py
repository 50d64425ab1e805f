"""``make demo``: AdamW vs SAM vs FSAM on a limited-data grapheme-to-phoneme task, 2 processes, CPU.

1. Builds a small randomly initialised T5 (and a SentencePiece tokenizer trained on the data) —
   no pretrained weights exist offline, so the numbers are not the paper's.
2. Fine-tunes it three times with ``torchrun --nproc_per_node 2 launch/train.py`` (DDP, gloo):
   AdamW alone, SAM (keep_ratio 1, nothing excluded) and FSAM (keep_ratio 0.1), same data order,
   seed and steps.
3. Prints the validation phoneme error rate (PER, lower is better), exact match, wall time and
   the step-time ratio against AdamW, and writes a comparison PNG.

    python -m fsam_dist.demo [--steps 300] [--train-examples 2000] [--out .demo]
                             [--runs adamw sam fsam fsam-k2 fsam-k4 fsam-k4-looksam]
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


def build_model(out: Path, train_examples: int) -> Path:
    from .seq2seq.data import load_examples
    from .seq2seq.init_model import init_model

    model_dir = out / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    examples, _ = load_examples("builtin:cmudict", "train", max_examples=train_examples)
    texts = [ex["source"] for ex in examples] + [ex["target"] for ex in examples]
    init_model("t5", model_dir, texts, vocab_size=256, d_model=64, layers=2, heads=4, d_ff=128, dropout=0.1, seed=0)
    return model_dir


def config(model_dir: Path, run_dir: Path, fsam: dict, steps: int, train_examples: int) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": "builtin:cmudict", "max_train_examples": train_examples, "max_eval_examples": 400,
                 "max_source_length": 32, "max_target_length": 32},
        "optim": {"lr": 3e-3, "weight_decay": 0.01, "scheduler": "linear", "warmup_steps": steps // 10,
                  "clip_grad_norm": 1.0},
        "fsam": {"rho": 0.05, "mask_interval": 50, **fsam},
        "backend": {"name": "ddp"},
        "train": {"max_steps": steps, "micro_batch_size": 16, "output_dir": str(run_dir), "eval_every": steps // 2,
                  "log_every": 25, "seed": 0, "resume": "none"},
        "eval": {"batch_size": 64, "max_new_tokens": 32},
    }


def summarise(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    final_eval = [r for r in records if "eval/per" in r][-1]
    return {"per": final_eval["eval/per"], "exact": final_eval["eval/exact_match"],
            # the mean, not the median: with fsam.interval most steps are the cheap ones
            "step_time": statistics.mean(r["step_time"] for r in train[len(train) // 10:]),
            "loss": statistics.mean(r["loss"] for r in train[-20:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-examples", type=int, default=2000, help="the limited-data setting")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / ".demo")
    known = {key: (key, label, fsam) for key, label, fsam in RUNS + EXTRA_RUNS}
    parser.add_argument("--runs", nargs="+", choices=list(known), default=[key for key, _, _ in RUNS],
                        help="which runs, in order (adamw first: step times are relative to it)")
    args = parser.parse_args(argv)
    if args.runs[0] != "adamw":
        parser.error("--runs: start with adamw (step times are reported relative to it)")
    runs = [known[key] for key in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"fsam-dist demo: T5 (random init, d_model 64) on builtin:cmudict, {args.train_examples} training "
          f"examples, {args.steps} steps, {args.nproc} processes (DDP, CPU)\n", flush=True)
    model_dir = build_model(args.out, args.train_examples)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for key, label, fsam in runs:
        run_dir = args.out / key
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg_path = args.out / f"{key}.yaml"
        cfg_path.write_text(yaml.safe_dump(config(model_dir, run_dir, fsam, args.steps, args.train_examples)))
        print(f"== {label}: {torchrun} --standalone --nproc_per_node {args.nproc} launch/train.py --config {cfg_path}",
              flush=True)
        start = time.time()
        proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(args.nproc),
                               str(REPO / "launch" / "train.py"), "--config", str(cfg_path)], cwd=REPO, env=env)
        if proc.returncode != 0:
            print(f"error: the {label} run failed ({proc.returncode})", file=sys.stderr)
            return proc.returncode
        results[key] = {**summarise(run_dir), "wall": time.time() - start}

    from .plot import plot

    png = plot([args.out / key for key, _, _ in runs], args.out / "compare.png", metric="eval/per",
               labels=[label for _, label, _ in runs])
    base = results["adamw"]["step_time"]
    print("\n| run | validation PER ↓ | exact match ↑ | final train loss | wall time | step time vs AdamW |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, label, _ in runs:
        r = results[key]
        print(f"| {label} | {r['per']:.1f} | {r['exact']:.1f} | {r['loss']:.3f} | {r['wall']:.0f} s | "
              f"{r['step_time'] / base:.2f}× |")
    print(f"\ncomparison plot: {png}")
    print("PER = phoneme error rate on 400 validation words (edit distance / reference phonemes, %).\n"
          "The model is tiny and randomly initialised and trains for a few minutes on CPU: the numbers show the\n"
          "pipeline and the cost of the two passes, not the paper's results. SAM/FSAM take two forward/backward\n"
          "passes per step, so their step time is about 2× AdamW's.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
