"""FSDP1 and FSDP2 (real gloo processes) give the single-process FSAM answer.

One spawned run per world size trains every variant in turn (process start-up and the T5
import are paid once); the tests below only compare what it returned. The reference is a
:class:`LocalBackend` on the whole global batch in one process, computed inside the 2-rank run
(each rank computes it alone, without communicating).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict

import pytest
import torch

from fsam_dist.core import FSAM, REPLICATED
from fsam_dist.shards.fsdp import FSDPBackend
from fsam_dist.train.fsdp_wrap import wrap_fsdp
from fsam_dist.train.fsdp_setup import FSDPSettings, fsdp_settings_from_env
from fsam_dist.shards.local import LocalBackend
from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
from fsam_dist.train.step import train_step

from .helpers import run_distributed, split_batch, state, synthetic_batch, tiny_t5
from .parity import LOSS_BF16, assert_bf16_close, assert_bf16_not_close, assert_not_parity, assert_parity

STEPS, GLOBAL_BATCH, MICRO, LR = 12, 12, 2, 1e-2   # 12 = 2 ranks × 2 micro × 3 = 3 ranks × 2 micro × 2
RESUME_AT = 7                                       # mid mask interval: the mask must come back too
FSAM_KWARGS = dict(rho=0.05, keep_ratio=0.1, mask_interval=5)
MASK_STEPS = (0, 5)                                 # the first mask and the refresh inside the run
# g_v reused at 2 of 3 steps, with LookSAM's α (the measured default adds less: less power)
LOOKSAM_KWARGS = dict(FSAM_KWARGS, interval=3, reuse_direction=True, reuse_alpha=0.7)
RTOL = 1e-5                                         # per-step losses against the reference's
CLIP = 1.5                                          # global-norm clipping, active in some steps


def optimizer_factory(params):
    """AdamW without weight decay on layer norms: a name-based grouping, built from a module
    (reference) or from wrap_fsdp's ShardedParams, which answer named_parameters() alike."""
    named = list(params.named_parameters())
    norms = [p for n, p in named if "layer_norm" in n]
    others = [p for n, p in named if "layer_norm" not in n]
    return torch.optim.AdamW([{"params": others, "weight_decay": 0.01}, {"params": norms, "weight_decay": 0.0}],
                             lr=LR)


def scheduler_factory(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.05 * s)


def micro_batches(step: int, world: int, rank: int) -> list[dict]:
    mine = split_batch(synthetic_batch(GLOBAL_BATCH, seed=100 + step), world, rank)
    return [split_batch(mine, MICRO, i) for i in range(MICRO)]


def train(backend, fsam, world: int, rank: int, steps=range(STEPS)) -> dict:
    """Train; record per-step stats and the mask pieces right after the MASK_STEPS refreshes."""
    stats, masks = [], {}
    for step in steps:
        stats.append(train_step(backend, seq2seq_loss_sum, micro_batches(step, world, rank), step=step,
                                count_targets=count_target_tokens, fsam=fsam, clip_grad_norm=CLIP))
        if fsam is not None and step in MASK_STEPS:
            masks[step] = {key: m.clone() for key, m in fsam.masks.items()}
    return {"stats": stats, "masks": masks}


# ---- what each rank runs ----------------------------------------------------------------------

class StaleGather(FSDPBackend):
    """Control: all-gathers every unit after each synchronised backward (before the
    perturbation), as if FSDP had kept the unsharded parameters. With ``skip_publish`` the
    backend's own fix (free them in ``publish`` after the perturbation) is disabled, so pass 2
    reads the stale, unperturbed copies. The publish after the restore always runs, so each step
    ends clean."""

    skip_publish = False
    _armed = False

    def forward_backward(self, loss_fn, micro_batch, scale, last):
        loss = super().forward_backward(loss_fn, micro_batch, scale, last)
        self._armed = last
        return loss

    def views(self):
        if not self._armed:
            return super().views()
        self._armed = False
        if self.version == 2:
            for module in self._model.modules():
                if hasattr(module, "unshard") and hasattr(module, "reshard"):
                    module.unshard()
        else:
            from torch.distributed.fsdp._runtime_utils import _unshard
            for st, handle, _ in self.shards.handles:
                _unshard(st, handle, st._unshard_stream, st._pre_unshard_stream)
        return super().views()

    def publish(self, restored):
        if restored or not self.skip_publish:
            super().publish(restored)


