"""FSAM core and the two-pass step on one process: special cases that must hold exactly."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fsam_dist.config import ConfigError, FSAMConfig, validate
from fsam_dist.core import FSAM, Mask, ShardView, perturb, restore
from fsam_dist.core.fsam import fisher_scores
from fsam_dist.core.masks import pack_bits, unpack_bits
from fsam_dist.core.views import CHUNK
from fsam_dist.core.restore import SMALL, restored, save
from fsam_dist.core.select import global_topk_mask, topk_masks
from fsam_dist.shards.local import LocalBackend
from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
from fsam_dist.train.step import empirical_fisher, train_step

from .helpers import state, synthetic_batch, tiny_t5

LR = 1e-2


def make_run(dropout=0.0, seed=0, **fsam_kwargs):
    model = tiny_t5(seed=seed, dropout=dropout)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    fsam = FSAM(**fsam_kwargs) if fsam_kwargs else None
    return model, opt, LocalBackend(model, opt), fsam


def batches(step: int, n: int = 8, micro: int = 1) -> list[dict]:
    full = synthetic_batch(n, seed=100 + step)
    size = n // micro
    return [{k: v[i * size:(i + 1) * size] for k, v in full.items()} for i in range(micro)]


def test_rho_zero_same_dropout_is_adamw_bit_for_bit():
    """ρ = 0 with dropout on and same_dropout: exactly the base optimizer."""
    model, _, backend, fsam = make_run(dropout=0.1, rho=0.0, keep_ratio=0.5, mask_interval=2)
    ref = tiny_t5(seed=0, dropout=0.1)
    ref.train()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    torch.manual_seed(123)
    for step in range(4):
        train_step(backend, seq2seq_loss_sum, batches(step, micro=2), step=step,
                   count_targets=count_target_tokens, fsam=fsam)
    torch.manual_seed(123)
    for step in range(4):
        mbs = batches(step, micro=2)
        total = sum(count_target_tokens(mb) for mb in mbs)
        ref_opt.zero_grad()
        for mb in mbs:
            (seq2seq_loss_sum(ref, mb) * (1.0 / total)).backward()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    # and the dropout really was on: a second forward in train mode differs
    mb = batches(0)[0]
    assert not torch.equal(seq2seq_loss_sum(model, mb), seq2seq_loss_sum(model, mb))


def test_keep_ratio_one_without_exclusions_is_sam():
    rho = 0.05
    model, _, backend, fsam = make_run(rho=rho, keep_ratio=1.0, mask_interval=100)
    backend.eligible = {n: True for n in backend.eligible}
    ref = tiny_t5(seed=0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    for step in range(3):
        train_step(backend, seq2seq_loss_sum, batches(step), step=step, count_targets=count_target_tokens, fsam=fsam)
        # plain SAM, written out
        mb = batches(step)[0]
        total = count_target_tokens(mb)
        ref_opt.zero_grad()
        (seq2seq_loss_sum(ref, mb) / total).backward()
        params = [p for p in ref.parameters()]
        norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(p.grad * (rho / (norm + 1e-12)))
        ref_opt.zero_grad()
        (seq2seq_loss_sum(ref, mb) / total).backward()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


class RecordingBackend(LocalBackend):
    """Records the weights pass 2 reads and the gradient the base optimizer steps with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forward_weights: list[dict] = []
        self.stepped_grads = None

    def forward_backward(self, loss_fn, micro_batch, scale, last):
        self.forward_weights.append(state(self.module))
        return super().forward_backward(loss_fn, micro_batch, scale, last)

    def clip_and_step(self, max_norm):
        self.stepped_grads = {n: p.grad.clone() for n, p in self.trainable}
        self.weights_before_step = state(self.module)
        return super().clip_and_step(max_norm)


