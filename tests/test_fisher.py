"""The 'empirical' Fisher: batched per-example gradients (torch.func) against the per-example loop."""

from __future__ import annotations

import warnings

import pytest
import torch

import fsam_dist.train.step as step_module
from fsam_dist.core import FSAM, compute_mask
from fsam_dist.shards.local import LocalBackend
from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
from fsam_dist.train.step import empirical_fisher, train_step

from .helpers import run_distributed, synthetic_batch, tiny_t5

REL = 1e-4
"""Per score tensor: max |s − s_loop| ≤ REL · max s_loop. A gradient entry computed with another
summation order (bmm per example against mm, n ≲ 10² terms here) is off by ≲ n·u ≈ 1e-5 relative
to the largest terms (tests/parity.py); its square by twice that, and a sum of N positive squares
adds N·u. 1e-4 leaves ≥ 5× above that; dropping one of the N = 9 examples moves the scores by
~10 % (the control below)."""


def examples() -> list[dict]:
    """Single examples of two shapes (source 7 and 9 tokens), targets padded with -100, and one
    example twice (a chunk of identical examples)."""
    short = [synthetic_batch(1, seed=s) for s in range(5)]
    long = [synthetic_batch(1, seed=50 + s, src_len=9) for s in range(3)]
    return short + long + [long[-1]]


def backend_for(seed: int = 3, dropout: float = 0.1) -> LocalBackend:
    model = tiny_t5(seed=seed, dropout=dropout)
    model.train()
    return LocalBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-2))


def largest_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max over tensors of max |got − want| / max want."""
    assert len(got) == len(want)
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))


def test_batched_equals_the_loop_and_keeps_its_semantics(monkeypatch):
    """Same scores as one backward per example, to fp32 rounding; eval mode, the RNG untouched, no
    gradients left, training mode restored -- and the batched path really ran (no fallback)."""
    backend, exs = backend_for(), examples()
    rng = torch.get_rng_state()
    loop = empirical_fisher(backend, seq2seq_loss_sum, exs, batched=False)
    assert torch.equal(torch.get_rng_state(), rng)

    def no_loop(*a, **k):
        raise AssertionError("the batched Fisher fell back to the loop")

    monkeypatch.setattr(step_module, "_looped_fisher", no_loop)
    modes = []
    seen = lambda model, batch: modes.append(model.training) or seq2seq_loss_sum(model, batch)   # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        batched = {chunk: empirical_fisher(backend, seen, exs, chunk=chunk) for chunk in (2, 4, None)}
    assert modes and not any(modes), "the batched Fisher must run the model in eval mode (no dropout)"
    assert torch.equal(torch.get_rng_state(), rng)
    assert backend.module.training
    assert all(p.grad is None for p in backend.module.parameters())
    for chunk, scores in batched.items():
        assert [s.shape for s in scores] == [s.shape for s in loop]
        err = largest_error(scores, loop)
        print(f"chunk {chunk}: max |batched − loop| / max loop = {err:.2e}")
        assert err <= REL, f"chunk {chunk}: {err:.2e}"
    # control: the tolerance has power -- one example fewer is far outside it
    monkeypatch.undo()
    fewer = empirical_fisher(backend, seq2seq_loss_sum, exs[:-2], batched=False)
    assert largest_error(fewer, loop) > 100 * REL


def test_batched_mask_is_the_loops_mask():
    backend, exs = backend_for(dropout=0.0), examples()
    backend.forward_backward(seq2seq_loss_sum, synthetic_batch(4, seed=9), 1.0, last=True)
    views = backend.views()
    masks = [compute_mask(views, empirical_fisher(backend, seq2seq_loss_sum, exs, batched=b), 0.1)[0]
             for b in (False, True)]
    assert masks[0].keys() == masks[1].keys()
    for key in masks[0]:
        assert torch.equal(masks[0][key].to_bool(), masks[1][key].to_bool()), key


def test_falls_back_to_the_loop_where_vmap_cannot_run():
    """A loss with data-dependent control flow (``.item()``) cannot run under vmap: the loop's
    scores, bit for bit, with one warning."""
    backend, exs = backend_for(), examples()

    def branchy(model, batch):
        loss = seq2seq_loss_sum(model, batch)
        return loss if loss.item() >= 0 else -loss

    want = empirical_fisher(backend, branchy, exs, batched=False)
    with pytest.warns(RuntimeWarning, match="using one backward per example"):
        got = empirical_fisher(backend, branchy, exs)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---- 2 ranks: the batched path (DDP, ZeRO-1) and the sharded loop (FSDP2, ZeRO-3) ----------------

KINDS = ("ddp", "zero1", "zero3", "fsdp2")


def fisher_examples() -> list[dict]:
    return examples()


def one_step(backend) -> list:
    fsam = FSAM(rho=0.05, keep_ratio=0.1, mask_interval=100, fisher="empirical")
    stats = train_step(backend, seq2seq_loss_sum, [synthetic_batch(4, seed=11)], step=0,
                       count_targets=count_target_tokens, fsam=fsam, fisher_examples=fisher_examples)
    assert stats["skipped"] == 0
    return [(name, pos, m.clone()) for (name, pos), m in fsam.masks.items()]


def per_rank(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build
    from fsam_dist.train.deepspeed_setup import build_deepspeed
    from fsam_dist.train.fsdp_wrap import wrap_fsdp

    import deepspeed

    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for kind in KINDS:
        model = tiny_t5(seed=3)
        model.train()
        factory = lambda params: torch.optim.AdamW(params, lr=1e-2)   # noqa: E731
        if kind == "ddp":
            backend = LocalBackend(DistributedDataParallel(model), factory(model.parameters()))
        elif kind == "fsdp2":
            backend = wrap_fsdp(model, version=2, optimizer_factory=factory)
        else:
            ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                  "zero_optimization": {"stage": int(kind[-1])}, "steps_per_print": 10 ** 9}
            backend = build_deepspeed(model, ds, factory(model.parameters()))
        whole = backend.whole_model() is not None
        out[kind] = {"batched": whole, "mask": one_step(backend)}
    return out


def laid_out(pieces_per_rank: list[list], total: int) -> torch.Tensor:
    """Every rank's (name, position, mask) pieces by global position (-1: none); pieces that
    overlap (replicated ranks) must agree."""
    flat = torch.full((total,), -1, dtype=torch.int8)
    for pieces in pieces_per_rank:
        for name, pos, mask in pieces:
            where, new = flat[pos:pos + mask.numel()], mask.to(torch.int8)
            clash = (where != -1) & (where != new)
            assert not bool(clash.any()), f"{name}: ranks disagree on the mask"
            where.copy_(new)
    return flat


def test_sharded_loop_and_batched_ranks_give_the_single_process_mask():
    results = run_distributed(per_rank, 2, timeout=600)
    model = tiny_t5(seed=3)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    want = laid_out([one_step(LocalBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-2)))], total)
    assert int((want == 1).sum()) > 0
    for kind in KINDS:
        assert all(r[kind]["batched"] == (kind in ("ddp", "zero1")) for r in results), kind
        got = laid_out([r[kind]["mask"] for r in results], total)
        assert torch.equal(got, want), f"{kind}: {int((got != want).sum())} mask entries differ"