def local_numel(backend: FSDPBackend) -> int:
    """Parameter entries this rank physically holds (tied parameters once)."""
    if backend.version == 2:
        return sum(p.to_local().numel() for _, p in backend.named_parameters())
    return sum(p.numel() for _, p in backend.named_parameters())


def run_variant(rank: int, world: int, kwargs: dict, fsam_kwargs: dict | None = FSAM_KWARGS,
                cls=FSDPBackend, steps=range(STEPS)) -> dict:
    start = time.perf_counter()
    backend = wrap_fsdp(tiny_t5(seed=0), optimizer_factory=optimizer_factory, scheduler_factory=scheduler_factory,
                        adapter=cls, **kwargs)
    fsam = FSAM(**fsam_kwargs) if fsam_kwargs is not None else None
    out = train(backend, fsam, world, rank, steps)
    out.update(pieces=backend.local_pieces(), local_numel=local_numel(backend), total_numel=backend.total_numel,
               weights=backend.full_state_dict(), seconds=time.perf_counter() - start)
    return out


def run_resumed(rank: int, world: int, kwargs: dict) -> dict:
    """RESUME_AT steps, save (backend + FSAM), a fresh backend from a *different* init loads it,
    then the remaining steps."""
    start = time.perf_counter()
    backend = wrap_fsdp(tiny_t5(seed=0), optimizer_factory=optimizer_factory,
                        scheduler_factory=scheduler_factory, **kwargs)
    fsam = FSAM(**FSAM_KWARGS)
    train(backend, fsam, world, rank, range(RESUME_AT))
    path = os.path.join(os.environ["FSDP_TEST_DIR"], f"ckpt_v{kwargs['version']}")
    backend.save_state(path)
    torch.save(fsam.state_dict(), os.path.join(path, f"fsam_rank{rank}.pt"))
    del backend, fsam
    backend = wrap_fsdp(tiny_t5(seed=1), optimizer_factory=optimizer_factory,
                        scheduler_factory=scheduler_factory, **kwargs)
    fsam = FSAM(**FSAM_KWARGS)
    backend.load_state(path)
    fsam.load_state_dict(torch.load(os.path.join(path, f"fsam_rank{rank}.pt"), weights_only=False))
    lr_after_load = backend.optimizer.param_groups[0]["lr"]
    train(backend, fsam, world, rank, range(RESUME_AT, STEPS))
    return {"weights": backend.full_state_dict(), "lr_after_load": lr_after_load,
            "seconds": time.perf_counter() - start}


def reference(fsam_kwargs=FSAM_KWARGS) -> dict:
    """The same training in this process alone, whole global batch, one micro-batch."""
    model = tiny_t5(seed=0)
    optimizer = optimizer_factory(model)
    backend = LocalBackend(model, optimizer, scheduler_factory(optimizer))
    backend.world_group = REPLICATED   # this rank trains alone inside the distributed run
    fsam = FSAM(**fsam_kwargs)
    out = train(backend, fsam, 1, 0)
    out["weights"] = state(model)
    return out


TWO_RANK_VARIANTS = {
    "fsdp2": dict(version=2),
    "fsdp2_keep_gathered": dict(version=2, reshard_after_forward=False),
    "fsdp1_full_shard": dict(version=1, sharding_strategy="FULL_SHARD"),
    "fsdp1_shard_grad_op": dict(version=1, sharding_strategy="SHARD_GRAD_OP"),
    "fsdp1_no_shard": dict(version=1, sharding_strategy="NO_SHARD"),
}
THREE_RANK_VARIANTS = {
    "fsdp1_full_shard": dict(version=1, sharding_strategy="FULL_SHARD"),
    "fsdp2": dict(version=2),
}
CONTROL_STEPS = range(2)