@pytest.mark.parametrize("excluded_mode", ["dense", "none"])
def test_masked_entries_never_move_and_step_is_adamw_of_g2(excluded_mode):
    model = tiny_t5(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    backend = RecordingBackend(model, opt)
    fsam = FSAM(rho=0.5, keep_ratio=0.1, mask_interval=1, excluded_mode=excluded_mode)
    w0 = state(model)
    train_step(backend, seq2seq_loss_sum, batches(0), step=0, count_targets=count_target_tokens, fsam=fsam)
    pass1, pass2 = backend.forward_weights
    masks = {name: m for (name, _), m in fsam.masks.items()}
    masked_moved = masked_total = 0
    for name, w in w0.items():
        assert torch.equal(pass1[name], w)
        moved = (pass2[name] != w).reshape(-1)
        if backend.eligible[name]:
            assert not moved[~masks[name]].any(), f"{name}: unmasked entries moved in pass 2"
            masked_moved += int(moved[masks[name]].sum())
            masked_total += int(masks[name].sum())
        elif excluded_mode == "none":
            assert not moved.any(), f"{name}: excluded parameter moved"
        else:
            # unused relative-attention buckets have zero gradient, so only "some entries moved"
            assert moved.any(), f"{name}: excluded parameter not perturbed densely"
    assert masked_total > 0 and masked_moved / masked_total > 0.95, "masked entries did not move"
    # The base step used g₂ at exactly w (restore is exact): replay AdamW on the recorded g₂.
    assert all(torch.equal(backend.weights_before_step[n], w) for n, w in w0.items())
    replay = tiny_t5(seed=1)
    replay_opt = torch.optim.AdamW(replay.parameters(), lr=LR)
    for name, p in replay.named_parameters():
        p.grad = backend.stepped_grads[name]
    replay_opt.step()
    for (name, p), q in zip(model.named_parameters(), replay.parameters()):
        assert torch.equal(p, q), name


def test_mask_refresh_schedule_and_perturbation_on_refresh_steps():
    model = tiny_t5(seed=2)
    backend = RecordingBackend(model, torch.optim.AdamW(model.parameters(), lr=LR))
    fsam = FSAM(rho=0.1, keep_ratio=0.2, mask_interval=3)
    refreshed = []
    for step in range(7):
        backend.forward_weights.clear()
        stats = train_step(backend, seq2seq_loss_sum, batches(step), step=step,
                           count_targets=count_target_tokens, fsam=fsam)
        refreshed.append(stats.get("mask_refreshed", 0))
        # a refresh never cancels the step's perturbation
        pass1, pass2 = backend.forward_weights
        assert any(not torch.equal(pass1[n], pass2[n]) for n in pass1)
        assert stats["perturbation_norm"] > 0 and stats["sharpness"] == stats["perturbed_loss"] - stats["loss"]
        if step > 0 and step % 3 == 0:
            assert 0 <= stats["mask_jaccard"] <= 1
    assert refreshed == [1, 0, 0, 1, 0, 0, 1]


def _views(grads, weights=None, eligible=None):
    weights = weights or [torch.ones_like(g) for g in grads]
    eligible = eligible or [True] * len(grads)
    views, pos = [], 0
    for i, (g, w, e) in enumerate(zip(grads, weights, eligible)):
        views.append(ShardView(f"p{i}", w, g, pos, e))
        pos += g.numel()
    return views


def test_perturbation_formulas():
    g = [torch.tensor([3.0, -4.0, 0.5, 0.0]), torch.tensor([1.0, 2.0])]
    w = [torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([0.5, -2.0])]
    masks = {("p0", 0): torch.tensor([True, True, False, False])}
    # full norm, dense exclusion
    views = _views([x.clone() for x in g], [x.clone() for x in w], [True, False])
    p = perturb(views, masks, rho=0.1, eps=1e-12, norm="full", excluded_mode="dense", adaptive=False)
    n = math.sqrt(9 + 16 + 0.25 + 1 + 4)
    expected0 = w[0] + 0.1 / n * torch.tensor([3.0, -4.0, 0.0, 0.0])
    torch.testing.assert_close(views[0].weights, expected0)
    torch.testing.assert_close(views[1].weights, w[1] + 0.1 / n * g[1])
    assert p.grad_norm == pytest.approx(n)
    # masked norm, no exclusion perturbation: ‖e‖ = ρ exactly
    views = _views([x.clone() for x in g], [x.clone() for x in w], [True, False])
    p = perturb(views, masks, rho=0.1, eps=1e-12, norm="masked", excluded_mode="none", adaptive=False)
    assert p.perturbation_norm == pytest.approx(0.1)
    torch.testing.assert_close(views[0].weights, w[0] + 0.1 / 5.0 * torch.tensor([3.0, -4.0, 0.0, 0.0]))
    assert torch.equal(views[1].weights, w[1])
    # adaptive: e = ρ |w|² g / ‖|w| g‖
    views = _views([x.clone() for x in g], [x.clone() for x in w], [True, False])
    perturb(views, masks, rho=0.1, eps=1e-12, norm="full", excluded_mode="dense", adaptive=True)
    scaled = [wi.abs() * gi for wi, gi in zip(w, g)]
    n = math.sqrt(sum(float(s.square().sum()) for s in scaled))
    torch.testing.assert_close(views[0].weights, w[0] + 0.1 / n * (w[0] ** 2 * g[0]) * torch.tensor([1.0, 1, 0, 0]))
    torch.testing.assert_close(views[1].weights, w[1] + 0.1 / n * (w[1] ** 2 * g[1]))


def test_batch_fisher_mask_selects_largest_squared_gradients():
    g = [torch.tensor([0.1, -3.0, 0.2]), torch.tensor([2.0, -0.5]), torch.tensor([9.0])]
    views = _views(g, eligible=[True, True, False])
    fsam = FSAM(rho=0.1, keep_ratio=0.4, mask_interval=10)   # k = round(0.4 * 5) = 2
    fsam.ascend(views, step=0)
    assert fsam.masks[("p0", 0)].tolist() == [False, True, False]
    assert fsam.masks[("p1", 3)].tolist() == [True, False]
    assert ("p2", 5) not in fsam.masks
    fsam.descend(views)
    assert [v.weights.tolist() for v in views] == [[1.0] * 3, [1.0] * 2, [1.0]]


def test_empirical_fisher_is_sum_of_per_example_squared_gradients():
    model = tiny_t5(seed=3)
    backend = LocalBackend(model, torch.optim.AdamW(model.parameters(), lr=LR))
    examples = [synthetic_batch(1, seed=s) for s in range(3)]
    scores = empirical_fisher(backend, seq2seq_loss_sum, examples)
    assert all(p.grad is None for p in model.parameters()), "the Fisher pass must not leave gradients"
    expected = None
    for ex in examples:
        model.zero_grad()
        seq2seq_loss_sum(model, ex).backward()
        sq = fisher_scores(backend.views())
        expected = sq if expected is None else [a + b for a, b in zip(expected, sq)]
    for s, e in zip(scores, expected):
        torch.testing.assert_close(s, e)


def test_empirical_fisher_step_runs():
    model, _, backend, fsam = make_run(rho=0.05, keep_ratio=0.1, mask_interval=2, fisher="empirical")
    for step in range(3):
        stats = train_step(backend, seq2seq_loss_sum, batches(step), step=step, count_targets=count_target_tokens,
                           fsam=fsam, fisher_examples=lambda: [synthetic_batch(1, seed=s) for s in range(4)])
        assert stats["skipped"] == 0
    total = sum(int(m.sum()) for m in fsam.masks.values())
    eligible = sum(v.numel for v in backend.views() if v.eligible)
    assert total == round(0.1 * eligible)


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_nonfinite_pass_skips_step_and_leaves_weights(bad_pass):
    model, opt, backend, fsam = make_run(rho=0.05, keep_ratio=0.1, mask_interval=1)
    train_step(backend, seq2seq_loss_sum, batches(0), step=0, count_targets=count_target_tokens, fsam=fsam)
    before, opt_before = state(model), {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state.items()}
    calls = []

    def poisoned(m, mb):
        calls.append(1)
        loss = seq2seq_loss_sum(m, mb)
        return loss * float("nan") if len(calls) == bad_pass else loss

    stats = train_step(backend, poisoned, batches(1), step=1, count_targets=count_target_tokens, fsam=fsam)
    assert stats["skipped"] == 1 and len(calls) == bad_pass
    assert not fsam.perturbed
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None
    for k, v in opt.state.items():
        for kk, vv in v.items():
            assert torch.equal(vv, opt_before[k][kk])
    stats = train_step(backend, seq2seq_loss_sum, batches(2), step=2, count_targets=count_target_tokens, fsam=fsam)
    assert stats["skipped"] == 0


def test_restore_happens_even_if_pass_two_raises():
    model, _, backend, fsam = make_run(rho=0.5, keep_ratio=0.5, mask_interval=1)
    before = state(model)
    calls = []

    def explode(m, mb):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return seq2seq_loss_sum(m, mb)

    with pytest.raises(RuntimeError, match="boom"):
        train_step(backend, explode, batches(0), step=0, count_targets=count_target_tokens, fsam=fsam)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("field,value,needle", [
    ("rho", -0.1, "rho"), ("rho", float("nan"), "rho"), ("keep_ratio", 0.0, "keep_ratio"),
    ("keep_ratio", 1.5, "keep_ratio"), ("mask_interval", 0, "mask_interval"), ("norm", "l1", "norm"),
    ("fisher", "exact", "fisher"), ("excluded_mode", "sparse", "excluded_mode"), ("exclude", ["(bias"], "exclude"),
    ("eps", 0, "eps"), ("mask_interval", "often", "mask_interval"), ("kep_ratio", 0.1, "kep_ratio"),
])
def test_config_errors_name_the_field(field, value, needle):
    with pytest.raises(ConfigError) as err:
        validate(FSAMConfig, {field: value}, prefix="fsam.")
    assert f"fsam.{needle}" in str(err.value)


def test_config_builds_core_and_defaults():
    cfg = validate(FSAMConfig, {})
    fsam = cfg.build()
    assert (fsam.rho, fsam.keep_ratio, fsam.mask_interval, fsam.norm) == (0.05, 0.1, 100, "full")
    assert validate(FSAMConfig, {"enabled": False}).build() is None
    for kwargs in [dict(rho=-1), dict(keep_ratio=0), dict(mask_interval=1.5), dict(norm="x"), dict(eps=0)]:
        with pytest.raises(ValueError):
            FSAM(**kwargs)


# ---- compact state: packed masks, low-16-bit restore data (issue 8) --------------------------------



def test_pack_bits_roundtrip_every_byte_and_sizes():
    every = torch.tensor([[(v >> i) & 1 for i in range(8)] for v in range(256)], dtype=torch.bool).reshape(-1)
    assert torch.equal(pack_bits(every), torch.arange(256, dtype=torch.uint8))
    assert torch.equal(unpack_bits(pack_bits(every), every.numel()), every)
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 1000, CHUNK + 13):
        for density in (0.0, 0.01, 0.1, 0.5, 1.0):
            b = torch.rand(n, generator=g) < density
            m = Mask.from_bool(b)
            assert torch.equal(m.to_bool(), b) and m.count == int(b.sum())
            chosen = torch.cat([torch.arange(s.start, s.stop) if isinstance(s, slice) else s
                                for s in m.selections()] or [torch.zeros(0, dtype=torch.int64)])
            assert torch.equal(chosen, b.nonzero().reshape(-1))
            # the smaller representation: indices below 1/32 density, bits above, nothing at 0 / all
            expected = "none" if m.count == 0 else "all" if m.count == n else \
                "indices" if 4 * m.count < -(-n // 8) else "bits"
            assert m.kind == expected, (n, density, m)
            assert m.nbytes == {"none": 0, "all": 0, "indices": 4 * m.count, "bits": -(-n // 8)}[m.kind]
            other = torch.rand(n, generator=g) < 0.3
            assert m.intersection(Mask.from_bool(other)) == int((b & other).sum())


def test_select_square_packed_and_k_of_total_match_the_bool_select():
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=g) * s for n, s in [(1000, 1.0), (37, 1e-3), (CHUNK + 5, 0.1)]]
    grads[0][:50] = 0.0
    grads[1] = grads[1].to(torch.bfloat16)
    positions = [0, 1000, 1037]
    squares = [x.float().square() for x in grads]
    total = sum(x.numel() for x in grads)
    expected = global_topk_mask(squares, positions, round(0.1 * total))
    got = global_topk_mask(grads, positions, lambda n: round(0.1 * n), square=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    masks, k, n = topk_masks(grads, positions, lambda n: round(0.1 * n), square=True)
    assert (k, n) == (round(0.1 * total), total)
    assert all(torch.equal(m.to_bool(), e) for m, e in zip(masks, expected))
    assert [m.kind for m in masks] == ["bits", "none", "bits"]   # the 1e-3-scaled piece has none of the top


def test_select_negative_zero_after_the_first_chunk_and_negative_nan():
    x = torch.rand(CHUNK + 100)
    x[CHUNK + 3] = -0.0
    x[5] = 0.0
    reference = global_topk_mask([x.abs()], [0], 1000)[0]
    assert torch.equal(global_topk_mask([x], [0], 1000)[0], reference)
    assert x[CHUNK + 3].item() == 0 and str(x[CHUNK + 3].item()) == "-0.0", "the caller's scores must not change"
    y = torch.rand(100)
    y[3] = -float("nan")
    with pytest.raises(ValueError, match="NaN, inf or negative"):
        global_topk_mask([y], [0], 10)


def _weights_with_edge_cases(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 0.05
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 2.0 ** -10, 3.4e38, 1.0 - 2 ** -24, 0.5])
    w[:special.numel()] = special
    return w


@pytest.mark.parametrize("rho", [0.05, 30.0])
def test_restore_is_exact_and_small(rho):
    """Restore is bit-exact (zeros, -0.0, subnormals, exponent boundaries, sign flips); with a small
    ρ the restore data is ~2 bytes per perturbed entry, with a huge one it falls back to the values."""
    n = 3 * CHUNK // 2
    g = torch.Generator().manual_seed(2)
    w0 = _weights_with_edge_cases(n, 3)
    grads = [torch.randn(n, generator=g), torch.randn(1000, generator=g)]
    grads[0][:10] = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 0.0, -1.0, 1.0])
    weights = [w0.clone(), torch.randn(1000, generator=g)]
    views = _views(grads, [w.clone() for w in weights], [True, False])
    before = [v.weights.clone() for v in views]
    mask = torch.rand(n, generator=g) < 0.1
    mask[:10] = True
    p = perturb(views, {("p0", 0): mask}, rho=rho, eps=1e-12, norm="full", excluded_mode="dense", adaptive=False,
                state_budget=0.0)   # the codec on every group
    assert any(not torch.equal(v.weights, b) for v, b in zip(views, before)), "nothing was perturbed"
    restore(views, p)
    for v, b in zip(views, before):
        assert torch.equal(v.weights.view(torch.int32), b.view(torch.int32)), "restore is not bit-exact"
    perturbed = int(mask.sum())
    kinds = {("values" if c.values is not None else 8 * c.low.shape[1]) for c in p.saved_of(("p0", 0))}
    assert p.saved_of(("p1", n))[0].values is not None   # a small view keeps its values
    large = p.nbytes - 4 * 1000
    if rho < 1:
        assert large < 3.2 * perturbed and "values" not in kinds, (large, kinds)   # low 16/24 bits
    else:
        assert "values" in kinds, kinds   # ‖e‖ ~ |w|: the plain values are cheapest
    assert large <= 4 * perturbed + 8 * 3, large             # never worse than the values


