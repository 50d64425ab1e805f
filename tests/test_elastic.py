"""Elastic resume (issue 20): a checkpoint written at one world size resumes at another.

1. The FSAM state by global position (fsam_dist/core/reshard.py), in one process: the per-rank
   states of one sharding, merged, cut for another sharding (ZeRO-style flat partitions across
   parameters, FSDP-style per-parameter chunks, whole parameters), give every rank exactly the
   mask bits and LookSAM g_v entries of the entries it now owns.
2. The global batch is kept (``train.grad_accum_steps`` adjusted, or one clear error), and a
   checkpoint of another backend family is refused before any process group starts.
3. Real processes (gloo, the real launchers): 2 ranks × 6 steps with a mask refresh → checkpoint →
   resume at 3 ranks and at 1 rank for 6 more steps == the uninterrupted 12-step run at 2 ranks
   (tests/parity.py), and the mask refreshed after the resume equals the uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fsam_dist.core import FSAM, Mask, ShardView
from fsam_dist.core.reshard import merge_states

# ---- 1. the FSAM state, resharded in one process -------------------------------------------------

PARAMS = [("enc.weight", 37, True), ("enc.bias", 5, False), ("dec.weight", 100, True), ("head.weight", 23, True)]


def _starts() -> dict[str, int]:
    out, pos = {}, 0
    for name, numel, _ in PARAMS:
        out[name] = pos
        pos += numel
    return out


def flat_partition(world: int) -> list[list[tuple[str, int, int, bool]]]:
    """ZeRO-1/2 style: the flattened model cut into ``world`` equal ranges, across parameters.
    Per rank: (name, global position, numel, eligible)."""
    total = sum(n for _, n, _ in PARAMS)
    per = -(-total // world)
    ranks = []
    for r in range(world):
        lo, hi, mine = r * per, min(total, (r + 1) * per), []
        for name, numel, eligible in PARAMS:
            start = _starts()[name]
            a, b = max(lo, start), min(hi, start + numel)
            if a < b:
                mine.append((name, a, b - a, eligible))
        ranks.append(mine)
    return ranks


def per_parameter_chunks(world: int) -> list[list[tuple[str, int, int, bool]]]:
    """FSDP2 style: every parameter split into ``world`` chunks (torch.chunk sizes)."""
    ranks = [[] for _ in range(world)]
    for name, numel, eligible in PARAMS:
        per = -(-numel // world)
        for r in range(world):
            a, b = min(numel, r * per), min(numel, (r + 1) * per)
            if a < b:
                ranks[r].append((name, _starts()[name] + a, b - a, eligible))
    return ranks


def views_of(layout: list[tuple[str, int, int, bool]], grads: torch.Tensor) -> list[ShardView]:
    return [ShardView(name, torch.zeros(n), grads[pos:pos + n].clone(), pos, eligible)
            for name, pos, n, eligible in layout]


def _global_state(seed: int):
    g = torch.Generator().manual_seed(seed)
    total = sum(n for _, n, _ in PARAMS)
    mask = torch.rand(total, generator=g) < 0.3
    mask[_starts()["head.weight"]:] = True        # an all-set parameter ('all' pieces)
    dec = _starts()["dec.weight"]
    mask[dec:dec + 100] = False                     # a sparse one ('indices' pieces)
    mask[dec + 13] = mask[dec + 71] = True
    mask[_starts()["enc.weight"]:_starts()["enc.weight"] + 3] = False
    component = torch.randn(total, generator=g, dtype=torch.float32)
    return mask, component


def fsam_states(layout_per_rank, mask: torch.Tensor, component: torch.Tensor) -> list[dict]:
    """What each rank's FSAM.state_dict() holds for the given global mask and g_v."""
    states = []
    for layout in layout_per_rank:
        fsam = FSAM(rho=0.05, keep_ratio=0.3, mask_interval=4, interval=2, reuse_direction=True)
        fsam.mask_step = 4
        fsam._masks = {(n, p): Mask.from_bool(mask[p:p + k]) for n, p, k, e in layout if e}
        fsam._component = {(n, p): component[p:p + k].clone() for n, p, k, _ in layout}
        fsam._component_sumsq = sum(float((component[p:p + k].double() ** 2).sum()) for n, p, k, _ in layout)
        fsam._look_grad_norm = 1.5
        states.append(fsam.state_dict())
    return states


@pytest.mark.parametrize("source,target", [
    (("flat", 2), ("flat", 3)), (("flat", 2), ("flat", 1)), (("chunks", 2), ("chunks", 3)),
    (("chunks", 3), ("flat", 2)), (("flat", 4), ("chunks", 1)), (("flat", 1), ("chunks", 4))])
