"""Reliability: faults injected into real multi-process runs through the real launchers.

Every guarantee in docs/reliability.md is proved by a test here. Faults come from
``fsam_dist.train.faults`` (the ``FSAM_FAULT`` variable): a NaN/inf in one rank's loss or gradient
in pass 1, in pass 2, right after the perturbation, in the Fisher scores of a refresh; a SIGKILL of
one rank during pass 1, while the weights are perturbed, or while a checkpoint is being written.

To keep the launcher starts down (10-30 s each on 2 busy cores), one run carries every NaN/inf
fault at different steps, and the kill tests form chains: each link resumes (``train.resume:
auto``) from what the previous, killed link left and is killed again later.

    FAULTS                          single  DDP  ZeRO-2  ZeRO-3  FSDP2
    step 2  pass 1, loss NaN           x      x     x       x      x      (rank 1)
    step 4  Fisher refresh, grad NaN   x      x     x       x      x      (rank 1)
    step 5  pass 2, grad inf           x      x     x       x      x      (rank 1)
    step 7  between passes, loss inf   x      x     x       x      x      (rank 0)
    step 9  pass 1, grad NaN           x      x     x       x      x      (rank 0)

The single-process reference gets the same faults on its rank 0; it skips the same steps.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fsam_dist.train import checkpoint, faults

from .helpers import free_port
from .launching import BIN, PYTHON, REPO, assert_final_close, assert_final_identical, final_weights, write_config

TRAIN = str(REPO / "launch" / "train.py")
TIMEOUT_MINUTES = 0.5          # backend.timeout_minutes: a dead peer ends a collective after 30 s
RUN_TIMEOUT = 300              # s: a launch that takes longer is a hang (the test kills it and fails)
STEPS = 10
# (step, at, action, target, rank): see the module docstring
FAULTS = [(2, "pass1", "nan", "loss", 1), (4, "fisher", "nan", "grad", 1), (5, "pass2", "inf", "grad", 1),
          (7, "between_passes", "inf", "loss", 0), (9, "pass1", "nan", "grad", 0)]
SKIPPED = [2, 4, 5, 7, 9]


def spec(faults_: list[tuple], rank: int | None = None) -> str:
    """FSAM_FAULT for ``faults_``; ``rank`` moves every fault to that rank (the single process)."""
    return ";".join(f"rank={rank if rank is not None else r},step={s},at={a},action={act},target={t}"
                    for s, a, act, t, r in faults_)


def kill(step: int, at: str, rank: int) -> str:
    return f"rank={rank},step={step},at={at},action=kill"


# --------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------

@dataclass
class Run:
    returncode: int
    output: str
    wall: float          # s from start to the launcher's exit
    ended: float         # time.time() at the launcher's exit
    leftover: list       # worker processes of this run still alive once the launcher had exited
    out: Path

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def kill_time(self) -> float:
        line = next(line for line in self.output.splitlines() if "fsam-fault: SIGKILL" in line)
        return float(line.rsplit("t=", 1)[1].split()[0])


def _command(kind: str, cfg: Path, overrides: list[str]) -> list[str]:
    tail = [TRAIN, "--config", str(cfg), *overrides]
    if kind == "single":
        return [PYTHON, *tail]
    if kind == "ddp":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *tail]
    if kind in ("zero2", "zero3"):
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *tail]
    if kind == "fsdp2":
        return [str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/fsdp2.yaml",
                "--num_processes", "2", "--main_process_port", str(free_port()), *tail]
    raise ValueError(kind)


def _workers_of(cfg: Path) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(cfg) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def launch(kind: str, cfg: Path, fault: str = "", overrides: list[str] = (), timeout: float = RUN_TIMEOUT,
           on_sample=None) -> Run:
    """Start ``kind``'s launcher on ``cfg`` with FSAM_FAULT=``fault``; a run past ``timeout`` is a
    hang: its whole process group is killed and the test fails. ``on_sample(popen)`` is called
    every 0.5 s while it runs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "FSAM_FAULT": fault}
    log = cfg.with_suffix(f".{int(time.time() * 1000)}.log")
    start = time.time()
    with open(log, "w") as sink:
        proc = subprocess.Popen(_command(kind, cfg, list(overrides)), cwd=REPO, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if time.time() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                for p in _workers_of(cfg):
                    p.kill()
                proc.wait()
                pytest.fail(f"{kind} run of {cfg} did not finish in {timeout} s (hang?); log: {log}")
            if on_sample is not None:
                on_sample(proc)
            time.sleep(0.5 if on_sample is not None else 0.1)
    ended = time.time()
    # every worker must be gone once the launcher has exited (a few seconds' grace for the reaping)
    leftover = _alive(_workers_of(cfg))
    while leftover and time.time() - ended < 10:
        time.sleep(0.2)
        leftover = _alive(leftover)
    run = Run(proc.returncode, log.read_text(errors="replace"), ended - start, ended, leftover,
              Path(yaml_load(cfg)["train"]["output_dir"]))
    # snapshot what the run left (later links of a kill chain change the directory)
    run.records = run.metrics() if (run.out / "metrics.jsonl").is_file() else []
    run.had_final = (run.out / "final").exists()
    return run


def _alive(procs: list) -> list:
    import psutil

    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def ok(run: Run) -> Run:
    assert run.returncode == 0, f"run failed ({run.returncode}):\n{run.output[-6000:]}"
    return run


def make_config(root: Path, name: str, model_dir: str, data: dict, *, kind: str, save_every: int = 1,
                keep_last_n: int = 20, steps: int = STEPS, **sections) -> Path:
    """The fault runs' config: global batch 8 (one process: 8 × 1; two: 2 × 2 micro-batches),
    'empirical' Fisher on 4 examples refreshed every 3 steps (steps 1, 4, 7, 10)."""
    train = {"max_steps": steps, "save_every": save_every, "keep_last_n": keep_last_n, "log_every": 100,
             **({"micro_batch_size": 8, "grad_accum_steps": 1} if kind == "single"
                else {"micro_batch_size": 2, "grad_accum_steps": 2})}
    backend = {"timeout_minutes": TIMEOUT_MINUTES}
    if kind == "ddp":
        backend["name"] = "ddp"
    elif kind in ("zero2", "zero3"):
        backend["deepspeed_config"] = f"configs/deepspeed/{kind}.json"
    fsam = {"fisher": "empirical", "fisher_samples": 4, "mask_interval": 3}
    for section, values in sections.items():
        {"train": train, "backend": backend, "fsam": fsam}.get(section, {}).update(values)
    return write_config(root / f"{name}.yaml", model_dir, data, root / name, train=train, backend=backend,
                        fsam=fsam)


# --------------------------------------------------------------------------------------------------
# Checkpoint contents
# --------------------------------------------------------------------------------------------------

def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def tensor_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the backend state of a DDP/DeepSpeed checkpoint (weights, optimizer state),
    keyed by file and path inside it; loaded weights_only (DeepSpeed's two classes allowed)."""
    allowed = checkpoint._deepspeed_safe_globals()
    state = {}
    for file in sorted((ckpt / "backend").rglob("*.pt")):
        with torch.serialization.safe_globals(allowed):
            content = torch.load(file, map_location="cpu", weights_only=True)
        for key, value in _leaves(content):
            if torch.is_tensor(value):
                state[f"{file.relative_to(ckpt)}{key}"] = value
    assert state, f"no tensors in {ckpt}"
    return state


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensor(s) differ, e.g. {differ[:3]}"


def manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / checkpoint.MANIFEST).read_text())