def _many_views(seed: int = 5, adaptive: bool = False):
    """Views of mixed sizes (several sharing a gather buffer, one over two chunks, tiny excluded
    ones perturbed densely, one excluded view above SMALL) with their κ = 0.1 masks."""
    g = torch.Generator().manual_seed(seed)
    sizes = [CHUNK + 4096, 70000, 3000, 65536, 300, 40000, 17, 20000]
    eligible = [True, True, True, True, False, True, False, False]
    grads = [torch.randn(n, generator=g) for n in sizes]
    grads[-1][::3] = 0.0   # the excluded view above SMALL: perturbed only where g != 0
    weights = [_weights_with_edge_cases(n, seed + i) for i, n in enumerate(sizes)]
    if adaptive:   # |w|² g of 3.4e38 overflows: keep the other edge cases
        for w in weights:
            w[w.abs() > 1e30] = 0.5
    views = _views(grads, weights, eligible)
    masks = {v.key: torch.rand(v.numel, generator=g) < 0.1 for v in views if v.eligible}
    return views, masks


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("budget", [0.0, 1 / 8, 1.0])
def test_grouped_perturbation_is_the_same_whatever_the_restore_data(budget, adaptive):
    """The perturbed entries of many views share gather buffers; whether a buffer keeps the codec
    or the plain values (``state_budget``) changes neither the perturbed weights (bit for bit)
    nor the exact restore, and the restore data plus the masks stay within the budget wherever
    encoding everything fits it."""
    views, masks = _many_views(adaptive=adaptive)
    before = [v.weights.clone() for v in views]
    ref_views, _ = _many_views(adaptive=adaptive)
    ref = perturb(ref_views, masks, rho=0.05, eps=1e-12, norm="full", excluded_mode="dense", adaptive=adaptive,
                  state_budget=0.0)
    p = perturb(views, masks, rho=0.05, eps=1e-12, norm="full", excluded_mode="dense", adaptive=adaptive,
                state_budget=budget)
    for v, r in zip(views, ref_views):
        assert torch.equal(v.weights.view(torch.int32), r.weights.view(torch.int32)), v.name
    assert p.grad_norm == ref.grad_norm and p.perturbation_norm == ref.perturbation_norm
    assert len(p.groups) > 1 and any(len(group.pieces) > 1 for group in p.groups)   # shared buffers
    encoded = [group.saved.values is None for group in p.groups]
    local = 4 * sum(v.numel for v in views)
    mask_bytes = sum(Mask.from_bool(m).nbytes for m in masks.values())
    if budget == 0.0:
        assert sum(encoded) >= len(encoded) - 2   # all but the tiny buffers (values below SMALL)
    elif budget == 1.0:
        assert not any(encoded)
    else:
        assert any(encoded) and not all(encoded)
        assert mask_bytes + p.nbytes <= local / 8 < mask_bytes + 4 * p.entries
    assert ref.nbytes <= p.nbytes <= 4 * p.entries
    restore(views, p)
    for v, b in zip(views, before):
        assert torch.equal(v.weights.view(torch.int32), b.view(torch.int32)), f"{v.name}: restore is not bit-exact"


