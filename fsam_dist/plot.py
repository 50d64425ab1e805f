"""``fsam-plot RUN_DIR [RUN_DIR ...] [-o compare.png]``: training loss and the validation metric
of several runs against the step, in one PNG (reads each run's metrics.jsonl)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run directory?)")
    train, evals = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            (evals if any(k.startswith("eval/") for k in record) else train).append(record)
    return train, evals


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(run_dirs: list[Path], output: Path, metric: str | None = None, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in run_dirs]
    keys = sorted({k for _, evals in runs for e in evals for k in e if k.startswith("eval/")})
    if metric is None:
        metric = "eval/chrf" if "eval/chrf" in keys else (keys[0] if keys else None)
    elif metric not in keys and f"eval/{metric}" in keys:
        metric = f"eval/{metric}"
    elif metric not in keys:
        raise ValueError(f"--metric {metric!r}: no run has it; the runs have "
                         f"{', '.join(keys) if keys else 'no evaluation records'}")
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(11 if metric else 6, 4), squeeze=False)
    for i, (run_dir, (train, evals)) in enumerate(zip(run_dirs, runs)):
        label = labels[i] if labels else Path(run_dir).name
        steps = [r["step"] for r in train if not r.get("skipped")]
        losses = [r["loss"] for r in train if not r.get("skipped")]
        axes[0][0].plot(steps, smooth(losses, max(1, len(losses) // 25)), label=label)
        if metric:
            points = [(e["step"], e[metric]) for e in evals if metric in e]
            if points:
                axes[0][1].plot(*zip(*points), marker="o", label=label)
    axes[0][0].set(xlabel="step", ylabel="training loss (smoothed)", title="Training loss")
    axes[0][0].legend()
    if metric:
        axes[0][1].set(xlabel="step", ylabel=metric.removeprefix("eval/"), title=f"Validation {metric[5:]}")
        axes[0][1].legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fsam-plot", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (train.output_dir)")
    parser.add_argument("-o", "--output", type=Path, default=Path("compare.png"))
    parser.add_argument("--metric", default=None, help="eval metric to plot, e.g. eval/chrf (default: chrF)")
    parser.add_argument("--labels", nargs="*", default=None, help="one legend label per run")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error("--labels needs one label per run")
    try:
        path = plot(args.runs, args.output, args.metric, args.labels)
    except (FileNotFoundError, json.JSONDecodeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