def two_rank_suite(rank: int, world: int, out_dir: str) -> dict:
    os.environ["FSDP_TEST_DIR"] = out_dir
    results = {"reference": reference() if rank == 0 else None}
    results["variants"] = {name: run_variant(rank, world, kw) for name, kw in TWO_RANK_VARIANTS.items()}
    results["looksam_reference"] = reference(LOOKSAM_KWARGS) if rank == 0 else None
    results["looksam"] = {v: run_variant(rank, world, dict(version=v), LOOKSAM_KWARGS) for v in (2, 1)}
    results["rho0"] = run_variant(rank, world, dict(version=2), dict(FSAM_KWARGS, rho=0.0))
    results["plain"] = run_variant(rank, world, dict(version=2), None)
    results["bf16"] = {v: run_variant(rank, world, dict(version=v, mixed_precision="bf16")) for v in (2, 1)}
    # control: bf16 without the perturbation (rho 0) must fail the bf16 tolerance against fp32 FSAM
    results["bf16_rho0"] = {v: run_variant(rank, world, dict(version=v, mixed_precision="bf16"),
                                           dict(FSAM_KWARGS, rho=0.0)) for v in (2, 1)}
    results["resumed"] = {v: run_resumed(rank, world, dict(version=v)) for v in (2, 1)}
    results["controls"] = {}
    for v in (2, 1):
        kw = dict(version=v)
        results["controls"][(v, "publish")] = run_variant(rank, world, kw, cls=StaleGather, steps=CONTROL_STEPS)
        StaleGather.skip_publish = True
        try:
            results["controls"][(v, "no_publish")] = run_variant(rank, world, kw, cls=StaleGather,
                                                                 steps=CONTROL_STEPS)
        finally:
            StaleGather.skip_publish = False
    return results


def three_rank_suite(rank: int, world: int) -> dict:
    return {"variants": {name: run_variant(rank, world, kw) for name, kw in THREE_RANK_VARIANTS.items()}}


# ---- fixtures: one spawned run per world size --------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks():
    with tempfile.TemporaryDirectory() as out_dir:
        return run_distributed(two_rank_suite, 2, out_dir, timeout=420)


@pytest.fixture(scope="module")
def three_ranks():
    return run_distributed(three_rank_suite, 3, timeout=240)


# ---- checks ------------------------------------------------------------------------------------

def assert_weights_close(got: dict, expected: dict, label: str) -> float:
    """The parity rule (tests/parity.py) from the common start tiny_t5(seed=0); the schedule
    never exceeds LR, so Σ lr_t ≤ LR · STEPS."""
    return assert_parity(got, expected, state(tiny_t5(seed=0)), LR * STEPS, label)


def assemble_masks(ranks: list[dict], step: int, ref_mask: dict) -> dict[str, torch.Tensor]:
    """Global mask per parameter from every rank's (name, position) pieces; each entry must be
    covered exactly once."""
    start = {name: pos for name, pos in ref_mask}
    full = {name: torch.zeros_like(m) for (name, _), m in ref_mask.items()}
    covered = {name: torch.zeros(m.numel(), dtype=torch.int64) for (name, _), m in ref_mask.items()}
    for r in ranks:
        for (name, pos), piece in r["masks"][step].items():
            offset = pos - start[name]
            full[name][offset:offset + piece.numel()] = piece
            covered[name][offset:offset + piece.numel()] += 1
    for name, c in covered.items():
        assert bool((c == 1).all()), f"mask pieces of {name} do not cover it exactly once"
    return full


def check_variant(ranks: list[dict], ref: dict, name: str, world: int, sharded: bool = True) -> float:
    runs = [r["variants"][name] for r in ranks]
    # final weights: the consolidated state dict (rank 0) against the reference
    assert runs[0]["weights"] is not None and all(r["weights"] is None for r in runs[1:])
    err = assert_weights_close(runs[0]["weights"], ref["weights"], f"{name} ({world} ranks)")
    # the masks after the first refresh and after the refresh inside the run
    for step in MASK_STEPS:
        full = assemble_masks(runs, step, ref["masks"][step]) if sharded else \
            {n: m for (n, _), m in runs[0]["masks"][step].items()}
        for (pname, _), m in ref["masks"][step].items():
            assert torch.equal(full[pname], m), f"{name}: mask of {pname} at step {step} differs"
    # pass 2 ran at w + e: its loss is the single-process loss at w + e, every step
    for s, (got, exp) in enumerate(zip(runs[0]["stats"], ref["stats"])):
        assert got["perturbed_loss"] == pytest.approx(exp["perturbed_loss"], rel=RTOL, abs=1e-7), (name, s)
        assert got["loss"] == pytest.approx(exp["loss"], rel=RTOL, abs=1e-7), (name, s)
    # really sharded: each rank holds about 1/world of the entries, and the pieces tile the model
    total = runs[0]["total_numel"]
    for r in runs:
        share = r["local_numel"] / total
        if sharded:
            assert abs(share - 1 / world) < 0.2 / world, f"{name}: a rank holds {share:.3f} of the model"
        else:
            assert share == 1.0
    if sharded:
        owned: dict[str, list[tuple[int, int]]] = {}
        for r in runs:
            for pname, offset, numel in r["pieces"]:
                owned.setdefault(pname, []).append((offset, numel))
        for pname, w in ref["weights"].items():
            spans = sorted(owned.pop(pname))
            assert spans[0][0] == 0 and sum(n for _, n in spans) == w.numel(), pname
            assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:])), f"{pname}: gaps/overlaps {spans}"
        assert not owned, f"pieces of unknown parameters {sorted(owned)}"
    print(f"{name} ({world} ranks): worst relative error {err:.2e}, {runs[0]['seconds']:.1f} s")
    return err


