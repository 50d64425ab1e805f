r"""The one tolerance rule for comparing the weights of two training runs (parity tests).

Two runs of the same training that differ only in how sums are ordered (sharding, ranks,
micro-batches, another CPU's kernels, thread count, oneDNN on or off) do not end at the same fp32
weights. How far apart they may end is set by the numerics below, per tensor, relative to the
distance the reference travelled from the common start w₀ -- never by a fixed element-wise atol.

**Rule.** For every tensor, with Δ = w − w_ref and D = w_ref − w₀:

1. ‖Δ‖₂ ≤ c · ‖D‖₂ with :data:`REL` c = 1e-3 (fp32) -- the tensor is where the reference put it,
   to 0.1 % of how far it moved;
2. max |Δ| ≤ ν · Σ_t lr_t with :data:`ELEM` ν = 1e-2 -- no single entry is off by more than 1 % of
   the largest distance Adam can move one entry in the run.

A tensor the reference did not move (D = 0) is held to rule 2 only.

**Why c = 1e-3.** Reordering an fp32 sum of n terms changes it by up to ~n·u relative
(u = 2⁻²⁴ ≈ 6e-8), typically √n·u; the reductions here (tokens × hidden, ranks) have n ≲ 10³,
so a gradient entry carries a relative error δ ≲ 1e-5 (typically ~1e-6). AdamW's update
m̂/(√v̂ + ε) is invariant to the gradient's scale, so to first order its relative error is that of
the gradient: each step's update is off by ≲ δ relative, and T such errors add up to ≲ δ relative
to the distance travelled (T updates). Curvature feeds the difference back through later
gradients; over the ≤ 12 steps at lr 1e-2 of these tests it stays within a small factor (the
measured worst is 1e-7-1e-6 relative per tensor, see the tests' printouts). c = 1e-3 leaves
≥ 100× above that ceiling. It is still far below what a real bug does: dropping the
perturbation (ρ = 0 against ρ = 0.05), a stale mask or a wrong norm moves weights by ≥ 1e-2
relative at these settings -- :func:`assert_not_parity` checks that in the tests that have
such a control run (test_deepspeed.py, test_reference.py).

**Why an element-wise bound, and why ν · Σ lr_t.** An entry whose true gradient is ~0 has a
computed gradient that *is* summation noise, and Adam normalises it into an update of size ~lr
whatever |g| is: such an entry moves by up to ~lr per step in a direction the kernels' summation
order picks (measured: one entry of T5's tied embedding 9.1e-6 apart after 10 steps at lr 1e-2 on
an AVX512 CPU, within 2e-6 on this AVX2 one -- that failed the old atol 2e-6). A fixed atol cannot
hold for such entries, while rule 1 absorbs a few of them in a tensor that moved. Rule 2 keeps a
backstop against one grossly wrong entry in an otherwise right tensor; it scales with Σ lr_t
because that is what Adam's noise amplification scales with. ν = 1e-2 says at most 1 % of an
entry's steps may be flipped by noise: 100× the measured 9.1e-6 / (10 · 1e-2) ≈ 1e-4.

**bf16 against fp32** (:func:`assert_bf16_close`). bf16 keeps 8 significant bits (u = 2⁻⁹ per
rounding, 2¹⁵ × fp32's): every gradient entry carries a noise floor 2¹⁵ times higher, so far more
entries are noise-dominated and Adam turns each of them into ~lr updates. Per tensor the
result is then meaningless (single layer norms end 34 % of their travel away from fp32, measured
at ZeRO-1/2/3); over the whole model the difference is measured at 6.6-9.6 % of the distance
travelled (DeepSpeed ZeRO-1/2/3, 2 ranks, 10 steps at lr 1e-2, ρ 0.05; FSDP1/2 per tensor at most
15.6 %, median 5-6 %). The bf16 rule is on the
whole model: ‖w − w_ref‖ ≤ :data:`REL_BF16` · ‖w_ref − w₀‖ with 0.13. A bf16 run that drops
the perturbation (ρ = 0) ends 19-19.5 % away from the fp32 FSAM run and fails it
(:func:`assert_bf16_not_close`, the control in test_deepspeed.py and test_fsdp.py). The margins
are thin (1.35× and 1.46×) because at these settings the perturbation changes the trajectory
by only about twice bf16's own noise; they are measured, not assumed.
"""

from __future__ import annotations

import math

import torch

REL = 1e-3
"""c: per-tensor ‖w − w_ref‖ / ‖w_ref − w₀‖ allowed between two fp32 runs (module docstring)."""
ELEM = 1e-2
"""ν: element-wise |w − w_ref| allowed, as a fraction of Σ_t lr_t (module docstring)."""
REL_BF16 = 0.13
"""Whole-model ‖w − w_ref‖ / ‖w_ref − w₀‖ allowed between a bf16 and the fp32 run (module docstring)."""


