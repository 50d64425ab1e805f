"""FSAM state by global position: merge every rank's saved state and cut it for any sharding.

Each rank's :meth:`FSAM.state_dict <fsam_dist.core.fsam.FSAM.state_dict>` lists *pieces*
``(name, position, value)``: ``value`` (a :class:`~fsam_dist.core.masks.Mask` state, or a LookSAM
g_v tensor) covers the entries ``[position, position + numel)`` of the model-wide flattened order
(:attr:`ShardView.position`), which does not depend on how the parameters were sharded. The
pieces of all ranks of one checkpoint together cover every eligible entry (masks) and every
trainable entry (g_v) once. :func:`merge_states` joins them into one *global* state;
:func:`place_masks` / :func:`place_tensors` cut from it what the views of a rank of any world
size and backend hold. A view that equals a saved piece (same world size and layout) gets that
piece as it was saved, so resuming at the same size stays bit for bit.

Works chunk by chunk (:data:`~fsam_dist.core.views.CHUNK` entries): no temporary larger than a
chunk besides the pieces themselves (memory-mapped by the caller where they come from files).
"""

from __future__ import annotations

import bisect

import torch

from .masks import Mask, pack_bits
from .views import ShardView, chunks

GLOBAL = "global"
"""``state["layout"]`` of a merged state (every rank's pieces); a per-rank state has no ``layout``."""


def merge_states(states: list[dict]) -> dict:
    """One global FSAM state from the per-rank states of one checkpoint (any order; duplicate
    pieces, e.g. from global states saved again before any step, are kept once).

    Raises ValueError when the ranks disagree on the step of the last refresh or on LookSAM's
    ‖g‖ (they are global quantities), or when some ranks have a mask and others none."""
    steps = {s["mask_step"] for s in states}
    if len(steps) != 1:
        raise ValueError(f"FSAM states of one checkpoint disagree on the step of the last mask refresh: {sorted(steps, key=str)}")
    with_masks = [s["masks"] is not None for s in states]
    if any(with_masks) and not all(with_masks):
        raise ValueError("FSAM states of one checkpoint: some ranks saved a mask, others none")
    masks: dict[tuple[str, int, int], dict] = {}
    components: dict[tuple[str, int, int], torch.Tensor] = {}
    norms = set()
    for s in states:
        for name, pos, m in s["masks"] or ():
            masks.setdefault((name, pos, int(m["numel"])), m)
        reuse = s.get("reuse")
        if reuse is not None:
            norms.add(float(reuse["look_grad_norm"]))
            for name, pos, t in reuse["component"]:
                components.setdefault((name, pos, t.numel()), t)
    if len(norms) > 1:
        raise ValueError(f"FSAM states of one checkpoint disagree on LookSAM's ‖g‖: {sorted(norms)}")
    state = {"layout": GLOBAL, "mask_step": steps.pop(),
             "masks": [(n, p, m) for (n, p, _), m in sorted(masks.items(), key=lambda kv: kv[0][1])]
             if all(with_masks) else None}
    if components:
        state["reuse"] = {"look_grad_norm": norms.pop(),
                          "component": [(n, p, t) for (n, p, _), t in sorted(components.items(),
                                                                              key=lambda kv: kv[0][1])]}
    return state


class _Index:
    """Pieces sorted by position, to find those overlapping a range."""

    def __init__(self, pieces: list[tuple[str, int, object, int]]) -> None:
        self.pieces = sorted(pieces, key=lambda p: p[1])
        self.starts = [p[1] for p in self.pieces]

    def exact(self, name: str, position: int, numel: int):
        i = bisect.bisect_left(self.starts, position)
        while i < len(self.pieces) and self.starts[i] == position:
            pname, _, value, pnumel = self.pieces[i]
            if pname == name and pnumel == numel:
                return value
            i += 1
        return None

    def overlapping(self, lo: int, hi: int):
        """(piece start, value, piece numel) of every piece overlapping ``[lo, hi)``, by position."""
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        # pieces never overlap one another, so the one starting at or before lo is the only earlier candidate
        while i < len(self.pieces) and self.starts[i] < hi:
            _, start, value, numel = self.pieces[i]
            if start + numel > lo:
                yield start, value, numel
            i += 1


def _uncovered(view: ShardView, covered: int, what: str) -> ValueError:
    return ValueError(f"saved FSAM {what} covers {covered} of the {view.numel} entries of {view.name} "
                      f"[{view.position}, {view.position + view.numel}): the checkpoint was written for a "
                      "different model or fsam.exclude")


def place_masks(pieces: list[tuple[str, int, dict]], views: list[ShardView]) -> dict[tuple[str, int], Mask]:
    """The mask of each eligible view, cut from the global mask pieces ``(name, position, Mask
    state)``; on the view's device."""
    index = _Index([(n, p, Mask.from_state(m), int(m["numel"])) for n, p, m in pieces])
    out = {}
    for view in views:
        if not view.eligible:
            continue
        device = view.weights.device
        same = index.exact(view.name, view.position, view.numel)
        if same is not None:
            out[view.key] = same if same.data is None and same.device == device else \
                Mask(same.numel, same.count, same.kind, None if same.data is None else same.data.to(device), device)
            continue
        n = view.numel
        packed = torch.empty(-(-n // 8), dtype=torch.uint8)
        count = covered = 0
        for start, end in chunks(n):
            lo_all, hi_all = view.position + start, view.position + end
            flags = torch.zeros(end - start, dtype=torch.bool)
            for p_start, mask, _ in index.overlapping(lo_all, hi_all):
                lo, hi = max(lo_all, p_start), min(hi_all, p_start + mask.numel)
                first = lo - p_start
                aligned = first - first % 8
                flags[lo - lo_all:hi - lo_all] = mask.bool_range(aligned, hi - p_start)[first - aligned:].cpu()
                covered += hi - lo
            count += int(flags.sum())
            packed[start // 8:-(-end // 8)] = pack_bits(flags)
        if covered != n:
            raise _uncovered(view, covered, "mask")
        out[view.key] = Mask.from_bits(packed.to(device), n, count)
    return out


def place_tensors(pieces: list[tuple[str, int, torch.Tensor]], views: list[ShardView]) -> dict[tuple[str, int], torch.Tensor]:
    """Each view's slice of a global per-entry tensor (LookSAM's g_v) from pieces ``(name,
    position, 1-D tensor)``; on the view's device, in the saved dtype."""
    index = _Index([(n, p, t, t.numel()) for n, p, t in pieces])
    out = {}
    for view in views:
        device = view.grad.device
        same = index.exact(view.name, view.position, view.numel)
        if same is not None:
            out[view.key] = same.to(device)
            continue
        dtype = next((t.dtype for _, t, _ in index.overlapping(view.position, view.position + view.numel)),
                     torch.float32)
        result = torch.empty(view.numel, dtype=dtype, device=device)
        covered = 0
        for p_start, tensor, numel in index.overlapping(view.position, view.position + view.numel):
            lo, hi = max(view.position, p_start), min(view.position + view.numel, p_start + numel)
            result[lo - view.position:hi - view.position] = tensor[lo - p_start:hi - p_start].to(device, dtype)
            covered += hi - lo
        if covered != view.numel:
            raise _uncovered(view, covered, "LookSAM direction")
        out[view.key] = result
    return out