def test_reference_is_sharp_enough_to_detect_a_missing_perturbation(two_ranks):
    """The checks below have power: at these settings L(w+e) − L(w) is far above their
    tolerance, gradient clipping matters, and the run really trains."""
    ref = two_ranks[0]["reference"]
    sharpness = [abs(s["perturbed_loss"] - s["loss"]) for s in ref["stats"]]
    assert min(sharpness) > 100 * RTOL * max(s["loss"] for s in ref["stats"]), sharpness
    # clipping (by the global norm) is active in some steps and not in others
    norms = [s["clip_grad_norm"] for s in ref["stats"]]
    assert any(n > CLIP for n in norms) and any(n < CLIP for n in norms), norms
    start = state(tiny_t5(seed=0))
    assert all(not torch.allclose(start[n], w) for n, w in ref["weights"].items())


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_keep_gathered", "fsdp1_full_shard", "fsdp1_shard_grad_op"])
def test_two_ranks_equal_one_process(two_ranks, name):
    check_variant(two_ranks, two_ranks[0]["reference"], name, world=2)


def test_fsdp1_no_shard_equals_one_process(two_ranks):
    """NO_SHARD is replicated (group REPLICATED): the same answer, every rank holds everything."""
    check_variant(two_ranks, two_ranks[0]["reference"], "fsdp1_no_shard", world=2, sharded=False)


@pytest.mark.parametrize("name", list(THREE_RANK_VARIANTS))
def test_three_ranks_equal_one_process(two_ranks, three_ranks, name):
    check_variant(three_ranks, two_ranks[0]["reference"], name, world=3)


@pytest.mark.parametrize("version", [2, 1])
def test_looksam_reuse_direction_equals_one_process(two_ranks, version):
    """fsam.reuse_direction: g_v (sharded like the gradients) added to the gradient FSDP steps and
    clips with, at the plain steps of interval 3 -- the same weights as one process."""
    ref = two_ranks[0]["looksam_reference"]
    assert [s.get("reused_direction", 0) for s in ref["stats"]] == [int(t % 3 != 0) for t in range(STEPS)]
    # the reuse matters at this tolerance: LookSAM ends far from plain interval-3 FSAM
    assert_not_parity(ref["weights"], two_ranks[0]["reference"]["weights"], state(tiny_t5(seed=0)), LR * STEPS,
                      "LookSAM vs FSAM")
    run = two_ranks[0]["looksam"][version]
    assert [s.get("reused_direction", 0) for s in run["stats"]] == [int(t % 3 != 0) for t in range(STEPS)]
    # g_v is a difference of two close gradients, scaled up by α‖g‖/‖g_v‖ (~25 here): fp32
    # summation-order differences grow by as much -- still inside the rule's margin (tests/parity.py).
    assert max(s.get("reuse_scale", 0) for s in ref["stats"]) < 50
    assert_weights_close(run["weights"], ref["weights"], f"LookSAM FSDP{version} (2 ranks)")


