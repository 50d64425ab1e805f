"""Helpers for tests that run launch/train.py through real launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent


def write_config(path: Path, model_dir: str, data: dict, output_dir: Path, **sections) -> Path:
    """A training YAML for the tiny task; ``sections`` = {"fsam": {...}, "train": {...}} overrides."""
    cfg = {
        "model": {"name_or_path": model_dir},
        "data": {"train_file": data["train"], "eval_file": data["validation"], "max_source_length": 16,
                 "max_target_length": 16, "shuffle": True},
        "optim": {"lr": 1e-2, "scheduler": "linear", "warmup_steps": 2, "clip_grad_norm": 0.0},
        "fsam": {"rho": 0.05, "keep_ratio": 0.1, "mask_interval": 4},
        "train": {"max_steps": 10, "micro_batch_size": 4, "grad_accum_steps": 1, "output_dir": str(output_dir),
                  "log_every": 5, "seed": 0},
        "eval": {"enabled": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher command from the repo root; the output is kept for the failure message."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{' '.join(result.args)} failed ({result.returncode}):\n" \
                                   f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def final_weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def assert_weights_close(got: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-6) -> float:
    """Max abs difference, after asserting every tensor is close."""
    import torch

    assert got.keys() == expected.keys(), (f"only in result: {sorted(got.keys() - expected.keys())}; "
                                           f"missing: {sorted(expected.keys() - got.keys())}")
    worst = 0.0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)
        worst = max(worst, float((got[name].double() - expected[name].double()).abs().max()))
    return worst
