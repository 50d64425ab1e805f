"""Elastic resume (issue 20): a checkpoint written at one world size resumes at another.

1. The FSAM state by global position (fsam_dist/core/reshard.py), in one process: the per-rank
   states of one sharding, merged, cut for another sharding (ZeRO-style flat partitions across
   parameters, FSDP-style per-parameter chunks, whole parameters), give every rank exactly the
   mask bits and LookSAM g_v entries of the entries it now owns.
2. The global batch is kept (``train.grad_accum_steps`` adjusted, or one clear error), and a
   checkpoint of another backend family is refused before any process group starts.
3. Real processes (gloo, the real launchers): 2 ranks × 3 steps with a mask refresh inside →
   checkpoint → resume at 3 ranks (every sharded backend) and at 1 rank (one backend per family:
   FSDP2, ZeRO-3; replicated: DDP, ZeRO-0) for 2 more steps == the uninterrupted 5-step run at 2
   ranks (tests/parity.py), and the mask refreshed after the resume equals the uninterrupted run's.
   A launch costs ~10-25 s of start-up on 2 cores against ~0.4 s a step, so the cases are sized by
   their number of launches (14), not their steps.
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


# ---- 2. the global batch, the backend family (no processes) --------------------------------------

def _saved_checkpoint(tmp_path: Path, *, backend: str, world: int, micro: int, accum: int) -> Path:
    cfg = _config(tmp_path, micro, accum)
    ckpt = tmp_path / "checkpoints" / "step-6"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_text(json.dumps({"step": 6, "world_size": world, "backend": backend,
                                                   "config": cfg.model_dump()}, default=str))
    (ckpt / "manifest.json").write_text("{}")
    (ckpt / "COMPLETE").write_text("")
    return ckpt


def _config(tmp_path: Path, micro: int, accum: int):
    from fsam_dist.config import Config

    return Config.model_validate({"model": {"name_or_path": "unused"}, "data": {"train_file": "unused.jsonl"},
                                  "train": {"micro_batch_size": micro, "grad_accum_steps": accum,
                                            "output_dir": str(tmp_path)}})


def test_global_batch_kept_by_adjusting_grad_accum_steps(tmp_path):
    """G = 1 × 2 × 3 = 6 written at 2 processes: at 3 processes grad_accum_steps becomes 2, at 1
    process 6, with a log line saying so; the fingerprint then matches (no 'different run')."""
    from fsam_dist.train.loop import _resume_path

    ckpt = _saved_checkpoint(tmp_path, backend="fsdp", world=2, micro=1, accum=3)
    for world, accum in ((3, 2), (1, 6), (6, 1), (2, 3)):
        cfg, notes = _config(tmp_path, 1, 3), []
        assert _resume_path(cfg, tmp_path, world, "fsdp", notes) == ckpt
        assert cfg.train.grad_accum_steps == accum
        if world == 2:
            assert notes == []
        else:
            assert notes and f"train.grad_accum_steps 3 → {accum}" in notes[0] and "global batch at 6" in notes[0]


def test_global_batch_that_cannot_be_kept_is_one_clear_error(tmp_path):
    from fsam_dist.config import ConfigError
    from fsam_dist.train.loop import _resume_path

    _saved_checkpoint(tmp_path, backend="fsdp", world=2, micro=1, accum=3)
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps: .* global batch 6 .*train\.micro_batch_size"):
        _resume_path(_config(tmp_path, 1, 3), tmp_path, 4, "fsdp", [])
    with pytest.raises(ConfigError, match=r"micro_batch_size × 3 × grad_accum_steps = 6"):
        _resume_path(_config(tmp_path, 4, 3), tmp_path, 3, "fsdp", [])


def test_checkpoint_of_another_backend_family_is_refused_before_the_process_group(tmp_path):
    """A DeepSpeed checkpoint resumed by an FSDP run (and the reverse): one ConfigError naming
    both backends and train.resume, from prepare() -- no process group exists yet."""
    from fsam_dist.config import ConfigError
    from fsam_dist.train.loop import _resume_path

    _saved_checkpoint(tmp_path, backend="deepspeed", world=2, micro=1, accum=3)
    with pytest.raises(ConfigError, match=r"train\.resume: .*'deepspeed'.*'fsdp'.*train\.resume=none"):
        _resume_path(_config(tmp_path, 1, 3), tmp_path, 2, "fsdp", [])
    other = tmp_path / "other"
    _saved_checkpoint(other, backend="fsdp", world=2, micro=1, accum=3)
    with pytest.raises(ConfigError, match=r"'fsdp'.*'deepspeed'"):
        _resume_path(_config(other, 1, 3), other, 3, "deepspeed", [])


# ---- 3. real processes: resume at 3 and at 1 rank == the uninterrupted 2-rank run -----------------

from .test_reliability import BIN, PYTHON, TRAIN, micro_model, ok, write_config  # noqa: E402,F401  (micro_model: a fixture)
from .helpers import free_port  # noqa: E402

STEPS, SAVE_AT, GLOBAL, MASK_INTERVAL = 5, 3, 6, 2
"""5 steps at global batch 6 (1 × 2 ranks × 3, 1 × 3 × 2, 1 × 1 × 6); mask refreshed at steps 0, 2,
4 (mask_interval 2; metrics records 1, 3, 5): the checkpoint at 3 holds step 2's mask (a refresh
inside the first part, not only the first step's), the resumed run must not refresh at step 3 and
must refresh at step 4, the last one, whose mask then shapes the final weights."""
REFRESH_AFTER = 4
"""The step index of the first refresh after the resume (metrics record REFRESH_AFTER + 1)."""


def _command(kind: str, cfg: Path, overrides: list[str], n: int) -> list[str]:
    tail = [TRAIN, "--config", str(cfg), *overrides]
    if kind in ("zero0", "zero2", "zero3"):
        return [str(BIN / "deepspeed"), "--num_gpus", str(n), "--master_port", str(free_port()), *tail]
    if kind == "ddp":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(n), *tail]
    if kind in ("fsdp1", "fsdp2"):
        return [str(BIN / "accelerate"), "launch", "--config_file", f"configs/accelerate/{kind}.yaml",
                "--num_processes", str(n), "--main_process_port", str(free_port()), *tail]
    raise ValueError(kind)


@pytest.fixture(scope="module")
def elastic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elastic")


def _config_for(root: Path, name: str, model_dir: str, data: dict, kind: str) -> Path:
    backend = {"timeout_minutes": 0.5}
    if kind in ("zero0", "zero2", "zero3"):
        backend["deepspeed_config"] = f"configs/deepspeed/{kind}.json"
    elif kind == "ddp":
        backend["name"] = "ddp"
    return write_config(root / f"{name}.yaml", model_dir, data, root / name,
                        train={"max_steps": STEPS, "save_every": SAVE_AT, "keep_last_n": 4, "micro_batch_size": 1,
                               "grad_accum_steps": GLOBAL // 2, "log_every": 100},
                        backend=backend, fsam={"rho": 0.05, "keep_ratio": 0.1, "mask_interval": MASK_INTERVAL},
                        # two parameter groups that differ (biases and layer norms without decay)
                        optim={"weight_decay": 0.01})


def global_mask(ckpt: Path) -> dict[int, bool]:
    """The whole mask of a checkpoint by global position (all rank files merged), which global
    positions it covers (the eligible ones), and the step of its refresh."""
    states = [torch.load(f, map_location="cpu", weights_only=True)["fsam"] for f in sorted(ckpt.glob("rank-*.pt"))]
    merged = merge_states(states)
    total = max(p + m["numel"] for _, p, m in merged["masks"])
    out = torch.zeros(total, dtype=torch.bool)
    covered = torch.zeros(total, dtype=torch.bool)
    for _, p, m in merged["masks"]:
        out[p:p + m["numel"]] = Mask.from_state(m).to_bool()
        covered[p:p + m["numel"]] = True
    return out, covered, merged["mask_step"]


def elastic_case(kind: str, elastic_root: Path, model_dir: str, data: dict, worlds=(3, 1)) -> dict:
    """The uninterrupted 2-rank run, then its step-SAVE_AT checkpoint (the reference's own) resumed at
    each of ``worlds``: one launch per world size."""

    cfg = _config_for(elastic_root, f"{kind}-2", model_dir, data, kind)
    runs = {2: ok(_launch(kind, cfg, 2))}
    for n in worlds:
        cfg_n = _config_for(elastic_root, f"{kind}-{n}", model_dir, data, kind)
        out = elastic_root / f"{kind}-{n}"
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copytree(runs[2].out / "checkpoints" / f"step-{SAVE_AT}", out / "checkpoints" / f"step-{SAVE_AT}")
        runs[n] = _launch(kind, cfg_n, n)
    return runs


def _launch(kind: str, cfg: Path, n: int):
    import tests.test_reliability as rel

    original = rel._command
    rel._command = lambda k, c, o: _command(k, c, o, n)
    try:
        return rel.launch(kind, cfg)
    finally:
        rel._command = original


def check_elastic(kind: str, runs: dict) -> None:
    from .launching import assert_final_close

    reference = runs[2]
    ref_records = {r["step"]: r for r in reference.records}
    ref_mask, ref_cov, ref_step = global_mask(reference.out / "checkpoints" / f"step-{STEPS}")
    assert ref_cov.any() and ref_step == REFRESH_AFTER
    assert [s for s, r in ref_records.items() if r.get("mask_refreshed")] == list(range(1, STEPS + 1, MASK_INTERVAL))
    after = REFRESH_AFTER + 1
    for n, run in runs.items():
        if n == 2:
            continue
        ok(run)
        assert "resumed from" in run.output and f"at step {SAVE_AT}" in run.output
        assert f"train.grad_accum_steps 3 → {GLOBAL // n}" in run.output, run.output[-3000:]
        records = {r["step"]: r for r in run.records}
        assert sorted(records) == list(range(SAVE_AT + 1, STEPS + 1))   # only the checkpoint was copied
        # the schedule continues where it was (scheduler state restored), and so does the loss
        assert [records[s]["lr"] for s in sorted(records)] == [ref_records[s]["lr"] for s in sorted(records)]
        # none at the first step after the resume (the loaded refresh bookkeeping), then the refresh
        # at step index REFRESH_AFTER, which compares with the loaded mask
        refreshed = [s for s, r in records.items() if r.get("mask_refreshed") and s > SAVE_AT]
        assert refreshed == [after], refreshed
        assert records[after]["mask_jaccard"] == ref_records[after]["mask_jaccard"], (records[after], ref_records[after])
        mask, covered, step = global_mask(run.out / "checkpoints" / f"step-{STEPS}")
        assert torch.equal(covered, ref_cov) and step == REFRESH_AFTER
        assert torch.equal(mask, ref_mask), f"{int((mask ^ ref_mask).sum())} mask entries differ"
        worst = assert_final_close(run.out, reference.out, f"{kind} resumed at {n} ranks vs uninterrupted at 2")
        print(f"{kind}: 2 ranks × {SAVE_AT} steps → resumed at {n} rank(s) × {STEPS - SAVE_AT}: worst relative "
              f"weight error {worst:.2e} against the uninterrupted 2-rank run; mask at step {after} identical")


@pytest.mark.slow
@pytest.mark.parametrize("kind,worlds", [("fsdp2", (3, 1)), ("zero3", (3, 1)), ("fsdp1", (3,)), ("zero2", (3,))],
                         ids=["fsdp2", "zero3", "fsdp1", "zero2"])
def test_resume_at_another_world_size_reaches_the_uninterrupted_weights(kind, worlds, elastic_root, micro_model,
                                                                         tiny_data):
    """Every sharded backend resumes at 3 ranks (uneven shards: resharded model, optimizer and FSAM
    state); one backend per family also at 1 rank (the degenerate world, ZeRO's universal load and
    DCP into whole parameters) -- FSDP2 and ZeRO-3, the ones whose shards differ most from 1 rank's."""
    check_elastic(kind, elastic_case(kind, elastic_root, micro_model, tiny_data, worlds))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "zero0"])