def _dcp_metadata(file: Path):
    metadata = checkpoint._restricted_pickle_load(file)
    metadata.storage_meta = None
    return metadata


def assert_bit_identical(a: Path, b: Path) -> None:
    """Two checkpoints hold the same bytes: every file of both manifests, by size and SHA-256.
    DCP's ``.metadata`` is compared without its ``storage_meta``, which holds only the directory it
    was written to and a random save id (the tensor index, sizes and offsets must be equal)."""
    assert checkpoint.verify(a) is None and checkpoint.verify(b) is None
    ma, mb = manifest(a), manifest(b)
    differ = sorted(k for k in ma.keys() | mb.keys() if ma.get(k) != mb.get(k))
    differ = [k for k in differ if not (k.endswith(".metadata") and k in ma and k in mb
                                        and _dcp_metadata(a / k) == _dcp_metadata(b / k))]
    assert not differ, f"{a} and {b} differ in {differ}"


# --------------------------------------------------------------------------------------------------
# Fixtures: the model, and the runs (module scope: each run is shared by several tests)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro_model(tmp_path_factory, tiny_data) -> str:
    """A very small T5 (d_model 8, 1+1 layers): ZeRO-3's per-module hooks make a step cost ~0.3 s."""
    from fsam_dist.seq2seq.init_model import init_model

    out = tmp_path_factory.mktemp("micro") / "model"
    texts = [line for ex in map(json.loads, open(tiny_data["train"])) for line in (ex["source"], ex["target"])]
    init_model("t5", out, texts, vocab_size=64, d_model=8, layers=1, heads=2, d_ff=16, dropout=0.0, seed=0)
    return str(out)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def runs(root, micro_model, tiny_data):
    """Runs by name, started on first use."""
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            kind = name.split("-")[0]
            cfg = make_config(root, name, micro_model, tiny_data, kind=kind,
                              save_every=2 if kind == "fsdp2" else 1)
            cache[name] = ok(launch(kind, cfg, spec(FAULTS, rank=0 if kind == "single" else None)))
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------------
# 1. NaN/inf: skipped on every rank, state untouched, counted, training goes on
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "zero2", "zero3", "fsdp2"])
def test_nonfinite_steps_are_skipped_everywhere_like_one_process(runs, kind):
    """Each faulty step is skipped on every rank (metrics ``skipped: 1`` there and only there), the
    run goes on to the end, and its final weights equal the single process that skipped the same
    steps: a step that changed anything on any rank would show up here."""
    single, run = runs("single"), runs(kind)
    for r in (single, run):
        records = r.records
        assert [m["step"] for m in records] == list(range(1, STEPS + 1))
        assert [m["step"] for m in records if m["skipped"]] == SKIPPED, records
    worst = assert_final_close(run.out, single.out, f"{kind} with faults vs one process")
    print(f"{kind} with faults vs one process with the same faults: worst relative weight error {worst:.2e}, "
          f"run {run.wall:.1f} s")
    # the faults are real: without the skip the NaN would have reached the weights, and the
    # applied steps really trained
    assert all(torch.isfinite(w).all() for w in final_weights(run.out).values())
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single", "ddp", "zero3"])
def test_skipped_step_leaves_weights_and_optimizer_state_bit_identical(runs, kind):
    """Checkpoints written right before and right after each skipped step hold the same weights,
    optimizer state and scheduler position, bit for bit; around an applied step they differ."""
    run = runs(kind)
    ckpts = run.out / "checkpoints"
    for step in SKIPPED:
        assert_same_tensors(tensor_state(ckpts / f"step-{step - 1}"), tensor_state(ckpts / f"step-{step}"),
                            f"{kind}: state before and after skipped step {step}")
    before, after = tensor_state(ckpts / "step-2"), tensor_state(ckpts / "step-3")
    assert any(not torch.equal(before[k], after[k]) for k in before), "an applied step changed nothing?"