def parity_errors(got: dict, expected: dict, start: dict) -> dict[str, tuple[float, float, float]]:
    """Per tensor of ``expected``: (‖w − w_ref‖, ‖w_ref − w₀‖, max |w − w_ref|), in fp64."""
    missing = [k for k in expected if k not in got or k not in start]
    if missing:
        raise AssertionError(f"tensors missing from the run or the start weights: {missing}")
    out = {}
    for name, ref in expected.items():
        ref = ref.detach().double()
        diff = got[name].detach().double() - ref
        assert diff.shape == ref.shape, f"{name}: shape {tuple(got[name].shape)} vs {tuple(ref.shape)}"
        travel = ref - start[name].detach().double().reshape(ref.shape)
        out[name] = (float(diff.norm()), float(travel.norm()), float(diff.abs().max()) if diff.numel() else 0.0)
    return out


def worst_relative(errors: dict[str, tuple[float, float, float]]) -> float:
    """max over tensors that moved of ‖w − w_ref‖ / ‖w_ref − w₀‖."""
    return max((d / t for d, t, _ in errors.values() if t > 0), default=0.0)


def violations(errors: dict, lr_steps: float, rel: float = REL, elem: float = ELEM) -> list[str]:
    """The tensors that break the rule (module docstring), each with why."""
    bad = []
    for name, (dist, travel, worst) in errors.items():
        if travel > 0 and dist > rel * travel:
            bad.append(f"{name}: ‖Δ‖ = {dist:.3g} > {rel:g} · ‖w_ref − w₀‖ = {rel * travel:.3g}")
        if worst > elem * lr_steps:
            bad.append(f"{name}: max |Δ| = {worst:.3g} > {elem:g} · Σ lr = {elem * lr_steps:.3g}")
    return bad


def assert_parity(got: dict, expected: dict, start: dict, lr_steps: float, label: str = "",
                  rel: float = REL, elem: float = ELEM) -> float:
    """Assert that run ``got`` ended where ``expected`` did, by the rule of this module.

    ``start``: the common initial weights w₀ (same keys). ``lr_steps``: Σ_t lr_t over the run
    (peak lr × steps is a safe upper bound for a schedule that never exceeds its peak).
    Returns the worst relative error (and prints it, with the worst element-wise one)."""
    assert lr_steps > 0 and math.isfinite(lr_steps), lr_steps
    errors = parity_errors(got, expected, start)
    bad = violations(errors, lr_steps, rel, elem)
    worst = worst_relative(errors)
    assert not bad, f"{label}: {len(bad)} tensor(s) outside the parity tolerance:\n  " + "\n  ".join(bad)
    max_abs = max((e for _, _, e in errors.values()), default=0.0)
    print(f"{label}: worst ‖w − w_ref‖/‖w_ref − w₀‖ = {worst:.2e}, max |w − w_ref| = {max_abs:.2e}")
    return worst


def assert_not_parity(got: dict, expected: dict, start: dict, lr_steps: float, label: str = "",
                      rel: float = REL, elem: float = ELEM) -> float:
    """Control: a run that differs for a real reason (no perturbation, stale weights) must break
    the rule -- otherwise the parity tests using it could not fail. Returns the worst relative error."""
    errors = parity_errors(got, expected, start)
    assert violations(errors, lr_steps, rel, elem), \
        f"{label}: a run that should differ passes the parity tolerance (worst {worst_relative(errors):.2e})"
    worst = worst_relative(errors)
    print(f"{label} (control): worst ‖w − w_ref‖/‖w_ref − w₀‖ = {worst:.2e}")
    return worst
LOSS_BF16 = 1e-2
"""Relative difference allowed between a bf16 run's per-step losses and the fp32 run's: bf16
rounding moves a loss by a few 2⁻⁹ (measured ≤ 2.9e-3 over 12 FSDP steps), while a pass 2
without the perturbation misses the sharpness L(w+e) − L(w), 1.6e-2 of the loss at some step
(measured; test_fsdp.py asserts the control fails)."""


def whole_model_relative(errors: dict[str, tuple[float, float, float]]) -> float:
    """‖w − w_ref‖ / ‖w_ref − w₀‖ over all tensors together."""
    dist = math.sqrt(sum(d * d for d, _, _ in errors.values()))
    travel = math.sqrt(sum(t * t for _, t, _ in errors.values()))
    assert travel > 0, "the reference did not move"
    return dist / travel


def assert_bf16_close(got: dict, expected: dict, start: dict, label: str = "") -> float:
    """A bf16 run ended within :data:`REL_BF16` of the fp32 run ``expected`` (whole model)."""
    ratio = whole_model_relative(parity_errors(got, expected, start))
    assert ratio <= REL_BF16, f"{label}: ‖w − w_fp32‖ / ‖w_fp32 − w₀‖ = {ratio:.3g} > {REL_BF16}"
    print(f"{label}: ‖w − w_fp32‖ / ‖w_fp32 − w₀‖ = {ratio:.3g}")
    return ratio


def assert_bf16_not_close(got: dict, expected: dict, start: dict, label: str = "") -> float:
    """Control: a bf16 run that differs for a real reason (no perturbation) is outside :data:`REL_BF16`."""
    ratio = whole_model_relative(parity_errors(got, expected, start))
    assert ratio > REL_BF16, f"{label}: a run that should differ is within the bf16 tolerance ({ratio:.3g})"
    print(f"{label} (control): ‖w − w_fp32‖ / ‖w_fp32 − w₀‖ = {ratio:.3g}")
    return ratio