def test_replicated_state_resumes_at_another_world_size(kind, elastic_root, micro_model, tiny_data):
    """DDP and ZeRO-0 hold replicated state, which loads at any world size as saved (no
    conversion; the FSAM rank files are identical copies): 2 ranks → 1 rank == uninterrupted."""
    runs = elastic_case(kind, elastic_root, micro_model, tiny_data, worlds=(1,))
    assert "Converting DeepSpeed checkpoint" not in runs[1].output and "universal" not in runs[1].output
    check_elastic(kind, runs)


# ---- 4. a stop signal (SLURM's time-limit warning) ends the run at a step with a checkpoint ------

@pytest.mark.slow
def test_stop_signal_checkpoints_at_a_step_and_the_next_run_continues_bit_for_bit(tmp_path, micro_model, tiny_data):
    """SIGUSR1 during a run (one process, steps slowed to 1 s): the run finishes the step, writes a
    checkpoint (save_every 0: only because of the signal), leaves STOPPED naming it, exits 0
    without a final model; the same command again resumes there and ends bit-identical to the
    uninterrupted run. (Several ranks: the stop decision is all-reduced -- tests/test_multinode.py
    under SLURM.)"""
    import os
    import signal
    import subprocess
    import time

    from .cluster import step_delay_hook
    from .launching import assert_final_identical, check, launch as run_launcher

    def cfg_for(name: str) -> Path:
        return write_config(tmp_path / f"{name}.yaml", micro_model, tiny_data, tmp_path / name,
                            train={"max_steps": 8, "save_every": 0, "micro_batch_size": 4, "log_every": 100})

    check(run_launcher([PYTHON, TRAIN, "--config", str(cfg_for("whole"))], timeout=300))
    cfg, out = cfg_for("chain"), tmp_path / "chain"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           **step_delay_hook(tmp_path / "hook", 1.0)}
    log = tmp_path / "chain.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([PYTHON, TRAIN, "--config", str(cfg)], env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    marker = json.loads((out / "STOPPED").read_text())
    assert marker["signal"] == "SIGUSR1" and 2 <= marker["step"] < 8, marker
    assert marker["checkpoint"] == str(out / "checkpoints" / f"step-{marker['step']}")
    assert [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")] == [marker["step"]]
    assert not (out / "final").exists()
    assert f"stopped on SIGUSR1 after step {marker['step']}" in log.read_text()
    again = check(run_launcher([PYTHON, TRAIN, "--config", str(cfg)], timeout=300))
    assert f"at step {marker['step']}" in again.stderr and not (out / "STOPPED").exists()
    assert_final_identical(out, tmp_path / "whole")
    print(f"stopped on SIGUSR1 after step {marker['step']} of 8, resumed: final weights bit-identical")