@pytest.mark.parametrize("adaptive", [False, True])
def test_sums_taken_at_the_perturbation_match_the_norm_pass(adaptive, monkeypatch):
    """Without communication and with the full norm, ‖e‖ comes from the gathered entries rather than
    the norm pass: the same weights bit for bit, and the same ‖e‖ to fp32 rounding."""
    import fsam_dist.core.fsam as core

    kwargs = dict(rho=0.05, eps=1e-12, norm="full", excluded_mode="dense", adaptive=adaptive)
    views, masks = _many_views(adaptive=adaptive)
    p = perturb(views, masks, **kwargs)
    monkeypatch.setattr(core, "communicates", lambda group: True)   # the one-all-reduce path
    ref_views, _ = _many_views(adaptive=adaptive)
    ref = perturb(ref_views, masks, **kwargs)
    for v, r in zip(views, ref_views):
        assert torch.equal(v.weights, r.weights), v.name
    assert p.grad_norm == ref.grad_norm
    assert p.perturbation_norm == pytest.approx(ref.perturbation_norm, rel=1e-6)
    if not adaptive:   # ‖e‖ = ρ ‖g over the perturbed entries‖ / ‖g‖
        dense = [v for v in views if not v.eligible]
        sq = sum(float(v.grad[masks[v.key]].double().square().sum()) for v in views if v.eligible) + \
            sum(float(v.grad.double().square().sum()) for v in dense)
        assert p.perturbation_norm == pytest.approx(0.05 * math.sqrt(sq) / p.grad_norm, rel=1e-6)