def test_fsam_state_reshards_to_any_layout(source, target):
    """Every rank of the target layout gets exactly the mask bits and g_v entries of the global
    positions it owns, its own Σ g_v², and the refresh bookkeeping; the states round-trip through
    torch.save/torch.load(weights_only=True, mmap=True)."""
    layouts = {"flat": flat_partition, "chunks": per_parameter_chunks}
    mask, component = _global_state(0)
    states = fsam_states(layouts[source[0]](source[1]), mask, component)
    # through the file format the checkpoint uses
    import io
    loaded = []
    for s in states:
        buf = io.BytesIO()
        torch.save({"fsam": s}, buf)
        buf.seek(0)
        loaded.append(torch.load(buf, map_location="cpu", weights_only=True)["fsam"])
    merged = merge_states(loaded)
    assert {m["kind"] for _, _, m in merged["masks"]} >= {"bits", "all"}
    grads = torch.randn(component.numel())
    seen = torch.zeros(component.numel(), dtype=torch.int64)
    for layout in layouts[target[0]](target[1]):
        fsam = FSAM(rho=0.05, keep_ratio=0.3, mask_interval=4, interval=2, reuse_direction=True)
        fsam.load_state_dict(merged)
        assert fsam.mask_step == 4 and not fsam.refresh_due(5) and fsam.refresh_due(8)
        views = views_of(layout, grads)
        fsam._place(views)
        for v in views:
            sl = slice(v.position, v.position + v.numel)
            seen[sl] += 1
            if v.eligible:
                assert torch.equal(fsam.packed_masks[v.key].to_bool(), mask[sl]), v.key
            else:
                assert v.key not in fsam.packed_masks
            assert torch.equal(fsam._component[v.key], component[sl]), v.key
        expected = sum(float((component[p:p + k].double() ** 2).sum()) for _, p, k, _ in layout)
        assert fsam._component_sumsq == pytest.approx(expected, rel=1e-12)
        assert fsam._look_grad_norm == 1.5
    assert torch.equal(seen, torch.ones_like(seen)), "every entry owned exactly once"


def test_same_layout_keeps_the_saved_pieces_bit_for_bit():
    """Resharding to the layout that wrote the state hands back the saved masks as they were
    (kind and bytes) and the same Σ g_v² as the rank's own state (resume at the same size stays
    bit-identical through either path)."""
    mask, component = _global_state(1)
    layout = flat_partition(2)
    states = fsam_states(layout, mask, component)
    merged = merge_states(states)
    for rank, own in enumerate(states):
        fsam = FSAM(rho=0.05, keep_ratio=0.3, mask_interval=4, interval=2, reuse_direction=True)
        fsam.load_state_dict(merged)
        views = views_of(layout[rank], torch.zeros(component.numel()))
        fsam._place(views)
        for name, pos, m in own["masks"]:
            got = fsam.packed_masks[(name, pos)]
            assert (got.kind, got.count, got.numel) == (m["kind"], m["count"], m["numel"])
            assert (got.data is None and m["data"] is None) or torch.equal(got.data, m["data"])
        local = 0.0
        for v in views:
            local += float((fsam._component[v.key].double() ** 2).sum())
        assert fsam._component_sumsq == pytest.approx(local, rel=1e-12)


def test_a_global_state_saved_before_any_step_loads_again():
    """A run resumed at a new size and checkpointed before its first step saves the global state
    it loaded (on every rank); merging those copies gives the same state."""
    mask, component = _global_state(2)
    merged = merge_states(fsam_states(flat_partition(2), mask, component))
    fsam = FSAM(rho=0.05, keep_ratio=0.3, mask_interval=4, interval=2, reuse_direction=True)
    fsam.load_state_dict(merged)
    again = merge_states([fsam.state_dict(), fsam.state_dict(), fsam.state_dict()])
    assert [(n, p) for n, p, _ in again["masks"]] == [(n, p) for n, p, _ in merged["masks"]]
    assert [(n, p) for n, p, _ in again["reuse"]["component"]] == [(n, p) for n, p, _ in merged["reuse"]["component"]]


def test_merge_refuses_inconsistent_rank_states():
    mask, component = _global_state(3)
    states = fsam_states(flat_partition(2), mask, component)
    states[1]["mask_step"] = 8
    with pytest.raises(ValueError, match="last mask refresh"):
        merge_states(states)


def test_a_state_that_does_not_cover_a_view_is_refused():
    """A view the saved pieces do not cover (another model, or fsam.exclude changed) is an error
    naming the parameter, never a silently empty mask."""
    mask, component = _global_state(4)
    states = fsam_states(flat_partition(2), mask, component)
    states[1]["masks"] = states[1]["masks"][:-1]
    fsam = FSAM(rho=0.05, keep_ratio=0.3, mask_interval=4, interval=2, reuse_direction=True)
    fsam.load_state_dict(merge_states(states))
    with pytest.raises(ValueError, match="head.weight"):
        fsam._place(views_of(per_parameter_chunks(1)[0], torch.zeros(component.numel())))