def test_rho_zero_is_plain_fsdp_adamw_bit_for_bit(two_ranks):
    rho0, plain = two_ranks[0]["rho0"], two_ranks[0]["plain"]
    for name, w in plain["weights"].items():
        assert torch.equal(rho0["weights"][name], w), name
    assert [s["loss"] for s in rho0["stats"]] == [s["loss"] for s in plain["stats"]]
    # and it is not trivially the FSAM run
    fsam_run = two_ranks[0]["variants"]["fsdp2"]["weights"]
    assert not torch.equal(rho0["weights"]["shared.weight"], fsam_run["shared.weight"])


@pytest.mark.parametrize("version", [2, 1])
def test_bf16_mixed_precision_stays_near_fp32(two_ranks, version):
    """bf16 FSAM ends within bf16's tolerance (tests/parity.py) of the fp32 FSAM run, and its
    perturbed losses follow the fp32 ones; the same bf16 run without the perturbation (rho 0)
    fails both -- so a bf16 path that dropped the perturbation could not pass."""
    fp32 = two_ranks[0]["variants"]["fsdp2" if version == 2 else "fsdp1_full_shard"]
    bf16, no_e = two_ranks[0]["bf16"][version], two_ranks[0]["bf16_rho0"][version]
    start = state(tiny_t5(seed=0))
    assert all(w.dtype == torch.float32 for w in bf16["weights"].values())   # fp32 shards kept
    assert any(not torch.equal(bf16["weights"][n], w) for n, w in fp32["weights"].items())   # bf16 really ran
    reference = {n: fp32["weights"][n] for n in start}   # the parameters (the state dict adds tied aliases)
    assert_bf16_close(bf16["weights"], reference, start, f"bf16 FSDP{version} vs fp32")
    assert_bf16_not_close(no_e["weights"], reference, start, f"bf16 FSDP{version} rho 0 vs fp32 FSAM")
    for a, b in zip(bf16["stats"], fp32["stats"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_BF16)
        assert a["perturbed_loss"] == pytest.approx(b["perturbed_loss"], rel=LOSS_BF16)
    # without the perturbation the "perturbed" loss is L(w): off by the sharpness at some step
    assert any(a["perturbed_loss"] != pytest.approx(b["perturbed_loss"], rel=LOSS_BF16)
               for a, b in zip(no_e["stats"], fp32["stats"]))


@pytest.mark.parametrize("version", [2, 1])
def test_save_load_continue_equals_uninterrupted(two_ranks, version):
    """Sharded DCP checkpoint at step 7 into a model built from a different init, then 5 more
    steps: bit-identical to never stopping (weights, AdamW moments, scheduler, FSAM mask)."""
    uninterrupted = two_ranks[0]["variants"]["fsdp2" if version == 2 else "fsdp1_full_shard"]["weights"]
    resumed = two_ranks[0]["resumed"][version]
    assert resumed["lr_after_load"] == pytest.approx(LR * (1 - 0.05 * RESUME_AT))   # scheduler state back
    for name, w in uninterrupted.items():
        assert torch.equal(resumed["weights"][name], w), name


@pytest.mark.parametrize("version", [2, 1])
def test_publish_frees_stale_gathered_parameters(two_ranks, version):
    """Parameters left all-gathered across the perturbation: with publish() pass 2 sees w + e;
    without it, it silently computes at w, which the perturbed-loss check catches."""
    ref = two_ranks[0]["reference"]["stats"]
    good = two_ranks[0]["controls"][(version, "publish")]["stats"]
    bad = two_ranks[0]["controls"][(version, "no_publish")]["stats"]
    for g, e in zip(good, ref):
        assert g["perturbed_loss"] == pytest.approx(e["perturbed_loss"], rel=RTOL, abs=1e-7)
    assert bad[0]["perturbed_loss"] != pytest.approx(ref[0]["perturbed_loss"], rel=100 * RTOL)
    print(f"FSDP{version} stale gathered copies, step 0: L(w) = {ref[0]['loss']:.6f}, L(w+e) = "
          f"{ref[0]['perturbed_loss']:.6f}; pass 2 without publish {bad[0]['perturbed_loss']:.6f}, "
          f"with publish {good[0]['perturbed_loss']:.6f}")


# ---- settings from accelerate's environment ----------------------------------------------------

def test_settings_from_accelerate_env():
    assert fsdp_settings_from_env({}) is None
    base = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
            "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_USE_ORIG_PARAMS": "true",
            "ACCELERATE_MIXED_PRECISION": "no"}
    s = fsdp_settings_from_env(dict(base, FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="false",
                                    FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                                    FSDP_TRANSFORMER_CLS_TO_WRAP="T5Block,BartEncoderLayer",
                                    ACCELERATE_MIXED_PRECISION="bf16"))
    assert s == FSDPSettings(version=2, reshard_after_forward=False, wrap_classes=("T5Block", "BartEncoderLayer"),
                             mixed_precision="bf16")
    s = fsdp_settings_from_env(dict(base, FSDP_VERSION="1", FSDP_RESHARD_AFTER_FORWARD="shard_grad_op"))
    assert (s.version, s.sharding_strategy, s.wrap_classes, s.state_dict_type) == \
        (1, "SHARD_GRAD_OP", None, "FULL_STATE_DICT")
    assert fsdp_settings_from_env(dict(base, FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="2")).sharding_strategy == \
        "SHARD_GRAD_OP"
    assert fsdp_settings_from_env(dict(base, FSDP_AUTO_WRAP_POLICY="NO_WRAP")).wrap_classes == ()
    assert "state_dict_type" not in s.backend_kwargs()
    assert fsdp_settings_from_env(dict(base, FSDP_ACTIVATION_CHECKPOINTING="true")).activation_checkpointing
    assert not fsdp_settings_from_env(base).activation_checkpointing
    for value in ("true", "false"):   # accepted: the CLI always loads that way under FSDP (train/loading.py)
        assert fsdp_settings_from_env(dict(base, FSDP_CPU_RAM_EFFICIENT_LOADING=value)) == fsdp_settings_from_env(base)
    bad = [
        (dict(FSDP_VERSION="1", FSDP_USE_ORIG_PARAMS="false"), "fsdp_use_orig_params"),
        (dict(FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="HYBRID_SHARD"), "fsdp_sharding_strategy"),
        (dict(FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="shard_grad_op"), "fsdp_reshard_after_forward"),
        (dict(FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD="true"), "fsdp_activation_checkpointing_offload"),
        (dict(FSDP_AUTO_WRAP_POLICY="SIZE_BASED_WRAP"), "fsdp_auto_wrap_policy"),
        (dict(ACCELERATE_MIXED_PRECISION="fp16"), "mixed_precision"),
        (dict(FSDP_STATE_DICT_TYPE="LOCAL_STATE_DICT"), "fsdp_state_dict_type"),
        (dict(FSDP_CPU_RAM_EFFICIENT_LOADING="maybe"), "fsdp_cpu_ram_efficient_loading"),
        (dict(FSDP_VERSION="3"), "fsdp_version"),
    ]
    for env, key in bad:
        with pytest.raises(ValueError, match=key):
            fsdp_settings_from_env(dict(base, **env))