@pytest.mark.slow
def test_too_many_consecutive_skips_stop_every_rank_with_a_clear_error(kill_chain):
    """``train.max_consecutive_skips: 2`` and NaN at steps 8 and 9: both ranks stop at step 9 with
    the error, the launcher exits non-zero, no process is left, no final model is written."""
    run = kill_chain["skips"]
    assert run.returncode != 0
    assert run.output.count("TooManySkippedSteps: 2 consecutive steps had NaN/inf") >= 2, run.output[-4000:]
    assert not run.leftover
    assert not run.had_final
    assert [m["step"] for m in run.records if m["skipped"]][-2:] == [8, 9]
    assert run.records[-1]["step"] == 9


# --------------------------------------------------------------------------------------------------
# 2. A killed rank: the job ends, the newest checkpoint is whole and unperturbed, resume finishes
# --------------------------------------------------------------------------------------------------

def _kill_chain(root, micro_model, tiny_data, kind: str, links: list[tuple[str, str, list[str]]]) -> dict:
    """Run ``links`` (name, FSAM_FAULT, overrides) one after another on one output directory,
    each resuming from what the previous one left; record the newest complete checkpoint after each."""
    cfg = make_config(root, f"{kind}-chain", micro_model, tiny_data, kind=kind, keep_last_n=2,
                      save_every=2 if kind == "fsdp2" else 1)
    result = {}
    for name, fault, overrides in links:
        run = launch(kind, cfg, fault, overrides)
        run.newest = checkpoint.latest_checkpoint(run.out)
        run.survivors = sorted(p.name for p in (run.out / "checkpoints").iterdir())
        run.snapshot = None
        if run.newest is not None:   # rotation in the next link would delete it
            run.snapshot = root / f"{kind}-chain-{name}-{run.newest.name}"
            shutil.copytree(run.newest, run.snapshot)
        result[name] = run
    return result


