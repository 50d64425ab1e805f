"""Session fixtures: tiny models and data made here (nothing is downloaded), and launch helpers."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def reversal_examples(n: int, seed: int) -> list[dict]:
    """'reverse: b a d' → 'd a b' over a small alphabet."""
    rng = random.Random(seed)
    letters = "abcdefghij"
    out = []
    for _ in range(n):
        word = [rng.choice(letters) for _ in range(rng.randint(2, 5))]
        out.append({"source": " ".join(word), "target": " ".join(reversed(word))})
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    files = {}
    for split, n, seed in [("train", 96, 0), ("validation", 24, 1)]:
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(ex) + "\n" for ex in reversal_examples(n, seed)))
        files[split] = str(path)
    return files


def _init(arch: str, out: Path, data: dict) -> str:
    from fsam_dist.seq2seq.init_model import init_model

    texts = [line for ex in map(json.loads, open(data["train"])) for line in (ex["source"], ex["target"])]
    # gated-gelu and no dropout: smooth enough that 1e-7 weight noise stays 1e-7 (parity tests)
    init_model(arch, out, texts, vocab_size=64, d_model=16, layers=2, heads=2, d_ff=32, dropout=0.0, seed=0)
    return str(out)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, tiny_data) -> str:
    return _init("t5", tmp_path_factory.mktemp("t5") / "model", tiny_data)


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory, tiny_data) -> str:
    return _init("bart", tmp_path_factory.mktemp("bart") / "model", tiny_data)
