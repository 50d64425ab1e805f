"""The collectives FSAM adds do not grow with the model or the world size (issue 8).

Real gloo processes at world sizes 2, 4 and 8 train a tiny model (two widths, 12.7k and 149k
parameters) under DDP (replicated: the core reduces nothing over the shard group) and FSDP2
(sharded: norms and the top-k are real all-reduces), with
:class:`bench.collectives.CollectiveCounter` recording every ``torch.distributed`` collective of
each step. FSAM's own collectives (through ``fsam_dist.core.comm``) must be the same count and the
same bytes whatever the model and world size -- exact numbers, so that an extra collective or a
gather of scores fails here -- while the backend's own traffic (FSDP2's all-gathers and
reduce-scatters, seen by the same counter) grows with the model, which shows the counter sees
size-dependent traffic when there is some.
"""

from __future__ import annotations

import pytest

from .helpers import free_port, run_distributed

WIDTHS = (32, 128)
WORLDS = (2, 4, 8)
BACKENDS = ("ddp", "fsdp2")

TOPK_BYTES = (2050 + 16 + 256 + 256) * 8   # the select's 4 all-reduces of int64 histograms (no ties)
EXPECTED_ADDED = {
    # step kind → {backend: {label: (count, bytes)}} FSAM adds on top of a plain AdamW step
    "fsam_refresh": {"fsdp2": {"topk": (4, TOPK_BYTES), "norms": (1, 24), "step_flags": (1, 16)},
                     "ddp": {"step_flags": (1, 16)}},
    "fsam_refresh_jaccard": {"fsdp2": {"topk": (4, TOPK_BYTES), "norms": (1, 40), "step_flags": (1, 16)},
                             "ddp": {"step_flags": (1, 16)}},
    "fsam": {"fsdp2": {"norms": (1, 24), "step_flags": (1, 16)}, "ddp": {"step_flags": (1, 16)}},
    "fsam_skipped_interval": {"fsdp2": {}, "ddp": {}},   # interval 2: step 1 is a plain AdamW step
    # LookSAM (interval 2, reuse_direction): g_v's dot products after pass 2, the two norms at a reuse
    "looksam_refresh": {"fsdp2": {"topk": (4, TOPK_BYTES), "norms": (1, 24), "step_flags": (1, 16),
                                  "looksam": (1, 24)},
                        "ddp": {"step_flags": (1, 16)}},
    "looksam_reuse": {"fsdp2": {"looksam_reuse": (1, 16)}, "ddp": {}},
}


def collect(rank: int, world: int, ports: list[int]) -> dict:
    """World 8, then the first 4 ranks as a new world of 4, then the first 2 (each a fresh default
    process group): 8 processes instead of 14 (process start-up dominates this test's time)."""
    import torch.distributed as dist

    from bench.collectives import measure

    sizes = sorted(WORLDS, reverse=True)
    assert world == sizes[0]
    out: dict = {}
    for i, size in enumerate(sizes):
        if rank >= size:
            break
        if i:
            dist.destroy_process_group()
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[i - 1]}", rank=rank, world_size=size)
        out[size] = {kind: measure(rank, size, kind, list(WIDTHS)) for kind in BACKENDS}
        dist.barrier()   # every rank is done with this group before some of them leave it
    if rank < 2:
        out["attribution"] = _attribution(rank, 2)
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_distributed(collect, max(WORLDS), [free_port(), free_port()], timeout=300)


@pytest.fixture(scope="module")
def counts(runs) -> dict:
    """{world: [rank 0's results, rank 1's, ...]}."""
    return {world: [r[world] for r in runs if world in r] for world in WORLDS}


def added(result: dict, step: str) -> dict:
    """FSAM's collectives in ``step`` minus those of the AdamW step, per label (zeros dropped)."""
    out = {}
    base = result["adamw"]["fsam"]
    for label, (count, nbytes) in result[step]["fsam"].items():
        b_count, b_bytes = base.get(label, (0, 0))
        if (count - b_count, nbytes - b_bytes) != (0, 0):
            out[label] = (count - b_count, nbytes - b_bytes)
    for label in base.keys() - result[step]["fsam"].keys():
        out[label] = (-base[label][0], -base[label][1])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsam_collectives_independent_of_model_and_world_size(counts, backend):
    table = []
    for world, ranks in counts.items():
        for rank, per_rank in enumerate(ranks):
            result = per_rank[backend]
            for width in WIDTHS:
                for step, expected in EXPECTED_ADDED.items():
                    got = added(result[width], step)
                    table.append((world, rank, result["numel"][width], step, got))
                    assert got == expected[backend], (
                        f"{backend}, world {world}, rank {rank}, {result['numel'][width]} parameters, {step}: FSAM "
                        f"adds {got}, expected {expected[backend]}")
    print("\n".join(f"world {w} rank {r} params {n} {s}: {g}" for w, r, n, s, g in table if r == 0))


def test_the_counter_sees_size_dependent_backend_traffic(counts):
    """FSDP2's own all-gathers/reduce-scatters grow with the model and are attributed to the backend."""
    for world, ranks in counts.items():
        small, large = (ranks[0]["fsdp2"][w]["adamw"]["backend_total"][1] for w in WIDTHS)
        n_small, n_large = (ranks[0]["fsdp2"]["numel"][w] for w in WIDTHS)
        assert small > 0 and large > small * (n_large / n_small) / 2, (world, small, large)
        assert ranks[0]["fsdp2"][WIDTHS[0]]["adamw"]["fsam"].get("topk") is None


def test_counter_attributes_calls(runs):
    """CollectiveCounter: a core all-reduce is FSAM's (labelled by caller), a direct one the backend's."""
    for r in runs[:2]:
        calls = r["attribution"]
        assert calls[0] == ("fsam", "other", 16), calls
        assert calls[1] == ("backend", "all_reduce", 40), calls
        assert [c[:2] for c in calls[2:]] == [("fsam", "topk")] * 4, calls
        assert sum(c[2] for c in calls[2:]) == TOPK_BYTES


def _attribution(rank: int, world: int) -> list:
    import torch
    import torch.distributed as dist

    from bench.collectives import CollectiveCounter
    from fsam_dist.core import global_topk_mask
    from fsam_dist.core.comm import global_sums

    with CollectiveCounter() as counter:
        global_sums([torch.tensor(1.0), torch.tensor(2.0)])
        dist.all_reduce(torch.zeros(10))
        global_topk_mask([torch.rand(1000)], [1000 * rank], 100)
    return [(c.source, c.label, c.bytes) for c in counter.calls]