@pytest.fixture(scope="module")
def kill_chain(root, micro_model, tiny_data):
    """DDP: kill rank 1 in pass 1 of step 3, rank 0 between the passes of step 6 (w + e in memory),
    rank 1 while checkpoint step-8 is written; stop on 2 consecutive skips (steps 8, 9); finish."""
    base = spec(FAULTS)
    return _kill_chain(root, micro_model, tiny_data, "ddp", [
        ("pass1", f"{base};{kill(3, 'pass1', 1)}", []),
        ("between_passes", f"{base};{kill(6, 'between_passes', 0)}", []),
        ("checkpoint", f"{base};{kill(8, 'checkpoint', 1)}", []),
        ("skips", f"{base};rank=1,step=8,at=pass1,action=nan",
         ["train.max_consecutive_skips=2", "train.save_every=0"]),
        ("finish", base, []),
    ])


@pytest.fixture(scope="module")
def fsdp_kill_chain(root, micro_model, tiny_data):
    """FSDP2 (checkpoints every 2 steps): kill rank 0 between the passes of step 6, rank 1 while
    checkpoint step-8 is written; finish."""
    base = spec(FAULTS)
    return _kill_chain(root, micro_model, tiny_data, "fsdp2", [
        ("between_passes", f"{base};{kill(6, 'between_passes', 0)}", []),
        ("checkpoint", f"{base};{kill(8, 'checkpoint', 1)}", []),
        ("finish", base, []),
    ])


KILLS = {"ddp": {"pass1": 2, "between_passes": 5, "checkpoint": 7},
         "fsdp2": {"between_passes": 4, "checkpoint": 6}}
"""kind → link → the step of the newest complete checkpoint it must leave."""


