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


def run_config(output_dir: Path) -> dict:
    """The resolved config a run wrote into its ``output_dir``."""
    import json

    return json.loads((Path(output_dir) / "config.json").read_text())


TIED = "shared.weight"
"""T5's embedding, which ``lm_head.weight`` and the ``embed_tokens`` may alias in a saved model."""


def assert_final_close(run: Path, reference: Path, label: str = "") -> float:
    """``run``'s final weights equal those of the run in ``reference`` by the parity rule
    (tests/parity.py), measured from the initial model the reference started from (its
    ``model.name_or_path``: the common w₀), with Σ lr_t ≤ peak lr × max_steps. Returns the worst
    relative error.
    A tensor only one side wrote must be a tied alias of ``shared.weight`` there (saving a tied
    embedding once or under every name is the same model)."""
    from safetensors.torch import load_file

    from .parity import assert_parity

    got, expected = final_weights(run), final_weights(reference)
    config = run_config(reference)
    start = load_file(str(Path(config["model"]["name_or_path"]) / "model.safetensors"))
    for name, side in [(n, expected) for n in expected.keys() - got.keys()] + \
                      [(n, got) for n in got.keys() - expected.keys()]:
        assert TIED in side and side[name].equal(side[TIED]), \
            f"{name} is in only one of {run}/final and the reference, and is not a tied embedding"
    common = sorted(expected.keys() & got.keys())
    start = {k: start[k] if k in start else start[TIED] for k in common}   # a tied alias starts as shared
    return assert_parity({k: got[k] for k in common}, {k: expected[k] for k in common}, start,
                         float(config["optim"]["lr"]) * int(config["train"]["max_steps"]), label or str(run))


def assert_final_identical(run: Path, reference: Path) -> None:
    """``run``'s final weights equal ``reference``'s bit for bit (resume continues the same sums)."""
    got, expected = final_weights(run), final_weights(reference)
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())
    differ = [k for k in expected if not got[k].equal(expected[k])]
    assert not differ, f"{run} differs from {reference} in {differ}"
