"""The library against an independent, naive FSAM (tests/reference_fsam.py), on every backend family.

The other parity tests compare a distributed run with ``LocalBackend`` + the same
``fsam_dist.core``; a bug shared by the core and that reference would pass them all. Here the
reference imports nothing from ``fsam_dist``: DDP, ZeRO-2, ZeRO-3 and FSDP2 on 2 real gloo ranks
(one spawned run for all of them) must end where the naive FSAM ends, by the parity rule of
tests/parity.py -- with κ < 1, a mask refresh inside the run, norm 'full' and 'masked',
excluded parameters perturbed densely, clipping, and ASAM's adaptive perturbation. Controls show
the rule would notice a missing perturbation, a dense (κ = 1) mask and the other norm.

Also: one view larger than a chunk (2^20 entries) with ties across the chunk boundary, core
against naive; and the distributed select (packed sink) at world 3 on > 3·2^20 entries per rank
with ties straddling a chunk boundary, against ``torch.sort(stable=True)`` of the concatenation.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from .helpers import run_distributed, split_batch, state, synthetic_batch, tiny_t5
from .parity import assert_not_parity, assert_parity
from .reference_fsam import NaiveFSAM, first_k, perturbation, topk_mask

STEPS, GLOBAL_BATCH, MICRO, LR = 10, 12, 2, 1e-2
KEEP, RHO, MASK_INTERVAL = 0.1, 0.05, 4          # refreshes at steps 0, 4, 8


class Case(NamedTuple):
    backend: str          # ddp, zero2, zero3, fsdp2
    norm: str = "full"
    adaptive: bool = False
    clip: float = 0.0
    rho: float = RHO


CASES = {
    "ddp": Case("ddp", norm="full", clip=1.0),
    "zero2": Case("zero2", norm="masked"),
    "zero3": Case("zero3", norm="full", adaptive=True),
    "fsdp2": Case("fsdp2", norm="masked", clip=1.0),
}


def global_batch(step: int) -> dict:
    return synthetic_batch(GLOBAL_BATCH, seed=2000 + step)


def micro_batches(step: int, world: int, rank: int) -> list[dict]:
    mine = split_batch(global_batch(step), world, rank)
    return [split_batch(mine, MICRO, i) for i in range(MICRO)]


def schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.1 * s))


def naive_run(case: Case, keep_ratio: float = KEEP, **change) -> dict:
    """The naive reference on one process, whole global batch per step (``change``: Case fields)."""
    settings = case._replace(**change)
    model = tiny_t5(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    fsam = NaiveFSAM(model, optimizer, schedule(optimizer), rho=settings.rho, keep_ratio=keep_ratio,
                     mask_interval=MASK_INTERVAL, norm=settings.norm, excluded="dense", adaptive=settings.adaptive,
                     clip=settings.clip)
    stats = [fsam.step(step, global_batch(step)) for step in range(STEPS)]
    assert fsam.refreshed == [0, 4, 8]
    return {"weights": state(model), "stats": stats}


# ---- the library, on 2 ranks -------------------------------------------------------------------

def build(case: Case, world: int):
    from torch.nn.parallel import DistributedDataParallel

    from fsam_dist.shards.local import LocalBackend

    model = tiny_t5(seed=0)
    if case.backend == "ddp":
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        return LocalBackend(DistributedDataParallel(model), optimizer, schedule(optimizer))
    if case.backend.startswith("zero"):
        from fsam_dist.train.deepspeed_setup import build_deepspeed

        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // (world * MICRO),
                  "gradient_accumulation_steps": MICRO, "gradient_clipping": case.clip,
                  "zero_optimization": {"stage": int(case.backend[-1])}, "steps_per_print": 10 ** 9}
        return build_deepspeed(model, config, optimizer, schedule(optimizer))
    from fsam_dist.train.fsdp_wrap import wrap_fsdp

    return wrap_fsdp(model, version=2, scheduler_factory=schedule,
                       optimizer_factory=lambda params: torch.optim.AdamW(
                           [p for _, p in params.named_parameters()], lr=LR))


def run_library(rank: int, world: int, cases: dict) -> dict:
    from fsam_dist.core import FSAM
    from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build
    from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
    from fsam_dist.train.step import train_step

    if any(c.backend.startswith("zero") for c in cases.values()):
        import deepspeed

        skip_cpu_shm_build()
        deepspeed.init_distributed(dist_backend="gloo")   # reuses run_distributed's process group
    out = {}
    for name, case in cases.items():
        backend = build(case, world)
        fsam = FSAM(rho=case.rho, keep_ratio=KEEP, mask_interval=MASK_INTERVAL, norm=case.norm,
                    excluded_mode="dense", adaptive=case.adaptive)
        stats = [train_step(backend, seq2seq_loss_sum, micro_batches(step, world, rank), step=step,
                            count_targets=count_target_tokens, fsam=fsam, clip_grad_norm=case.clip)
                 for step in range(STEPS)]
        out[name] = {"weights": backend.full_state_dict(), "stats": stats}
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(run_library, 2, CASES, timeout=600)


def start_weights() -> dict:
    return state(tiny_t5(seed=0))


@pytest.mark.parametrize("name", list(CASES))
def test_backend_equals_the_naive_reference(two_ranks, name):
    case = CASES[name]
    got = two_ranks[0][name]["weights"]
    assert got is not None and all(r[name]["weights"] is None for r in two_ranks[1:])
    ref = naive_run(case)
    worst = assert_parity(got, ref["weights"], start_weights(), LR * STEPS, f"{name} vs naive FSAM")
    for s, (a, b) in enumerate(zip(two_ranks[0][name]["stats"], ref["stats"])):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (name, s)
        assert a["perturbed_loss"] == pytest.approx(b["perturbed_loss"], rel=1e-5), (name, s)
    if case.clip:
        norms = [s["grad_norm"] for s in ref["stats"]]
        assert any(n > case.clip for n in norms), f"{name}: clipping never active {norms}"
    print(f"RESULT {name}: worst relative error against the naive reference {worst:.2e}")


@pytest.mark.parametrize("name,change", [
    ("zero2", {"rho": 0.0}),                     # no perturbation at all
    ("zero2", {"norm": "full"}),                 # the other norm
    ("zero3", {"adaptive": False}),              # SAM's direction instead of ASAM's
    ("ddp", {"keep_ratio": 1.0}),                # a dense mask (SAM)
])
def test_the_rule_notices_a_different_fsam(two_ranks, name, change):
    """Controls: each setting that the parity tests claim to check changes the end weights by more
    than the rule allows."""
    got = two_ranks[0][name]["weights"]
    ref = naive_run(CASES[name], **change)
    assert_not_parity(got, ref["weights"], start_weights(), LR * STEPS, f"{name} vs naive FSAM with {change}")


# ---- views larger than a chunk -----------------------------------------------------------------

CHUNK = 1 << 20          # the core's chunk (fsam_dist.core.masks.CHUNK), restated: this file is independent


def chunk_straddling_problem(seed: int, numel: int, block: int, chunk: int = CHUNK) -> torch.Tensor:
    """Continuous values in [0, 0.5) with a block of ``2 · block`` entries tied at 1.0 (the top)
    centred on the chunk boundary ``chunk``: whoever selects fewer than all of them must break the
    ties by position across the boundary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(numel, generator=g) * 0.5
    x[torch.rand(numel, generator=g) < 0.05] = 0.0        # exact zeros, as unused rows have
    x[chunk - block:chunk + block] = 1.0
    return x