def test_mask_selection_of_one_chunk_is_what_by_chunk_yields():
    g = torch.Generator().manual_seed(9)
    n = 2 * CHUNK + 1000
    dense = torch.rand(n, generator=g) < 0.3
    sparse = torch.rand(n, generator=g) < 0.01
    masks = [Mask.from_bool(dense), Mask.from_bool(sparse), Mask.from_bool(dense).as_blocks(),
             Mask.full(n), Mask.empty(n)]
    assert [m.kind for m in masks] == ["bits", "indices", "blocks", "all", "none"]
    for m in masks:
        for c, (_, _, sel) in enumerate(m.by_chunk()):
            got = m.selection(c)
            if sel is None or isinstance(sel, slice):
                assert got == sel, (m.kind, c)
            else:
                assert got.dtype == torch.int64 and torch.equal(got, sel), (m.kind, c)


def test_restore_keeps_values_for_non_fp32_weights():
    w = torch.randn(100, dtype=torch.float64)
    views = [ShardView("p0", w.clone(), torch.randn(100, dtype=torch.float64), 0, True)]
    p = perturb(views, {("p0", 0): torch.ones(100, dtype=torch.bool)}, rho=0.1, eps=1e-12, norm="full",
                excluded_mode="dense", adaptive=False)
    assert p.nbytes == 100 * 8
    restore(views, p)
    assert torch.equal(views[0].weights, w)


def test_dense_excluded_parameters_touch_only_nonzero_gradients():
    n = 1 << 15   # above fsam.SMALL: smaller excluded views are perturbed on every entry
    grads = [torch.zeros(n), torch.ones(8)]
    grads[0][[3, 40]] = torch.tensor([2.0, -1.0])
    w = [torch.randn(n), torch.randn(8)]
    views = _views(grads, [x.clone() for x in w], [False, True])
    p = perturb(views, {("p1", n): torch.ones(8, dtype=torch.bool)}, rho=0.1, eps=1e-12, norm="full",
                excluded_mode="dense", adaptive=False)
    moved = (views[0].weights != w[0]).nonzero().reshape(-1).tolist()
    assert moved == [3, 40]
    assert p.grad_norm == pytest.approx(math.sqrt(4 + 1 + 8))
    assert p.masks[("p0", 0)].kind == "indices"