@pytest.mark.slow
@pytest.mark.parametrize("kind,link", [(k, link) for k, links in KILLS.items() for link in links])
def test_killed_rank_ends_the_job_and_leaves_an_intact_unperturbed_checkpoint(kill_chain, fsdp_kill_chain, runs,
                                                                             kind, link):
    chain = {"ddp": kill_chain, "fsdp2": fsdp_kill_chain}[kind]
    run = chain[link]
    latency = run.ended - run.kill_time()
    print(f"{kind} kill at {link}: launcher exited {latency:.2f} s after the SIGKILL (rc {run.returncode})")
    assert run.returncode != 0
    assert latency < TIMEOUT_MINUTES * 60, "the job outlived the collective timeout"
    assert not run.leftover, f"processes left running: {run.leftover}"
    assert not run.had_final
    expected = KILLS[kind][link]
    assert run.newest == run.out / "checkpoints" / f"step-{expected}", (run.newest, run.survivors)
    # intact, never perturbed, never half-trained: the same bytes as the uninterrupted run's checkpoint
    assert_bit_identical(run.snapshot, runs(kind).out / "checkpoints" / f"step-{expected}")
    if link == "checkpoint":   # the write in progress stayed a .tmp- directory that resume ignores
        assert f".tmp-step-{expected + 2 if kind == 'fsdp2' else expected + 1}" in run.survivors
    assert len([s for s in run.survivors if s.startswith("step-")]) <= 2   # keep_last_n


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_resume_after_kills_reaches_the_uninterrupted_weights(kill_chain, fsdp_kill_chain, runs, kind):
    chain = {"ddp": kill_chain, "fsdp2": fsdp_kill_chain}[kind]
    run = ok(chain["finish"])
    assert "resumed from" in run.output
    assert_final_identical(run.out, runs(kind).out)   # resume continues the same sums: bit for bit
    print(f"{kind}: killed {len(chain) - 1} times and resumed: final weights bit-identical")
    records = run.records
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))
    assert [m["step"] for m in records if m["skipped"]] == SKIPPED


# --------------------------------------------------------------------------------------------------
# 3. Checkpoint integrity: rotation keeps a good checkpoint; resume unpickles nothing unexpected
# --------------------------------------------------------------------------------------------------

class _FileBackend:
    """A stand-in backend whose state is one small tensor file (torch.save)."""

    def __init__(self, value: float):
        self.value = value

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        torch.save({"w": torch.full((64,), self.value)}, os.path.join(path, "local_state.pt"))

    def load_state(self, path):
        self.value = float(torch.load(os.path.join(path, "local_state.pt"), weights_only=True)["w"][0])


def _save(out: Path, step: int, keep: int, hook=None):
    return checkpoint.save(out, step, _FileBackend(step), None, {"step": step, "world_size": 1, "backend": "single"},
                           0, keep, hook=hook)


@pytest.mark.timeout(60)
def test_rotation_never_leaves_zero_good_checkpoints(tmp_path, monkeypatch, caplog):
    """keep_last_n=1: a new checkpoint damaged as it is written (a byte flipped after the manifest)
    is not made COMPLETE and does not rotate away the good one; the next good save does."""
    out = tmp_path / "run"
    _save(out, 5, keep=1)
    monkeypatch.setenv(faults.ENV, "step=10,at=checkpoint,action=corrupt")
    plan = faults.from_env(0)
    with caplog.at_level("ERROR", logger="fsam_dist"):
        _save(out, 10, keep=1, hook=plan.checkpoint_hook)
    assert "failed verification" in caplog.text
    assert checkpoint.latest_checkpoint(out) == out / "checkpoints" / "step-5"
    assert not (out / "checkpoints" / "step-10").exists() and (out / "checkpoints" / ".tmp-step-10").is_dir()
    _save(out, 15, keep=1)
    assert [p.name for _, p in checkpoint.complete_checkpoints(out)] == ["step-15"]
    assert checkpoint.verify(out / "checkpoints" / "step-15") is None


@pytest.mark.timeout(60)
def test_rotation_does_not_count_damaged_checkpoints(tmp_path):
    """keep_last_n=2 with a truncated step-10: saving step-15 keeps step-15 and the good step-5."""
    out = tmp_path / "run"
    _save(out, 5, keep=2)
    _save(out, 10, keep=2)
    state = out / "checkpoints" / "step-10" / "backend" / "local_state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    _save(out, 15, keep=2)
    assert [p.name for _, p in checkpoint.complete_checkpoints(out)] == ["step-5", "step-15"]


