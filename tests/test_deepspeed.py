"""DeepSpeed ZeRO 0/1/2/3 adapter: FSAM on 2-3 real gloo ranks equals the single-process run.

Every distributed case trains a tiny model on the same global batches as a single-process
reference (``LocalBackend``, the same torch AdamW and LR schedule, the global batch cut into the
same world × GAS micro-batches) and must end at the same weights; the FSAM mask after the first
refresh, gathered from every rank's pieces by global position, must be the reference's mask.
All cases of a world size run in one spawned run (one engine after another) to amortise start-up.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import pytest
import torch

from fsam_dist.core import FSAM
from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build
from fsam_dist.shards.local import LocalBackend
from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
from fsam_dist.train.step import train_step

from .helpers import run_distributed, split_batch, synthetic_batch, tiny_t5
from .parity import assert_bf16_close, assert_bf16_not_close, assert_not_parity, assert_parity

os.environ.setdefault("OMP_NUM_THREADS", "1")   # inherited by the spawned ranks

STEPS = 7
GAS = 2
GLOBAL_BATCH = 12          # 2 ranks × 2 micro-batches × 3 examples, or 3 ranks × 2 × 2
LR = 1e-2
FSAM_KW = dict(rho=0.05, keep_ratio=0.1, mask_interval=5)   # mask refreshed at steps 0 and 5
RESUME_AT = 4              # resumed runs load the checkpoint written before this step (and refresh after it)
NAN_STEPS = {3: (1, 0), 6: (0, 1)}
"""step → (rank, pass) whose loss is NaN in the 'skip' cases: step 3 is skipped after pass 1,
step 6 after pass 2 (the perturbation must be undone first)."""


class Case(NamedTuple):
    model: str
    stage: int
    rho: float | None = FSAM_KW["rho"]   # None: plain AdamW, no FSAM
    clip: float = 0.0
    nan_plan: dict | None = None
    config: dict | None = None          # merged into the DeepSpeed config
    fisher: str = "batch"
    looksam: bool = False               # fsam.interval 3 with reuse_direction (LookSAM)


BF16 = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
# ZeRO-3 keeps parameters under this many entries gathered between steps ("persistent"); 100 makes
# the tiny T5's layer norms persistent and its matrices not (the default makes all persistent).
MIXED_PERSISTENCE = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100}}

CASES_2 = {
    **{f"t5-z{s}": Case("t5", s) for s in (0, 1, 2, 3)},
    # Clipping: the engine's own at stage 0, DeepSpeedZeroOptimizer's (one class for stages 1 and 2,
    # the adapter's "fragments" layout at both) in t5-z2-clip-looksam, stage 3's in t5-z3-clip-skip.
    "t5-z0-clip": Case("t5", 0, clip=1.0),
    "t5-z3-clip-skip": Case("t5", 3, clip=1.0, nan_plan=NAN_STEPS),
    "t5-z2-skip": Case("t5", 2, nan_plan=NAN_STEPS),
    "t5-z2-empirical": Case("t5", 2, fisher="empirical"),
    "t5-z2-rho0": Case("t5", 2, rho=0.0),
    "t5-z2-plain": Case("t5", 2, rho=None),
    # bf16 weights, fp32 gradient accumulation: DeepSpeed's BF16_Optimizer at stage 1, and
    # DeepSpeedZeroOptimizer's fp32 partition buffer that accumulates until step() at stage 2.
    **{f"t5-z{s}-bf16-{kind}": Case("t5", s, rho=rho, config=BF16)
       for s in (1, 2) for kind, rho in (("rho0", 0.0), ("plain", None))},
    # FSAM (rho > 0) under bf16 at every stage, against the fp32 run; rho 0 is the control that
    # must fail the same tolerance (a bf16 path that dropped the perturbation).
    **{f"t5-z{s}-bf16": Case("t5", s, config=BF16) for s in (1, 2, 3)},
    "t5-z3-bf16-rho0": Case("t5", 3, rho=0.0, config=BF16),
    # LookSAM: the reused g_v is added to the gradient the engine steps (and clips) with, at the
    # "fragments" layout (stages 1 and 2) and at ZeRO-3 -- there on BART, whose frozen parameters
    # are in the adapters' way (test_gpu_readiness.py runs T5 ZeRO-3 LookSAM, with copied gradients).
    "t5-z2-clip-looksam": Case("t5", 2, clip=1.0, looksam=True),
    "bart-z1": Case("bart", 1),
    "bart-z3-looksam": Case("bart", 3, looksam=True),
}
RESUMED = ("t5-z2", "t5-z3")   # also saved before RESUME_AT and resumed in a fresh engine
CASES_3 = {"t5-z3-mixed": Case("t5", 3, config=MIXED_PERSISTENCE)}


def tiny_bart(seed: int = 0, vocab: int = 48):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=vocab, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, activation_function="gelu",
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=16,
                     pad_token_id=0, bos_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                     forced_eos_token_id=None)
    model = BartForConditionalGeneration(cfg)
    # A key bias adds the same q·b to every score of a query, which softmax ignores: its exact
    # gradient is 0 and the computed one is rounding noise that Adam's normalisation turns into
    # O(lr) updates. Frozen -- which also puts frozen parameters in the adapters' way.
    for name, p in model.named_parameters():
        if name.endswith("k_proj.bias"):
            p.requires_grad_(False)
    return model


def make_model(kind: str, seed: int = 0):
    return {"t5": tiny_t5, "bart": tiny_bart}[kind](seed)


def make_optimizer(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.1 * s))
    return optimizer, scheduler


def make_fsam(case: Case) -> FSAM | None:
    looksam = {"interval": 3, "reuse_direction": True, "reuse_alpha": 0.7} if case.looksam else {}
    return None if case.rho is None else FSAM(**{**FSAM_KW, "rho": case.rho, "fisher": case.fisher, **looksam})


def micro_batches(step: int, world: int, rank: int) -> list[dict]:
    """This rank's GAS micro-batches of the step's global batch (contiguous slices)."""
    mine = split_batch(synthetic_batch(GLOBAL_BATCH, seed=1000 + step), world, rank)
    return [split_batch(mine, GAS, i) for i in range(GAS)]


def fisher_examples() -> list[dict]:
    """Single examples for the 'empirical' Fisher, the same on every rank."""
    batch = synthetic_batch(3, seed=7)
    return [split_batch(batch, 3, i) for i in range(3)]


class NanLoss:
    """``seq2seq_loss_sum``, but NaN on one rank in one pass of the planned steps."""

    def __init__(self, rank: int, plan: dict | None):
        self.rank, self.plan, self.step, self.calls = rank, plan or {}, -1, 0

    def at(self, step: int) -> NanLoss:
        self.step, self.calls = step, 0
        return self

    def __call__(self, model, batch):
        loss = seq2seq_loss_sum(model, batch)
        rank, pass_index = self.plan.get(self.step, (None, None))
        if rank == self.rank and self.calls // GAS == pass_index:
            loss = loss * float("nan")
        self.calls += 1
        return loss


def train(backend, case: Case, fsam: FSAM | None, world: int, rank: int, steps=range(STEPS), *,
          reference: bool = False, on_step=None) -> tuple[list | None, list[int]]:
    """Train ``steps``; returns (the mask after the first refresh as (name, pos, mask) pieces, the
    skipped steps). ``reference``: one process runs all ranks' micro-batches, leaves out the steps
    the NaN plan makes the distributed run skip."""
    loss = NanLoss(rank, None if reference else case.nan_plan)
    first_mask, skipped = None, []
    for step in steps:
        if reference and step in (case.nan_plan or {}):
            continue
        if on_step is not None:
            on_step(step)
        mbs = [mb for r in range(world) for mb in micro_batches(step, world, r)] if reference \
            else micro_batches(step, world, rank)
        stats = train_step(backend, loss.at(step), mbs, step=step, count_targets=count_target_tokens, fsam=fsam,
                           clip_grad_norm=case.clip, fisher_examples=fisher_examples)
        if stats["skipped"]:
            skipped.append(step)
        if fsam is not None and first_mask is None and fsam.masks is not None:
            first_mask = [(name, pos, m.clone()) for (name, pos), m in fsam.masks.items()]
    return first_mask, skipped


def local_backend(case: Case, seed: int = 0) -> LocalBackend:
    net = make_model(case.model, seed)
    optimizer, scheduler = make_optimizer(net)
    return LocalBackend(net, optimizer, scheduler)


def reference(case: Case, world: int) -> dict:
    backend, fsam = local_backend(case), make_fsam(case)
    mask, _ = train(backend, case, fsam, world, 0, reference=True)
    return {"weights": backend.full_state_dict(), "mask": mask}


def ds_config(stage: int, world: int, clip: float, extra: dict | None = None) -> dict:
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // (world * GAS), "gradient_accumulation_steps": GAS,
            "gradient_clipping": clip, "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
            **(extra or {})}


def init_deepspeed() -> None:

    import deepspeed

    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")   # reuses the process group run_distributed made


def ds_backend(case: Case, world: int, seed: int = 0):
    from fsam_dist.train.deepspeed_setup import build_deepspeed

    net = make_model(case.model, seed)
    optimizer, scheduler = make_optimizer(net)
    return build_deepspeed(net, ds_config(case.stage, world, case.clip, case.config), optimizer, scheduler)


def save_before_resume(step: int, *, backend, fsam: FSAM, path: str, saved: dict) -> None:
    if step == RESUME_AT:
        backend.save_state(path)
        saved["fsam"] = fsam.state_dict()


def run_cases(rank: int, world: int, cases: dict, resumed: tuple, checkpoint_dir: str) -> dict:
    """Train every case with its own engine in this one process; rank 0 returns the weights."""
    init_deepspeed()
    out = {}
    for name, case in cases.items():
        backend, fsam = ds_backend(case, world), make_fsam(case)
        saved, path = {}, os.path.join(checkpoint_dir, name)
        save = functools.partial(save_before_resume, backend=backend, fsam=fsam, path=path, saved=saved)
        mask, skipped = train(backend, case, fsam, world, rank, on_step=save if name in resumed else None)
        out[name] = {"weights": backend.full_state_dict(), "mask": mask, "skipped": skipped}
        if name in resumed:
            fresh = ds_backend(case, world, seed=1)   # other initial weights: the checkpoint must replace them
            fresh.load_state(path)
            fsam = make_fsam(case)
            fsam.load_state_dict(saved["fsam"])
            train(fresh, case, fsam, world, rank, steps=range(RESUME_AT, STEPS))
            out[name]["resumed"] = fresh.full_state_dict()
    # DeepSpeed clips inside engine.step(): a different clip_grad_norm must be refused.
    try:
        backend.clip_and_step(0.5)
        out["clip_mismatch"] = None
    except ValueError as err:
        out["clip_mismatch"] = str(err)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_distributed(run_cases, 2, CASES_2, RESUMED, str(tmp_path_factory.mktemp("ckpt2")), timeout=900)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return run_distributed(run_cases, 3, CASES_3, (), str(tmp_path_factory.mktemp("ckpt3")), timeout=600)


def assert_weights_close(got: dict, expected: dict, model: str, label: str) -> float:
    """The parity rule (tests/parity.py) against the common start ``make_model(model)``."""
    assert got.keys() == expected.keys(), f"{label}: state_dict keys differ"
    return assert_parity(got, expected, make_model(model).state_dict(), LR * STEPS, label)


def flat_mask(pieces_per_rank: list[list], total: int) -> torch.Tensor:
    """Lay the (name, position, mask) pieces of every rank out by global position (-1: no piece);
    fails where two pieces overlap."""
    flat = torch.full((total,), -1, dtype=torch.int8)
    for pieces in pieces_per_rank:
        for name, pos, mask in pieces:
            where = flat[pos:pos + mask.numel()]
            assert bool((where == -1).all()), f"mask pieces overlap at {name}"
            where.copy_(mask.to(torch.int8))
    return flat


def assert_mask_equal(results: list[dict], name: str, expected: list, total: int, replicated: bool) -> None:
    """The ranks' mask pieces gathered by position (each rank's on its own where replicated) are the
    reference mask."""
    want = flat_mask([expected], total)
    assert int((want == 1).sum()) > 0
    gathered = [flat_mask([r[name]["mask"]], total) for r in results] if replicated else \
        [flat_mask([r[name]["mask"] for r in results], total)]
    for got in gathered:
        assert torch.equal(got, want), (f"{name}: {int((got != want).sum())} mask entries differ from the "
                                        f"single-process mask ({int((got == 1).sum())} vs {int((want == 1).sum())} "
                                        "selected)")


def check_against_reference(results: list[dict], name: str, case: Case, world: int) -> None:
    ref = reference(case, world)
    assert all(r[name]["weights"] is None for r in results[1:])
    assert_weights_close(results[0][name]["weights"], ref["weights"], case.model, f"{name} ({world} ranks)")
    if case.rho is not None:
        total = sum(p.numel() for p in make_model(case.model).parameters() if p.requires_grad)
        assert_mask_equal(results, name, ref["mask"], total, replicated=case.stage == 0)


@pytest.mark.parametrize("name", ["t5-z0", "t5-z1", "t5-z2", "t5-z3", "t5-z0-clip", "t5-z3-clip-skip",
                                  "t5-z2-skip", "t5-z2-empirical", "bart-z1", "bart-z3-looksam",
                                  "t5-z2-clip-looksam"])
def test_two_ranks_match_single_process(two_ranks, name):
    case = CASES_2[name]
    if case.nan_plan:
        # A NaN loss on one rank (step 3: pass 1, step 6: pass 2) skips the step on every rank and
        # leaves weights, optimizer and DeepSpeed's gradient buffers as if it never happened.
        assert all(r[name]["skipped"] == sorted(case.nan_plan) for r in two_ranks)
    check_against_reference(two_ranks, name, case, 2)


@pytest.mark.parametrize("name", list(CASES_3))
def test_three_ranks_match_single_process(three_ranks, name):
    check_against_reference(three_ranks, name, CASES_3[name], 3)


@pytest.mark.parametrize("prefix", ["t5-z2", "t5-z1-bf16", "t5-z2-bf16"])
def test_rho_zero_is_plain_deepspeed_bit_for_bit(two_ranks, prefix):
    fsam_run, plain = two_ranks[0][f"{prefix}-rho0"]["weights"], two_ranks[0][f"{prefix}-plain"]["weights"]
    initial = make_model("t5").state_dict()
    assert any(not torch.equal(plain[k], initial[k]) for k in plain), "the weights did not move"
    different = [k for k in plain if not torch.equal(fsam_run[k], plain[k])]
    assert not different, f"{prefix}: rho=0 FSAM differs from plain DeepSpeed AdamW in {different}"


def test_tolerance_fails_a_run_without_the_perturbation(two_ranks):
    """Control: the parity rule has power here -- plain AdamW (rho 0) is far outside it from FSAM."""
    assert_not_parity(two_ranks[0]["t5-z2-rho0"]["weights"], two_ranks[0]["t5-z2"]["weights"],
                      make_model("t5").state_dict(), LR * STEPS, "t5-z2 rho 0 vs rho 0.05")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_fsam_stays_near_fp32_and_a_dropped_perturbation_does_not(two_ranks, stage):
    """FSAM (rho 0.05) with bf16 weights ends within bf16's tolerance (tests/parity.py) of the fp32
    FSAM run; the same bf16 run without the perturbation (rho 0) does not -- so a bf16 path that
    lost the perturbation (e.g. perturbing a copy the forward does not read) fails here."""
    start, fp32 = make_model("t5").state_dict(), two_ranks[0][f"t5-z{stage}"]["weights"]
    assert_bf16_close(two_ranks[0][f"t5-z{stage}-bf16"]["weights"], fp32, start, f"ZeRO-{stage} bf16 vs fp32")
    assert_bf16_not_close(two_ranks[0][f"t5-z{stage}-bf16-rho0"]["weights"], fp32, start,
                          f"ZeRO-{stage} bf16 rho 0 vs fp32 FSAM")


@pytest.mark.parametrize("name", RESUMED)
def test_resume_from_checkpoint_is_exact(two_ranks, name):
    result = two_ranks[0][name]
    different = [k for k in result["weights"] if not torch.equal(result["resumed"][k], result["weights"][k])]
    assert not different, f"{name}: the resumed run differs in {different}"


def test_clip_mismatch_raises(two_ranks):
    for rank_result in two_ranks:
        assert rank_result["clip_mismatch"] is not None and "gradient_clipping" in rank_result["clip_mismatch"]


def test_config_and_version_checks():
    from fsam_dist.shards.deepspeed_internals import check_version
    from fsam_dist.train.deepspeed_setup import build_deepspeed

    check_version("0.19.8")
    for bad in ("0.14.0", "1.0.0", "x.y"):
        with pytest.raises(RuntimeError):
            check_version(bad)
    model = make_model("t5")
    optimizer, _ = make_optimizer(model)
    with pytest.raises(ValueError, match="fp16 is not supported"):
        build_deepspeed(model, ds_config(2, 1, 0.0, {"fp16": {"enabled": True}}), optimizer)
    with pytest.raises(ValueError, match="offload_optimizer is not supported"):
        build_deepspeed(model, ds_config(2, 1, 0.0, {"zero_optimization": {
            "stage": 2, "offload_optimizer": {"device": "cpu"}}}), optimizer)
    with pytest.raises(ValueError, match="bf16 needs ZeRO stage 1, 2 or 3"):
        build_deepspeed(model, ds_config(0, 1, 0.0, {"bf16": {"enabled": True}}), optimizer)
    with pytest.raises(ValueError, match="stage must be"):
        build_deepspeed(model, ds_config(4, 1, 0.0), optimizer)


def test_local_backend_state_roundtrip(tmp_path):
    """LocalBackend.save_state/load_state: resuming gives the uninterrupted run bit for bit."""
    case = CASES_2["t5-z0"]
    backend, fsam = local_backend(case), make_fsam(case)
    train(backend, case, fsam, 1, 0, steps=range(RESUME_AT))
    backend.save_state(str(tmp_path))
    saved_fsam = fsam.state_dict()
    train(backend, case, fsam, 1, 0, steps=range(RESUME_AT, 6))
    resumed, fsam = local_backend(case, seed=1), make_fsam(case)
    resumed.load_state(str(tmp_path))
    fsam.load_state_dict(saved_fsam)
    train(resumed, case, fsam, 1, 0, steps=range(RESUME_AT, 6))
    a, b = backend.full_state_dict(), resumed.full_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
