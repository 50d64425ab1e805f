"""DDP (2 real gloo processes) gives the single-process answer; non-finite steps skip everywhere."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from fsam_dist.core import FSAM
from fsam_dist.shards.local import LocalBackend
from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
from fsam_dist.train.step import train_step

from .helpers import run_distributed, split_batch, state, synthetic_batch, tiny_t5
from .parity import assert_parity

STEPS, GLOBAL_BATCH, LR = 12, 8, 1e-2
FSAM_KWARGS = dict(rho=0.05, keep_ratio=0.1, mask_interval=5)


class PoisonBackend(LocalBackend):
    """Puts a NaN into this rank's (already all-reduced) gradient at chosen (step, pass)."""

    poison_at: set = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step, self.passes = 0, 0

    def forward_backward(self, loss_fn, micro_batch, scale, last):
        loss = super().forward_backward(loss_fn, micro_batch, scale, last)
        if last:
            self.passes += 1
            if (self.step, self.passes) in self.poison_at:
                next(p for _, p in self.trainable).grad.view(-1)[0] = float("nan")
        return loss


def train(rank: int, world: int, micro: int, poison_rank: int = -1, poison_at=()) -> dict:
    model = tiny_t5(seed=0)
    wrapped = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    backend = PoisonBackend(wrapped, opt)
    backend.poison_at = set(poison_at) if rank == poison_rank else set()
    fsam = FSAM(**FSAM_KWARGS)
    history, skipped, first_mask = [], [], None
    for step in range(STEPS):
        backend.step, backend.passes = step, 0
        mine = split_batch(synthetic_batch(GLOBAL_BATCH, seed=100 + step), world, rank)
        micro_batches = [split_batch(mine, micro, i) for i in range(micro)]
        before = state(model)
        stats = train_step(backend, seq2seq_loss_sum, micro_batches, step=step,
                           count_targets=count_target_tokens, fsam=fsam)
        skipped.append(stats["skipped"])
        if stats["skipped"]:
            history.append(all(torch.equal(p, before[n]) for n, p in model.named_parameters()))
        if first_mask is None:
            first_mask = {k: m.clone() for k, m in fsam.masks.items()}
    return {"weights": state(model), "skipped": skipped, "unchanged_on_skip": history, "mask": first_mask}


POISON = [(2, 1), (5, 2)]
"""(step, pass) where rank 1's gradient gets a NaN after DDP's all-reduce: pass 1 at step 2, pass 2 at step 5."""


def _references(rank: int, world: int) -> dict:
    """The same training in one process with the whole global batch: clean, and with POISON's
    steps poisoned there too (one spawned process for both)."""
    return {"clean": train(rank, world, 1), "poison": train(rank, world, 1, 0, POISON)}


@pytest.fixture(scope="module")
def references() -> dict:
    return run_distributed(_references, 1)[0]


def assert_same_weights(got: dict, expected: dict, label: str) -> float:
    """The parity rule (tests/parity.py) against the common start tiny_t5(seed=0)."""
    return assert_parity(got, expected, state(tiny_t5(seed=0)), LR * STEPS, label)


def test_ddp_two_ranks_with_accumulation_equals_one_process(references):
    """2 ranks × 2 micro-batches == one process with one batch, over 12 steps with 3 mask refreshes."""
    expected = references["clean"]
    ranks = run_distributed(train, 2, 2)
    for rank, r in enumerate(ranks):
        assert_same_weights(r["weights"], expected["weights"], f"DDP rank {rank}")
        assert r["mask"].keys() == expected["mask"].keys()
        assert all(torch.equal(r["mask"][k], expected["mask"][k]) for k in expected["mask"])
    # the run really trained
    start = state(tiny_t5(seed=0))
    assert any(not torch.allclose(start[n], w) for n, w in expected["weights"].items())


def test_nonfinite_gradient_on_one_rank_skips_the_step_on_all_ranks(references):
    """NaN in rank 1's gradient only (after DDP's all-reduce): pass 1 at step 2, pass 2 at step 5."""
    ranks = run_distributed(train, 2, 1, 1, POISON, timeout=180)
    for r in ranks:
        assert [i for i, s in enumerate(r["skipped"]) if s] == [2, 5]
        assert r["unchanged_on_skip"] == [True, True]
    assert all(torch.equal(w, ranks[1]["weights"][n]) for n, w in ranks[0]["weights"].items())
    # the same steps skipped on one process gives the same weights
    expected = references["poison"]
    assert expected["skipped"] == ranks[0]["skipped"]
    assert_same_weights(ranks[0]["weights"], expected["weights"], "DDP with skipped steps")


ANOTHER_CPU = """
import sys, torch
from tests.test_ddp import train
from tests.helpers import run_distributed
if __name__ == "__main__":
    ranks = run_distributed(train, 2, 2)
    torch.save({"capability": torch.backends.cpu.get_cpu_capability(), "weights": ranks[0]["weights"]}, sys.argv[1])
"""


def test_parity_holds_under_another_cpu_capability(tmp_path, references):
    """The 2-rank run with other CPU kernels (``ATEN_CPU_CAPABILITY``: other summation orders, as
    on another machine) against the reference computed here: still inside the parity rule."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from .helpers import unavailable

    here = torch.backends.cpu.get_cpu_capability()
    other = "default" if here != "DEFAULT" else "avx2"
    out = tmp_path / "run.pt"
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "ATEN_CPU_CAPABILITY": other, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", ANOTHER_CPU, str(out)], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    run = torch.load(out, weights_only=False)
    if run["capability"] == here:
        unavailable(f"this CPU offers no kernel set other than {here}")
    assert run["capability"] == other.upper(), run["capability"]
    assert_same_weights(run["weights"], references["clean"]["weights"], f"DDP under {run['capability']} vs {here}")