@pytest.mark.timeout(60)
def test_rotation_keeps_the_checkpoint_just_written(tmp_path):
    """An explicit resume from step-5 while step-10 exists, keep_last_n=1: saving step-6 keeps
    step-6 (the run's own state), not the higher-numbered step-10 of the abandoned run."""
    out = tmp_path / "run"
    for step in (5, 10):
        _save(out, step, keep=2)
    _save(out, 6, keep=1)
    assert [p.name for _, p in checkpoint.complete_checkpoints(out)] == ["step-6"]


class _Payload:
    """Unpickling this runs ``os.system`` (the classic malicious pickle)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["rank-0.pt", "backend/local_state.pt", "backend/deepspeed_optim.pt",
                                    "backend/.metadata"])
def test_resume_refuses_a_checkpoint_that_would_unpickle_code(tmp_path, victim):
    """A checkpoint whose pickle names a callable outside the allowlists (re-signed manifest, so
    the checksums pass) is refused before anything is unpickled: the payload never runs. Covers
    our files (weights_only), a DeepSpeed-style .pt (DeepSpeed itself would load it with
    weights_only=False) and a DCP .metadata (read with pickle.load by torch)."""
    out = tmp_path / "run"
    ckpt = _save(out, 5, keep=1)
    marker = tmp_path / "pwned"
    target = ckpt / victim
    if victim.endswith(".metadata"):
        target.write_bytes(pickle.dumps({"x": _Payload(marker)}))
    else:
        torch.save({"state": _Payload(marker)}, target)
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(checkpoint._manifest(ckpt)))
    assert checkpoint.verify(ckpt) is None
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=victim.split("/")[-1]):
        checkpoint.load(ckpt, _FileBackend(0), None, 0, 1, "single")
    assert not marker.exists(), "the payload ran"


@pytest.mark.slow
def test_real_checkpoints_of_every_backend_pass_the_unpickling_check(runs):
    """The allowlists admit what DeepSpeed (ZeRO-2/3), DCP (FSDP2) and we really write (the kill
    chains' resumes also pass through it)."""
    for kind in ("single", "ddp", "zero2", "zero3", "fsdp2"):
        newest = checkpoint.latest_checkpoint(runs(kind).out)
        checkpoint.check_unpickling(newest)


def test_fault_spec_errors_are_clear():
    with pytest.raises(ValueError, match="cannot parse"):
        faults.parse("rank=1,step=x,at=pass1,action=nan")
    with pytest.raises(ValueError, match="at must be one of"):
        faults.parse("step=1,at=pass3,action=nan")
    with pytest.raises(ValueError, match="at=checkpoint takes"):
        faults.parse("step=1,at=checkpoint,action=nan")
    with pytest.raises(ValueError, match="needs fsam.fisher=empirical"):
        faults.parse("step=1,at=fisher,action=nan", fisher="batch")
    assert faults.parse("rank=1,step=5,at=pass2,action=inf,target=grad") == \
        [faults.Fault(step=5, at="pass2", action="inf", rank=1, target="grad")]


def test_fault_hook_is_inert_when_unset(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.from_env(0) is None
    monkeypatch.setenv(faults.ENV, "rank=1,step=2,at=pass1,action=nan")
    loss = object()
    assert faults.from_env(0).wrap(loss, 1) is loss        # not this rank: the loss function itself
    plan = faults.from_env(1)
    wrapped = plan.wrap(lambda model, batch: torch.tensor(2.0), 1)
    training = torch.nn.Linear(1, 1).train()
    plan.start_step(3)                                       # not this step: the plain loss
    assert [float(wrapped(training, {})) for _ in range(2)] == [2.0, 2.0]
    plan.start_step(2)                                       # this step, pass 1: NaN
    assert torch.isnan(wrapped(training, {}))


# --------------------------------------------------------------------------------------------------
# 4. Determinism
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "zero2"])
def test_same_config_and_seed_give_bit_identical_weights(runs, kind):
    first, second = runs(kind), runs(f"{kind}-again")
    a, b = final_weights(first.out), final_weights(second.out)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{kind}: two identical runs differ in {differ}"
    # the logged losses too (NaN where a fault hit, hence compared as JSON text)
    assert json.dumps([m["loss"] for m in first.records]) == json.dumps([m["loss"] for m in second.records])