@pytest.mark.parametrize("norm,adaptive", [("full", False), ("masked", True)])
def test_view_larger_than_a_chunk_core_equals_naive(norm, adaptive):
    """FSAM.ascend on a 1.25M-entry view (two chunks) whose k-th score is a tie that straddles the
    chunk boundary, plus an excluded view perturbed densely and a small eligible one: the mask is
    the naive stable-sort mask exactly, e the naive e, and descend restores every bit."""
    from fsam_dist.core import FSAM, ShardView

    big, small, excluded = CHUNK + 3 * (1 << 16), 3000, 5000
    block = 100_000
    numels = {"big.weight": big, "excluded.bias": excluded, "small.weight": small}
    g = torch.Generator().manual_seed(1)
    sign = lambda n: torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)   # noqa: E731
    grads = {"big.weight": chunk_straddling_problem(2, big, block).sqrt() * sign(big),
             "excluded.bias": torch.randn(excluded, generator=g) * 0.1,
             "small.weight": torch.rand(small, generator=g) * 0.5 * sign(small)}
    # small weights: e is then many ulps of w, so w + e − w recovers e to ~1e-6 relative
    weights = {n: torch.randn(k, generator=g) * 1e-3 for n, k in numels.items()}
    eligible = {"big.weight": True, "excluded.bias": False, "small.weight": True}
    k = round(KEEP * (big + small))
    assert 2 * block > k - 0 > block and CHUNK - block + k > CHUNK, "the cut must fall past the boundary"

    original = {n: w.clone() for n, w in weights.items()}
    views, position = [], 0
    for name, n in numels.items():
        views.append(ShardView(name, weights[name], grads[name], position, eligible[name]))
        position += n
    fsam = FSAM(rho=RHO, keep_ratio=KEEP, mask_interval=1, norm=norm, excluded_mode="dense", adaptive=adaptive)
    fsam.ascend(views, step=0)
    core_masks = {name: m for (name, _), m in fsam.masks.items()}

    names = list(numels)
    masks = iter(topk_mask([grads[n] ** 2 for n in names if eligible[n]], KEEP))
    naive_masks = {n: next(masks) if eligible[n] else None for n in names}
    e = perturbation([original[n] for n in names], [grads[n] for n in names], [naive_masks[n] for n in names],
                     rho=RHO, norm=norm, excluded="dense", adaptive=adaptive)
    tied_chosen = naive_masks["big.weight"][CHUNK - block:CHUNK + block]
    assert 0 < int(tied_chosen[block:].sum()) < block, "selected ties must straddle the boundary"
    for name in names:
        if eligible[name]:
            assert torch.equal(core_masks[name], naive_masks[name]), f"{name}: masks differ"
        # w + e is rounded to one ulp of w: that, no more, is the error in the e read back
        ulp = torch.finfo(torch.float32).eps * float(original[name].abs().max())
        torch.testing.assert_close(weights[name] - original[name], e[names.index(name)].float(),
                                   rtol=1e-5, atol=ulp, msg=lambda m, name=name: f"{name}: {m}")
    fsam.descend(views)
    assert all(torch.equal(weights[n], original[n]) for n in names)


