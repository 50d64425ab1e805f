"""global_topk_mask equals a stable descending sort of all scores, on 1–4 real processes."""

from __future__ import annotations

import random

import pytest
import torch

from fsam_dist.core import comm
from fsam_dist.core.select import global_topk_mask

from .helpers import run_distributed


def reference_mask(scores: list[torch.Tensor], positions: list[int], k: int) -> list[torch.Tensor]:
    """First k of a stable descending sort of the concatenation in global-position order."""
    values = torch.cat([s.reshape(-1).float() for s in scores])
    where = torch.cat([p + torch.arange(s.numel()) for s, p in zip(scores, positions)])
    order = torch.argsort(where)
    values, where = values[order], where[order]
    chosen = set(where[torch.sort(values, descending=True, stable=True).indices[:k]].tolist())
    return [torch.tensor([p + j in chosen for j in range(s.numel())], dtype=torch.bool).view(s.shape)
            for s, p in zip(scores, positions)]


def make_case(seed: int, world: int):
    """A global problem (pieces with positions) and how its pieces are dealt to ranks."""
    rng = random.Random(seed)
    kind = ["random", "all_equal", "many_zeros", "few_values", "ties_at_threshold", "tiny_values"][seed % 6]
    pieces, position = [], 0
    for _ in range(rng.randint(1, 7)):
        n = rng.choice([0, 1, 3, 17, 64, 200])
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        if kind == "random":
            s = torch.rand(n, generator=g)
        elif kind == "all_equal":
            s = torch.full((n,), 0.25)
        elif kind == "many_zeros":
            s = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.2)
        elif kind == "few_values":
            s = torch.randint(0, 3, (n,), generator=g).float()
        elif kind == "ties_at_threshold":
            s = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(1.0), torch.rand(n, generator=g))
        else:   # subnormals and values sharing the top bits: exercises every radix round
            s = torch.rand(n, generator=g) * 1e-40 + torch.randint(0, 2, (n,), generator=g) * 1e-3
        if n and rng.random() < 0.3:
            s = s.reshape(-1, 1) if n % 2 else s.reshape(2, -1)
        if rng.random() < 0.2:
            s = s.to(torch.bfloat16)
        pieces.append((s, position))
        position += s.numel() + rng.choice([0, 0, 5])   # gaps in positions are allowed
    total = sum(s.numel() for s, _ in pieces)
    k = rng.choice([0, 1, total // 10, total // 2, total - 1, total, total + 3])
    owner = [rng.randrange(world) for _ in pieces]
    return pieces, max(k, 0), owner


def check_cases(rank: int, world: int, seeds: list[int]) -> list[bool]:
    results = []
    for seed in seeds:
        pieces, k, owner = make_case(seed, world)
        mine = [(s, p) for (s, p), o in zip(pieces, owner) if o == rank]
        got = global_topk_mask([s for s, _ in mine], [p for _, p in mine], k)
        expected = reference_mask([s for s, _ in pieces], [p for _, p in pieces], k)
        expected_mine = [e for e, o in zip(expected, owner) if o == rank]
        results.append(all(torch.equal(g, e) for g, e in zip(got, expected_mine)) and
                       all(g.shape == s.shape and g.dtype == torch.bool for g, (s, _) in zip(got, mine)))
    return results


def test_single_process_matches_stable_sort():
    assert all(check_cases(0, 1, list(range(120))))


def test_exactly_min_k_n_selected_and_edge_k():
    scores = [torch.zeros(5), torch.ones(3)]
    for k, expected in [(0, 0), (2, 2), (8, 8), (100, 8)]:
        masks = global_topk_mask(scores, [0, 5], k)
        assert sum(int(m.sum()) for m in masks) == expected
    assert global_topk_mask([], [], 3) == []


def test_negative_zero_counts_as_zero():
    masks = global_topk_mask([torch.tensor([-0.0, 0.0, -0.0])], [0], 2)
    assert masks[0].tolist() == [True, True, False]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_invalid_scores_raise(bad):
    with pytest.raises(ValueError, match="NaN, inf or negative"):
        global_topk_mask([torch.tensor([1.0, bad])], [0], 1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be"):
        global_topk_mask([torch.ones(2)], [0], -1)
    with pytest.raises(ValueError, match="positions"):
        global_topk_mask([torch.ones(2)], [0, 1], 1)
    with pytest.raises(ValueError, match="floating-point"):
        global_topk_mask([torch.ones(2, dtype=torch.int64)], [0], 1)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_matches_stable_sort(world):
    seeds = list(range(60))
    for rank_results in run_distributed(check_cases, world, seeds):
        failed = [s for s, ok in zip(seeds, rank_results) if not ok]
        assert not failed, f"world {world}: cases {failed} differ from the stable sort"


def invalid_on_rank1(rank: int, world: int) -> str:
    scores = [torch.tensor([float("nan") if rank == 1 else 1.0, 2.0])]
    try:
        global_topk_mask(scores, [2 * rank], 1)
    except ValueError as err:
        return str(err)
    return "no error"


def test_invalid_on_one_rank_raises_on_every_rank():
    messages = run_distributed(invalid_on_rank1, 2, timeout=60)
    assert all("NaN, inf or negative" in m for m in messages), messages


def count_collectives(rank: int, world: int, sizes: list[int]) -> list[tuple[int, int]]:
    """(number of all-reduces, total elements reduced) for each local problem size."""
    calls = []
    original = comm.dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    comm.dist.all_reduce = counting
    try:
        out = []
        for n in sizes:
            calls.clear()
            g = torch.Generator().manual_seed(n + rank)
            # Ties across ranks at the threshold force the position rounds too.
            scores = [torch.randint(0, 4, (n,), generator=g).float()]
            global_topk_mask(scores, [rank * n], n // 3)
            out.append((len(calls), sum(calls)))
        return out
    finally:
        comm.dist.all_reduce = original


def test_collective_count_does_not_grow_with_n():
    per_rank = run_distributed(count_collectives, 2, [1_000, 100_000, 1_000_000])
    for counts in per_rank:
        assert len(set(counts)) == 1, f"collectives vary with N: {counts}"
        number, elements = counts[0]
        assert number == 8 and elements <= 8 * 4096, counts