# --------------------------------------------------------------------------------------------------
# 5. Soak
# --------------------------------------------------------------------------------------------------

SOAK_STEPS = 200
SOAK_SAVE_EVERY = 25
"""The soak's checkpoint interval; its RSS baseline is taken between the first two checkpoints
(steps 25-50, once the first save has allocated what a save allocates), its end over the last 50
steps (two more saves): 100+ steps apart, with 10 mask refreshes and 5 saves in between."""


@pytest.mark.slow
@pytest.mark.soak
def test_soak_zero3_200_steps_flat_memory(root, micro_model, tiny_data):
    """2-rank ZeRO-3, 200 steps, mask refresh every 10, checkpoint every 25 (keep 2): it completes,
    and each worker's RSS over the last 50 steps is within 5 % of its RSS at steps 25-50."""
    import psutil

    cfg = write_config(root / "soak.yaml", micro_model, tiny_data, root / "soak",
                       train={"max_steps": SOAK_STEPS, "micro_batch_size": 2, "grad_accum_steps": 1,
                              "save_every": SOAK_SAVE_EVERY, "keep_last_n": 2, "log_every": 100},
                       fsam={"mask_interval": 10}, backend={"deepspeed_config": "configs/deepspeed/zero3.json",
                                                            "timeout_minutes": TIMEOUT_MINUTES})
    metrics_file = root / "soak" / "metrics.jsonl"
    samples: list[tuple[int, dict[int, int]]] = []   # (steps done, {pid: rss})

    def sample(proc):
        try:
            commands = {c: " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)}
            workers = [c for c, cmd in commands.items() if "launch/train.py" in cmd and "deepspeed.launcher" not in cmd]
            rss = {w.pid: w.memory_info().rss for w in workers}
            done = sum(1 for _ in open(metrics_file)) if metrics_file.exists() else 0
        except (psutil.Error, OSError):
            return
        if len(rss) == 2:
            samples.append((done, rss))

    run = ok(launch("zero3", cfg, timeout=900, on_sample=sample))
    records = run.records
    assert len(records) == SOAK_STEPS and not any(r["skipped"] for r in records)
    assert sum(r.get("mask_refreshed", 0) for r in records) == SOAK_STEPS // 10
    assert [p.name for _, p in checkpoint.complete_checkpoints(run.out)] == \
        [f"step-{SOAK_STEPS - SOAK_SAVE_EVERY}", f"step-{SOAK_STEPS}"]
    growth = {}
    for pid in samples[-1][1]:
        base = [rss[pid] for done, rss in samples if SOAK_SAVE_EVERY <= done <= 2 * SOAK_SAVE_EVERY and pid in rss]
        end = [rss[pid] for done, rss in samples if done >= SOAK_STEPS - 50 and pid in rss]
        assert len(base) >= 3 and len(end) >= 3, f"too few samples ({len(base)}, {len(end)})"
        growth[pid] = statistics.median(end) / statistics.median(base) - 1
        print(f"worker {pid}: RSS {statistics.median(base) / 2**20:.1f} MiB at steps {SOAK_SAVE_EVERY}-"
              f"{2 * SOAK_SAVE_EVERY} → "
              f"{statistics.median(end) / 2**20:.1f} MiB at steps {SOAK_STEPS - 50}-{SOAK_STEPS} "
              f"({100 * growth[pid]:+.2f} %), peak {max(r[pid] for _, r in samples if pid in r) / 2**20:.1f} MiB")
    print(f"soak: {SOAK_STEPS} steps in {run.wall:.0f} s, {len(samples)} RSS samples")
    assert all(g < 0.05 for g in growth.values()), growth