@pytest.mark.parametrize("rho,per_entry", [(1e-4, 2.2), (0.05, 3.2)])
def test_fsam_state_is_an_eighth_of_a_full_copy_at_keep_ratio_0_1(rho, per_entry):
    """At κ = 0.1 the mask is held as blocks (a uint8 offset per kept entry and an int32 count per
    256 entries: 0.1 n + n/64 bytes, below the n/8 of bits, and its positions need no scan) and
    the restore data 2-3 bytes per perturbed entry: together at most 1/8 of the 4 n bytes SAM's
    full copy of the weights takes.

    |e| / |w| ≈ ρ · 2 / (σ_w √N) decides between 2 bytes (low 16 bits) and 3 (low 24): here
    N = 2^18, σ_w = 0.05, so ρ = 1e-4 gives the ratio of ρ = 0.05 on T5-3B (~2^-14: 16 bits, a few
    % exceptions), and ρ = 0.05 the ratio of this tiny problem (~2^-8: 24 bits)."""
    n = 1 << 18
    g = torch.Generator().manual_seed(4)
    views = [ShardView("w", torch.randn(n, generator=g) * 0.05, torch.randn(n, generator=g) * 1e-3, 0, True)]
    fsam = FSAM(rho=rho, keep_ratio=0.1)
    fsam.ascend(views, step=0)
    sizes = fsam.state_nbytes()
    assert sizes["mask"] == round(0.1 * n) + 4 * (n // 256) < n // 8
    assert sizes["restore"] < per_entry * round(0.1 * n), sizes
    assert sizes["total"] <= 4 * n / 8, sizes
    fsam.descend(views)
    assert fsam.state_nbytes()["restore"] == 0
    # bool masks for callers, the compact ones inside
    assert fsam.masks[("w", 0)].dtype == torch.bool and fsam.packed_masks[("w", 0)].kind == "blocks"


def test_state_dict_roundtrip():
    g = [torch.tensor([0.1, -3.0, 0.2]), torch.tensor([2.0, -0.5])]
    fsam = FSAM(rho=0.1, keep_ratio=0.4)
    fsam.ascend(_views(g), step=0)
    buffer = io.BytesIO()
    torch.save(fsam.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)   # as the checkpoint loader reads it
    assert all(isinstance(m, dict) for _, _, m in state["masks"])
    again = FSAM(rho=0.1, keep_ratio=0.4)
    again.load_state_dict(state)
    assert again.mask_step == 0 and again.masks.keys() == fsam.masks.keys()
    assert all(torch.equal(again.masks[k], m) for k, m in fsam.masks.items())


# ---- perturbation interval (issue 8) ----------------------------------------------------------------

def test_interval_one_is_every_step_and_the_default():
    runs = []
    for kwargs in ({}, {"interval": 1}):
        model, _, backend, fsam = make_run(rho=0.05, keep_ratio=0.2, mask_interval=2, **kwargs)
        recorder = RecordingBackend(model, backend.optimizer)
        passes = []
        for step in range(4):
            recorder.forward_weights.clear()
            stats = train_step(recorder, seq2seq_loss_sum, batches(step), step=step,
                               count_targets=count_target_tokens, fsam=fsam)
            passes.append((len(recorder.forward_weights), stats["perturbed"], stats.get("mask_refreshed", 0)))
        assert passes == [(2, 1, 1), (2, 1, 0), (2, 1, 1), (2, 1, 0)]
        runs.append(state(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_interval_k_off_steps_are_plain_adamw_bit_for_bit():
    """interval 3: steps 1, 2, 4, 5, 7 are exactly the base optimizer's step (one pass); steps 0,
    3, 6 are FSAM steps identical to those of an FSAM driven only at those steps."""
    k = 3
    model, _, backend, fsam = make_run(rho=0.05, keep_ratio=0.1, mask_interval=6, interval=k)
    recorder = RecordingBackend(model, backend.optimizer)
    ref_model, _, ref_backend, ref_fsam = make_run(rho=0.05, keep_ratio=0.1, mask_interval=6)
    for step in range(8):
        recorder.forward_weights.clear()
        stats = train_step(recorder, seq2seq_loss_sum, batches(step), step=step,
                           count_targets=count_target_tokens, fsam=fsam)
        ref_stats = train_step(ref_backend, seq2seq_loss_sum, batches(step), step=step,
                               count_targets=count_target_tokens, fsam=ref_fsam if step % k == 0 else None)
        assert len(recorder.forward_weights) == (2 if step % k == 0 else 1), step
        assert stats["perturbed"] == int(step % k == 0) and ("perturbed_loss" in stats) == (step % k == 0)
        assert stats["loss"] == ref_stats["loss"]
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert torch.equal(p, q), (step, name)


def test_interval_mask_refresh_schedule_counts_optimizer_steps():
    """mask_interval 4, interval 3: the mask is refreshed at the first perturbing step at or after
    each multiple of 4 -- steps 0, 6 (for 4), 9 (for 8), 12; a multiple that falls on a perturbing
    step refreshes there."""
    model, _, backend, fsam = make_run(rho=0.05, keep_ratio=0.1, mask_interval=4, interval=3)
    refreshed = []
    for step in range(16):
        stats = train_step(backend, seq2seq_loss_sum, batches(step), step=step, count_targets=count_target_tokens,
                           fsam=fsam)
        if stats.get("mask_refreshed"):
            refreshed.append(step)
    assert refreshed == [0, 6, 9, 12]
    assert fsam.mask_step == 12


def test_interval_config_builds_into_fsam():
    assert validate(FSAMConfig, {"interval": 4}).build().interval == 4
    assert validate(FSAMConfig, {}).build().interval == 1
    for bad in (0, -1, 1.5, "often"):
        with pytest.raises(ConfigError, match="fsam.interval"):
            validate(FSAMConfig, {"interval": bad}, prefix="fsam.")
    with pytest.raises(ValueError, match="interval"):
        FSAM(interval=0)


@pytest.mark.parametrize("spread", [2 ** 7, 2 ** 10, 2 ** 16 - 1, 2 ** 16, 2 ** 20, 2 ** 24, 2 ** 30])
def test_restore_with_carry_bits_is_exact_for_every_move(spread):
    """The carry encoding at its edges: bit patterns moved up and down by up to ``spread`` units in
    the last place (so across the low-16/24-bit boundary both ways, exactly 2^16, and sign flips
    around ±0), restored bit for bit; each chunk never costs more than the plain values."""
    g = torch.Generator().manual_seed(spread)
    n = 2 * (SMALL + 1)
    old = (torch.randn(n, generator=g) * 0.05).view(torch.int32)
    old[:4] = torch.tensor([0.0, -0.0, 1e-44, -1e-44]).view(torch.int32)
    move = torch.randint(-spread, spread + 1, (n,), generator=g, dtype=torch.int64)
    move[4:8] = torch.tensor([2 ** 16, -(2 ** 16), 2 ** 16 - 1, -(2 ** 16 - 1)])
    moved = (old.to(torch.int64) + move)
    # stay inside the finite same-sign patterns; ±0 get pushed across the sign by a float add
    moved = moved.clamp(-(2 ** 31) + 2 ** 24 + 1, 2 ** 31 - 2 ** 24 - 1).to(torch.int32)
    new = moved.view(torch.float32).clone()
    new[:4] = torch.tensor([-1e-30, 1e-30, -1e-40, 1e-40])
    original = old.view(torch.float32).clone()
    saved = save(original.clone(), new)
    back = restored(new.clone(), saved)
    assert torch.equal(back.view(torch.int32), original.view(torch.int32))
    assert saved.nbytes <= 4 * n
    if spread < 2 ** 8:
        # the low byte + carry; exceptions: the ±0 sign flips and the four moves of ~2^16
        assert saved.low.shape[1] == 1 and saved.carry is not None, saved
        assert saved.nbytes <= n + -(-n // 8) + 8 * 8, saved.nbytes
    elif spread < 2 ** 16:
        # the low 16 bits + carry with 6 exceptions (±0 flips, ±2^16)
        assert saved.low.shape[1] == 2 and saved.carry is not None, saved
        assert saved.nbytes <= 2 * n + -(-n // 8) + 8 * 6, saved.nbytes


# ---- LookSAM: fsam.reuse_direction (issue 8) ------------------------------------------------------


def _looksam_reference(steps: int, k: int, rho: float, alpha: float | None) -> dict:
    """LookSAM (Liu et al. 2022, Alg. 1) with SAM's perturbation, written out on one model;
    ``alpha`` None: α = ‖g_v‖/‖g‖ of the perturbed step (the reused part keeps its size)."""
    ref = tiny_t5(seed=0)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    params = list(ref.parameters())
    g_v = None

    def grads(mb, total):
        opt.zero_grad()
        (seq2seq_loss_sum(ref, mb) / total).backward()
        return [p.grad.detach().clone() for p in params]

    def norm(ts):
        return math.sqrt(sum(float(t.double().square().sum()) for t in ts))

    def dot(a, b):
        return sum(float(torch.dot(x.double().reshape(-1), y.double().reshape(-1))) for x, y in zip(a, b))

    for step in range(steps):
        mb = batches(step)[0]
        total = count_target_tokens(mb)
        g = grads(mb, total)
        if step % k == 0:
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, x in zip(params, g):
                    p.add_(x * (rho / (norm(g) + 1e-12)))
            g_s = grads(mb, total)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            coef = dot(g, g_s) / dot(g, g)
            g_v = [s - coef * x for s, x in zip(g_s, g)]
            g_look = norm(g)
            final = g_s
        elif alpha is None:
            final = [x + norm(g) / g_look * v for x, v in zip(g, g_v)]
        else:
            final = [x + alpha * norm(g) / norm(g_v) * v for x, v in zip(g, g_v)]
        for p, x in zip(params, final):
            p.grad = x
        opt.step()
    return state(ref)


@pytest.mark.parametrize("alpha", [0.7, None])
def test_reuse_direction_is_looksam(alpha):
    """keep 1, nothing excluded, interval 3, α 0.7 (LookSAM's) or the measured ‖g_v‖/‖g‖: the same
    weights as LookSAM written out."""
    model, _, backend, fsam = make_run(rho=0.05, keep_ratio=1.0, mask_interval=100, interval=3,
                                       reuse_direction=True, reuse_alpha=alpha)
    backend.eligible = {n: True for n in backend.eligible}
    held = []   # LookSAM's buffer bytes right after each perturbation (g kept, old g_v freed)
    ascend = fsam.ascend
    fsam.ascend = lambda *a, **k: (ascend(*a, **k), held.append(fsam.state_nbytes()["reuse"]))[0]
    reused = []
    for step in range(7):
        stats = train_step(backend, seq2seq_loss_sum, batches(step), step=step, count_targets=count_target_tokens,
                           fsam=fsam)
        reused.append(stats.get("reused_direction", 0))
        if step % 3:
            assert stats["reuse_scale"] > 0
        else:
            assert 0 < stats["sharpness_ratio"] < 1
    assert reused == [0, 1, 1, 0, 1, 1, 0]
    expected = _looksam_reference(7, 3, 0.05, alpha)
    plain = _looksam_reference(7, 3, 0.05, 0.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the reused direction changed the result (else the comparison above proves nothing)
    assert max(float((expected[n] - plain[n]).abs().max()) for n in expected) > 2e-5
    one_copy = 4 * sum(p.numel() for p in model.parameters())
    assert fsam.state_nbytes()["reuse"] == one_copy and held == [one_copy] * 3, held


def test_reuse_alpha_zero_is_the_interval_bit_for_bit_and_resume_keeps_g_v():
    runs = []
    for kwargs in ({"reuse_direction": True, "reuse_alpha": 0.0}, {}):
        model, _, backend, fsam = make_run(rho=0.05, keep_ratio=0.1, mask_interval=4, interval=2, **kwargs)
        for step in range(5):
            train_step(backend, seq2seq_loss_sum, batches(step), step=step, count_targets=count_target_tokens,
                       fsam=fsam)
        runs.append(state(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])

    # g_v travels in the state dict (weights_only-safe): resuming mid-interval continues identically
    kwargs = dict(rho=0.05, keep_ratio=0.1, mask_interval=4, interval=3, reuse_direction=True)
    model, opt, backend, fsam = make_run(**kwargs)
    for step in range(4):
        train_step(backend, seq2seq_loss_sum, batches(step), step=step, count_targets=count_target_tokens, fsam=fsam)
    buffer = io.BytesIO()
    torch.save({"fsam": fsam.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2, backend2, fsam2 = make_run(**kwargs)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    fsam2.load_state_dict(saved["fsam"])
    for step in range(4, 6):
        for b, f in ((backend, fsam), (backend2, fsam2)):
            stats = train_step(b, seq2seq_loss_sum, batches(step), step=step, count_targets=count_target_tokens,
                               fsam=f)
            assert stats["reused_direction"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_reuse_direction_config():
    built = validate(FSAMConfig, {"interval": 5, "reuse_direction": True, "reuse_alpha": 0.5}).build()
    assert built.reuse_direction and built.reuse_alpha == 0.5
    assert validate(FSAMConfig, {"interval": 5, "reuse_direction": True}).build().reuse_alpha is None
    with pytest.raises(ConfigError, match="reuse_direction.*interval"):
        validate(FSAMConfig, {"reuse_direction": True}, prefix="fsam.")
    with pytest.raises(ConfigError, match="fsam.reuse_alpha"):
        validate(FSAMConfig, {"interval": 2, "reuse_direction": True, "reuse_alpha": -1}, prefix="fsam.")
    with pytest.raises(ValueError, match="reuse_direction needs interval"):
        FSAM(reuse_direction=True)


# ---- positions held as blocks (issue 19): the in-memory mask can never go stale ---------------------


def test_blocks_mask_matches_bits_and_checkpoints_as_bits():
    """A 'blocks' mask holds the same entries as the bool mask it came from, chunk by chunk and as
    a whole (partial last blocks and chunks included), is smaller than bits below density 7/64,
    and is checkpointed exactly as :meth:`Mask.from_bits` would store it (format unchanged)."""
    from fsam_dist.core.masks import BLOCK, with_positions

    g = torch.Generator().manual_seed(7)
    for n in (SMALL + 3, 1000 * BLOCK + 17, CHUNK + 13, 2 * CHUNK + BLOCK):
        for density in (0.02, 0.1, 0.3):
            b = torch.rand(n, generator=g) < density
            b[-1] = True   # the last, partial block holds an entry
            m = Mask.from_bool(b)
            blocks = m.as_blocks()
            assert blocks.kind == "blocks" and blocks.count == m.count == int(b.sum())
            assert torch.equal(blocks.to_bool(), b)
            assert blocks.nbytes == m.count + 4 * -(-n // BLOCK)
            for (s, e, sel), (s2, e2, sel2) in zip(blocks.by_chunk(), m.by_chunk()):
                assert (s, e) == (s2, e2)
                want = torch.nonzero(b[s:e]).reshape(-1) + s
                assert torch.equal(sel if sel is not None else torch.zeros(0, dtype=torch.int64), want)
                assert torch.equal(sel2 if sel2 is not None else torch.zeros(0, dtype=torch.int64), want)
            other = Mask.from_bool(torch.rand(n, generator=g) < 0.2)
            assert blocks.intersection(other) == m.intersection(other)
            st, st_old = blocks.state(), m.state()
            assert st["kind"] == st_old["kind"] and st["count"] == st_old["count"]
            assert torch.equal(st["data"], st_old["data"])
            assert torch.equal(Mask.from_state(st).to_bool(), b)
            chosen = with_positions({"x": m})["x"]
            assert chosen.kind == ("blocks" if m.kind == "bits" and blocks.nbytes <= m.nbytes else m.kind)
    # FSAM's masks together: a dense view gets blocks (larger than its bits) when a sparse one
    # (indices) leaves room within 1/8 byte per entry; the total never exceeds that
    n = 4 * CHUNK
    dense, sparse = torch.rand(n, generator=g) < 0.19, torch.rand(n, generator=g) < 0.01
    masks = with_positions({"dense": Mask.from_bool(dense), "sparse": Mask.from_bool(sparse)})
    assert (masks["dense"].kind, masks["sparse"].kind) == ("blocks", "indices")
    assert masks["dense"].nbytes > n // 8 and sum(m.nbytes for m in masks.values()) <= 2 * n // 8
    masks = with_positions({"dense": Mask.from_bool(dense), "other": Mask.from_bool(dense.roll(1))})
    assert {m.kind for m in masks.values()} == {"bits"}   # 0.19 everywhere: blocks would not fit


def _reference_step(views, bool_masks, rho):
    """perturb() on copies of the views with explicit bool masks (bit-packed, decoded by nonzero):
    the weights FSAM's perturbation must produce."""
    copies = [ShardView(v.name, v.weights.clone(), v.grad.clone(), v.position, v.eligible) for v in views]
    perturb(copies, bool_masks, rho=rho, eps=1e-12, norm="full", excluded_mode="dense", adaptive=False)
    return [c.weights for c in copies]


@pytest.mark.parametrize("interval,reuse", [(1, False), (2, True)])
def test_positions_follow_every_refresh_resume_and_skip(interval, reuse):
    """Across refreshes, a resume from :meth:`FSAM.state_dict` between refreshes, a skipped step
    (no ascend) and LookSAM's plain steps, every perturbation touches exactly the entries of the
    current global top-k of g² at the last refresh, bit for bit as the reference with explicit
    bool masks, and every restore is bit-exact: a stale position cache would move other entries."""
    n = [CHUNK + 4 * SMALL + 5, 3 * SMALL, 2 * SMALL + 1]   # a 2-chunk view, two 1-chunk views
    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(k, generator=g) * 0.05 for k in n]
    rho, keep = 0.05, 0.1
    fsam = FSAM(rho=rho, keep_ratio=keep, mask_interval=3, interval=interval, reuse_direction=reuse)
    expected_masks = None
    checked = 0
    for step in range(10):
        grads = [torch.randn(k, generator=g) * (1 + step) for k in n]
        views = _views(grads, weights, [True, True, False])
        if step == 5:   # skipped step: pass 1 non-finite, no ascend at all
            continue
        if step == 7:   # resume between refreshes: a new FSAM from the checkpointed state
            buffer = io.BytesIO()
            torch.save(fsam.state_dict(), buffer)
            buffer.seek(0)
            fsam = FSAM(rho=rho, keep_ratio=keep, mask_interval=3, interval=interval, reuse_direction=reuse)
            fsam.load_state_dict(torch.load(buffer, weights_only=True))
        if not fsam.perturbs_at(step):
            fsam.reuse(views)
            continue
        if fsam.refresh_due(step):
            eligible = [v for v in views if v.eligible]
            top = global_topk_mask([v.grad.square() for v in eligible], [v.position for v in eligible],
                                   round(keep * sum(v.numel for v in eligible)))
            expected_masks = {v.key: t for v, t in zip(eligible, top)}
        want = _reference_step(views, expected_masks, rho)
        before = [w.clone() for w in weights]
        fsam.ascend(views, step)
        assert all(m.kind == "blocks" for m in fsam.packed_masks.values())
        for w, r in zip(weights, want):
            assert torch.equal(w.view(torch.int32), r.view(torch.int32)), f"step {step}: not the reference's w + e"
        if reuse:
            fsam.look(views)
        fsam.descend(views)
        for w, b in zip(weights, before):
            assert torch.equal(w.view(torch.int32), b.view(torch.int32)), f"step {step}: restore not bit-exact"
        checked += 1
    assert checked >= 3