PROBE = """
import json, os
from dataclasses import asdict
from fsam_dist.train.fsdp_setup import fsdp_settings_from_env
s = fsdp_settings_from_env()
with open(os.path.join(os.environ["PROBE_DIR"], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({"world": os.environ["WORLD_SIZE"], "settings": None if s is None else asdict(s)}, f)
"""


def test_accelerate_launch_yamls_reach_the_parser(tmp_path):
    """`accelerate launch --config_file configs/accelerate/<x>.yaml` starts 2 processes whose
    FSDP_* environment parses to the intended settings (none for ddp.yaml: plain DDP)."""
    from .launching import BIN, REPO, check, launch

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    blocks = ("T5Block", "BartEncoderLayer", "BartDecoderLayer")
    expected = {
        "fsdp2": FSDPSettings(version=2, reshard_after_forward=True, wrap_classes=blocks),
        "fsdp1": FSDPSettings(version=1, sharding_strategy="FULL_SHARD", wrap_classes=blocks),
        "ddp": None,
    }
    for name, settings in expected.items():
        out = tmp_path / name
        out.mkdir()
        check(launch([str(BIN / "accelerate"), "launch", "--config_file", f"configs/accelerate/{name}.yaml",
                      "--num_processes", "2", "--main_process_port", "0", str(probe)],
                     timeout=120, env={"PYTHONPATH": str(REPO), "PROBE_DIR": str(out)}))
        want = None if settings is None else json.loads(json.dumps(asdict(settings)))   # tuples → lists
        got = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert got == [{"world": "2", "settings": want}] * 2, (name, got)