SELECT_WORLD, SELECT_BLOCK = 3, 50_000
SELECT_A, SELECT_B = 3 * CHUNK + 4321, 777      # two pieces per rank: > 3·2^20 entries each


def select_pieces(rank: int) -> tuple[list[torch.Tensor], list[int]]:
    """Rank ``rank``'s scores and their global positions: the big pieces of all ranks first, then
    the small ones (so positions interleave across ranks)."""
    big = chunk_straddling_problem(100 + rank, SELECT_A, SELECT_BLOCK)
    small = torch.rand(SELECT_B, generator=torch.Generator().manual_seed(200 + rank)) * 0.5
    return [big, small], [rank * SELECT_A, SELECT_WORLD * SELECT_A + rank * SELECT_B]


SELECT_K = 2 * SELECT_BLOCK + SELECT_BLOCK + 1000
"""All of rank 0's tied block, and rank 1's up to 1000 entries past its chunk boundary."""


def run_select(rank: int, world: int) -> list[torch.Tensor]:
    from fsam_dist.core.select import topk_masks

    scores, positions = select_pieces(rank)
    masks, k, total = topk_masks(scores, positions, SELECT_K)
    assert (k, total) == (SELECT_K, world * (SELECT_A + SELECT_B))
    return [m.to_bool() for m in masks]


def test_distributed_select_packed_across_chunk_boundaries_equals_stable_sort():
    got = run_distributed(run_select, SELECT_WORLD, timeout=300)
    pieces = [select_pieces(r) for r in range(SELECT_WORLD)]
    flat_scores = [None] * (2 * SELECT_WORLD)
    for r, (scores, _) in enumerate(pieces):
        flat_scores[r], flat_scores[SELECT_WORLD + r] = scores      # global-position order
    want = first_k(flat_scores, SELECT_K)
    for r in range(SELECT_WORLD):
        for i, mine in enumerate(got[r]):
            ref = want[r] if i == 0 else want[SELECT_WORLD + r]
            assert torch.equal(mine, ref), f"rank {r} piece {i}: {int((mine != ref).sum())} entries differ"
    # the cut really falls inside rank 1's ties, past its chunk boundary
    tied = got[1][0][CHUNK - SELECT_BLOCK:CHUNK + SELECT_BLOCK]
    assert int(tied[:SELECT_BLOCK].sum()) == SELECT_BLOCK and int(tied[SELECT_BLOCK:].sum()) == 1000
    assert int(got[2][0][CHUNK - SELECT_BLOCK:CHUNK + SELECT_BLOCK].sum()) == 0

