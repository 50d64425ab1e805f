"""Multi-node runs on real launchers, on this one machine: a SLURM cluster (launch/slurm/train.sbatch,
two slurmd "nodes"), two hosts in network namespaces (torchrun --nnodes 2; mpiexec across them), and
mpirun. Every run trains the same 2-rank job (micro-batch 4 x 2 ranks = global batch 8) and must end
at the weights of one plain process with micro-batch 8; a node that dies (SIGKILL) or drops off the
network makes every process exit non-zero within backend.timeout_minutes, and the re-run resumes
from the last checkpoint to the same final weights.

Needs root (SLURM daemons, network namespaces) and installs slurm-wlm/munge with apt-get when
missing; mpi4py + mpich come from the ``mpi`` extra. Without them the tests skip, saying why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fsam_dist.train.checkpoint import complete_checkpoints, latest_checkpoint

from .cluster import (  # noqa: F401  (fixtures)
    children,
    free_port,
    hydra_netns_launcher,
    netns_pair_fixture,
    pid_alive,
    process_cmdline,
    process_env,
    processes_with_env,
    slurm_cluster_fixture,
    step_delay_hook,
    wait_for,
)
from .helpers import unavailable
from .launching import BIN, PYTHON, REPO, assert_final_close, check, launch, write_config

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

TRAIN = str(REPO / "launch" / "train.py")
SBATCH = str(REPO / "launch" / "slurm" / "train.sbatch")
STEPS = 8
SAVE_EVERY = 3
TIMEOUT_MINUTES = 0.5           # backend.timeout_minutes of the multi-node runs: 30 s collective timeout
STEP_DELAY = 0.5                # s added to every step in the failure tests (a kill lands between checkpoints)
EXIT_SLACK = 15                 # s on top of the collective timeout for launchers/SLURM to wind down
JOB_NAME = "fsamtest"


def multi_config(path: Path, tiny_t5_dir: str, tiny_data: dict, output_dir: Path, **backend) -> Path:
    """2 ranks x micro-batch 4 (global batch 8), checkpoints every SAVE_EVERY steps."""
    return write_config(path, tiny_t5_dir, tiny_data, output_dir,
                        train={"micro_batch_size": 4, "max_steps": STEPS, "save_every": SAVE_EVERY},
                        backend={"timeout_minutes": TIMEOUT_MINUTES, **backend})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_t5_dir, tiny_data) -> Path:
    """One plain process, micro-batch 8: the global batch of every 2-rank run here."""
    root = tmp_path_factory.mktemp("multinode-reference")
    cfg = write_config(root / "cfg.yaml", tiny_t5_dir, tiny_data, root / "out",
                       train={"micro_batch_size": 8, "max_steps": STEPS})
    check(launch([PYTHON, TRAIN, "--config", str(cfg)]))
    return root / "out"


def _run_env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **extra}


def _tail(path: Path, n: int = 6000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else f"({path} missing)"
    # drop the progress-bar redraws, keep the messages
    return "\n".join(line for line in text.splitlines() if "it/s]" not in line and "step/s" not in line)[-n:]


def _newest_step(output_dir: Path) -> int:
    """Step of the newest complete checkpoint (cheap: no manifest check; for polling)."""
    found = complete_checkpoints(output_dir)
    return found[-1][0] if found else 0


def _wait_for_first_checkpoint(cluster, job, run: Path, log_path: Path) -> None:
    """Until ``run`` holds checkpoint step-SAVE_EVERY; fails if the job ends before that."""
    def first_checkpoint():
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state} before a checkpoint:\n{_tail(log_path)}"
        return _newest_step(run) >= SAVE_EVERY

    wait_for(first_checkpoint, 240, f"checkpoint step-{SAVE_EVERY}")


def _resume_step(output_dir: Path) -> int:
    """Step of the checkpoint ``train.resume: auto`` will pick (manifest verified)."""
    ckpt = latest_checkpoint(output_dir)
    return int(ckpt.name.split("-")[1]) if ckpt else 0


# ------------------------------------------------------------------------------------------- SLURM

def _submit(cluster, tmp_path: Path, cfg: Path, **env) -> int:
    args = ["-N", "2", "--job-name", JOB_NAME, "--output", str(tmp_path / "slurm-%j.out"), "--chdir", str(REPO),
            SBATCH, str(cfg)]
    return cluster.sbatch(args, _run_env(PYTHON=PYTHON, OUTPUT_ROOT=str(tmp_path / "runs"),
                                         RDZV_PORT=str(free_port()), **env), cwd=REPO)


SLURM_BACKENDS = {
    # name: (variables for train.sbatch, backend name in the log)
    "ddp-torchrun": ({}, "ddp"),
    "zero3-deepspeed-launcher": ({"BACKEND": "deepspeed", "DS_LAUNCHER": "deepspeed",
                                  "DS_CONFIG": "configs/deepspeed/zero3.json"}, "deepspeed"),
    "fsdp2-accelerate": ({"BACKEND": "fsdp", "ACCELERATE_CONFIG": "configs/accelerate/fsdp2.yaml"}, "fsdp"),
}


@pytest.mark.parametrize("case", list(SLURM_BACKENDS))
def test_slurm_sbatch_two_nodes_equals_one_process(slurm_cluster, reference, tmp_path, tiny_t5_dir, tiny_data,
                                                   case):
    """sbatch -N 2 launch/slurm/train.sbatch: srun starts one launcher on n1 and one on n2 (torchrun with
    c10d rendezvous; the deepspeed launcher with a per-job hostfile; accelerate launch), one rank each."""
    variables, backend = SLURM_BACKENDS[case]
    cfg = multi_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "ignored")
    job = _submit(slurm_cluster, tmp_path, cfg, **variables)
    record = slurm_cluster.wait(job, timeout=300)
    log = _tail(tmp_path / f"slurm-{job}.out")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", f"{record['JobState']}\n{log}"
    assert "2 node(s) n[1-2]" in log and "master n1 (127.0.0.1:" in log, log
    assert "[node 0/2 n1 127.0.0.1]" in log and "[node 1/2 n2 127.0.0.1]" in log, log
    assert f"backend {backend}, 2 process(es), global batch 8" in log, log
    run = tmp_path / "runs" / f"{JOB_NAME}-{job}"      # the output directory is per job id
    assert not (tmp_path / "ignored").exists()
    worst = _assert_final_equal(run, reference)
    print(f"SLURM 2 nodes ({case}) vs one process: worst relative weight error {worst:.2e}")


def _assert_final_equal(run: Path, reference: Path) -> float:
    """final/model.safetensors equals the reference run's, by the parity rule (tests/parity.py)."""
    return assert_final_close(run, reference, f"{run} vs one process")


def test_slurm_node_killed_job_fails_then_requeue_resumes(slurm_cluster, reference, tmp_path, tiny_t5_dir,
                                                          tiny_data):
    """SIGKILL the rank on node n2 after the first checkpoint: the job fails (no hang) within the
    collective timeout, nothing of it keeps running; `scontrol requeue` reruns the same job id, which
    resumes from the newest checkpoint and ends at the uninterrupted weights."""
    cfg = multi_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "ignored")
    job = _submit(slurm_cluster, tmp_path, cfg, **step_delay_hook(tmp_path / "hook", STEP_DELAY))
    run = tmp_path / "runs" / f"{JOB_NAME}-{job}"
    log_path = tmp_path / f"slurm-{job}.out"

    _wait_for_first_checkpoint(slurm_cluster, job, run, log_path)
    conf = str(slurm_cluster.conf)
    victims = [p for p in processes_with_env("SLURMD_NODENAME", "n2")
               if process_env(p).get("SLURM_CONF") == conf and process_env(p).get("SLURM_JOB_ID") == str(job)
               and "LOCAL_RANK" in process_env(p) and TRAIN in process_cmdline(p)]
    assert len(victims) == 1, f"expected one training process on n2, found {victims}"
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.monotonic()

    record = slurm_cluster.wait(job, timeout=TIMEOUT_MINUTES * 60 + 120)
    elapsed = time.monotonic() - killed_at
    log = _tail(log_path)
    print(f"job {job} {record['JobState']} {elapsed:.1f} s after the kill")
    assert record["JobState"] == "FAILED", f"{record['JobState']}\n{log}"
    assert elapsed < TIMEOUT_MINUTES * 60 + EXIT_SLACK, f"{elapsed:.0f} s to fail\n{log}"
    wait_for(lambda: not processes_with_env("SLURM_JOB_ID", str(job)), 15, "the job's processes to end")
    assert not (run / "final").exists()
    resume_step = _resume_step(run)
    assert SAVE_EVERY <= resume_step < STEPS

    # slurmd refuses to launch a job id it killed moments ago ("Job N already killed, do not launch
    # batch job": the run fails at once, RunTime 0); requeue again until the batch script really starts.
    for _ in range(10):
        slurm_cluster.requeue(job)
        record = slurm_cluster.wait(job, timeout=300)
        if not (record["JobState"] == "FAILED" and record["RunTime"] == "00:00:00"):
            break
        time.sleep(3)
    log = _tail(log_path)
    restarts = int(record["Restarts"])
    assert record["JobState"] == "COMPLETED" and restarts >= 1, f"{record}\n{log}"
    assert f"job {job} restart {restarts}:" in log, log
    assert f"resumed from {run / 'checkpoints' / f'step-{resume_step}'} at step {resume_step}" in log, log
    worst = _assert_final_equal(run, reference)
    print(f"requeued job resumed at step {resume_step}; vs one process: worst relative weight error {worst:.2e}")


# ------------------------------------------------------------------ SLURM job chains (issue 20)

def _submit_chain(cluster, tmp_path: Path, cfg: Path, run: Path, nodes: int, sbatch_args: list[str] = (),
                  **env) -> int:
    """sbatch with a named output directory (OUTPUT_DIR: every job of the chain uses it)."""
    args = ["-N", str(nodes), "--job-name", JOB_NAME, "--output", str(tmp_path / "slurm-%j.out"), "--chdir",
            str(REPO), *sbatch_args, SBATCH, str(cfg)]
    return cluster.sbatch(args, _run_env(PYTHON=PYTHON, OUTPUT_DIR=str(run), RDZV_PORT=str(free_port()), **env),
                          cwd=REPO)


CHAIN_STEP_DELAY = 10.0
"""s per step of the first job: its 8 steps (80 s after a start-up of ~20-40 s) outlast the warning,
sent 120 s before the 3-minute limit, i.e. 60-90 s after the start (slurmctld checks limits every ~30 s)."""


def test_slurm_time_limit_signal_checkpoints_then_the_next_sbatch_continues(slurm_cluster, reference, tmp_path,
                                                                           tiny_t5_dir, tiny_data):
    """A job chain: ``sbatch --time=3 --signal=USR1@120`` (SLURM warns 120 s before the 3-minute
    limit): every rank finishes its step, a checkpoint is written and the job ends COMPLETED with
    STOPPED in the named output directory, no final model; the same sbatch again (without the
    slowed steps) resumes from that checkpoint and the chain ends at the uninterrupted weights."""
    run = tmp_path / "chain"
    cfg = multi_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "ignored")
    hook = step_delay_hook(tmp_path / "hook", CHAIN_STEP_DELAY)
    jobs, logs = [], []
    while not (run / "final").exists():
        assert len(jobs) < 4, "the chain did not finish in 4 jobs:\n" + "\n".join(logs)
        job = _submit_chain(slurm_cluster, tmp_path, cfg, run, 2, ["--time=3", "--signal=USR1@120"],
                            **(hook if not jobs else {}))
        record = slurm_cluster.wait(job, timeout=300)
        jobs.append(job)
        logs.append(_tail(tmp_path / f"slurm-{job}.out"))
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", f"{record}\n{logs[-1]}"
    first = logs[0]
    assert len(jobs) >= 2 and "stopped on the signal" in first and "stopped on SIGUSR1 after step" in first, first
    stopped_at = int(first.split("stopped on SIGUSR1 after step ")[1].split(":")[0])
    assert 0 < stopped_at < STEPS
    assert f"resumed from {run / 'checkpoints' / f'step-{stopped_at}'} at step {stopped_at}" in logs[1], logs[1]
    assert not (tmp_path / "ignored").exists() and not (tmp_path / "runs").exists()
    worst = _assert_final_equal(run, reference)
    print(f"job chain {jobs}: first stopped on the time-limit signal after step {stopped_at}; "
          f"vs one process: worst relative weight error {worst:.2e}")


def test_slurm_fsdp_two_nodes_then_one_node_continues_the_run(slurm_cluster, reference, tmp_path, tiny_t5_dir,
                                                              tiny_data):
    """FSDP2 on 2 nodes, stopped by ``scancel --signal=USR1`` after its first checkpoint; the same
    sbatch on 1 node continues it at 1 process (grad_accum_steps 1 → 2 keeps the global batch 8;
    the sharded model, optimizer and FSAM state resharded) and ends at the uninterrupted weights."""
    run = tmp_path / "chain"
    cfg = multi_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "ignored")
    variables = {"BACKEND": "fsdp", "ACCELERATE_CONFIG": "configs/accelerate/fsdp2.yaml"}
    job = _submit_chain(slurm_cluster, tmp_path, cfg, run, 2, **variables,
                        **step_delay_hook(tmp_path / "hook", STEP_DELAY))
    log_path = tmp_path / f"slurm-{job}.out"

    _wait_for_first_checkpoint(slurm_cluster, job, run, log_path)
    slurm_cluster.run(["scancel", "--signal=USR1", str(job)])
    record = slurm_cluster.wait(job, timeout=180)
    log = _tail(log_path)
    assert record["JobState"] == "COMPLETED" and "stopped on SIGUSR1 after step" in log, f"{record}\n{log}"
    assert not (run / "final").exists()
    stopped_at = _resume_step(run)
    assert SAVE_EVERY <= stopped_at < STEPS

    job = _submit_chain(slurm_cluster, tmp_path, cfg, run, 1, **variables)
    record = slurm_cluster.wait(job, timeout=300)
    log = _tail(tmp_path / f"slurm-{job}.out")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", f"{record}\n{log}"
    assert "train.grad_accum_steps 1 → 2 keeps the global batch at 8" in log, log
    assert f"resumed from {run / 'checkpoints' / f'step-{stopped_at}'} at step {stopped_at}" in log, log
    assert "backend fsdp, 1 process(es), global batch 8" in log, log
    worst = _assert_final_equal(run, reference)
    print(f"FSDP2: 2 nodes stopped after step {stopped_at}, 1 node continued; vs one process: worst relative "
          f"weight error {worst:.2e}")


# ------------------------------------------------------------------------------ network namespaces

_ports = iter(range(29400, 29500))     # inside fresh namespaces every port is free; a new one per run


def _netns_torchrun(pair, cfg: Path, log_dir: Path, **env) -> list[subprocess.Popen]:
    """torchrun --nnodes 2 (static rendezvous on host A), one process per host, started in both namespaces."""
    port = next(_ports)
    procs = []
    for i, address in enumerate(pair.addresses):
        cmd = [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(i),
               "--master_addr", pair.addresses[0], "--master_port", str(port), "--local_addr", address,
               "--max_restarts", "0", TRAIN, "--config", str(cfg)]
        with open(log_dir / f"host{i}.log", "w") as log:
            procs.append(subprocess.Popen(pair.exec(i, cmd), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          env=_run_env(GLOO_SOCKET_IFNAME=pair.ifname, **env)))
    return procs


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        _kill_all(procs)
        raise


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        for pid in children(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.kill()
        p.wait()


def _logs(log_dir: Path) -> str:
    return "\n".join(f"--- host {i}\n{_tail(log_dir / f'host{i}.log', 3000)}" for i in range(2))


def test_netns_two_hosts_torchrun_equals_one_process(netns_pair, reference, tmp_path, tiny_t5_dir, tiny_data):
    """Host A (198.51.100.1) and host B (198.51.100.2): torchrun --nnodes 2 --node_rank 0/1."""
    cfg = multi_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out")
    codes = _wait_all(_netns_torchrun(netns_pair, cfg, tmp_path), timeout=300)
    assert codes == [0, 0], _logs(tmp_path)
    log = _logs(tmp_path)
    assert "backend ddp, 2 process(es), global batch 8" in log, log
    worst = _assert_final_equal(tmp_path / "out", reference)
    print(f"2 hosts (netns) vs one process: worst relative weight error {worst:.2e}")


def _start_until_checkpoint(pair, cfg: Path, run: Path, log_dir: Path, env: dict) -> list[subprocess.Popen]:
    procs = _netns_torchrun(pair, cfg, log_dir, **env)

    def checkpointed():
        assert all(p.poll() is None for p in procs), f"a host exited before a checkpoint:\n{_logs(log_dir)}"
        return _newest_step(run) >= SAVE_EVERY

    try:
        wait_for(checkpointed, 240, f"checkpoint step-{SAVE_EVERY}", interval=0.05)
    except BaseException:
        _kill_all(procs)
        raise
    return procs


def test_netns_host_killed_all_exit_then_rerun_resumes(netns_pair, reference, tmp_path, tiny_t5_dir, tiny_data):
    """SIGKILL host B's training process mid-run: both torchrun agents (and host A's rank) exit non-zero
    within the collective timeout; running the same commands again resumes from the last checkpoint."""
    cfg = multi_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out")
    first = tmp_path / "first"
    first.mkdir()
    procs = _start_until_checkpoint(netns_pair, cfg, tmp_path / "out", first,
                                    step_delay_hook(tmp_path / "hook", STEP_DELAY))
    workers = [children(p.pid) for p in procs]
    assert all(len(w) == 1 for w in workers), workers
    os.kill(workers[1][0], signal.SIGKILL)
    killed_at = time.monotonic()
    codes = _wait_all(procs, timeout=TIMEOUT_MINUTES * 60 + 120)
    elapsed = time.monotonic() - killed_at
    print(f"exit codes {codes}, {elapsed:.1f} s after the kill")
    assert all(code != 0 for code in codes), _logs(first)
    assert elapsed < TIMEOUT_MINUTES * 60 + EXIT_SLACK, f"{elapsed:.0f} s to exit\n{_logs(first)}"
    assert not [pid for pid in workers[0] if pid_alive(pid)], "host A's training process is still running"
    assert not (tmp_path / "out" / "final").exists()
    resume_step = _resume_step(tmp_path / "out")
    assert SAVE_EVERY <= resume_step < STEPS

    second = tmp_path / "second"
    second.mkdir()
    codes = _wait_all(_netns_torchrun(netns_pair, cfg, second), timeout=300)
    assert codes == [0, 0], _logs(second)
    assert f"resumed from {tmp_path / 'out' / 'checkpoints' / f'step-{resume_step}'}" in _logs(second)
    worst = _assert_final_equal(tmp_path / "out", reference)
    print(f"resumed at step {resume_step}; vs one process: worst relative weight error {worst:.2e}")


def test_netns_network_partition_times_out_instead_of_hanging(netns_pair, tmp_path, tiny_t5_dir, tiny_data):
    """Host B's link goes down mid-run: no connection is reset, so only the collective timeout can end
    the blocked ranks -- both must exit non-zero after backend.timeout_minutes (here 0.25 min), not hang."""
    timeout_minutes = 0.25
    cfg = multi_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out",
                       timeout_minutes=timeout_minutes)
    procs = _start_until_checkpoint(netns_pair, cfg, tmp_path / "out", tmp_path,
                                    step_delay_hook(tmp_path / "hook", STEP_DELAY))
    netns_pair.set_link(1, up=False)
    try:
        cut_at = time.monotonic()
        codes = _wait_all(procs, timeout=timeout_minutes * 60 + 120)
        elapsed = time.monotonic() - cut_at
    finally:
        netns_pair.set_link(1, up=True)
    print(f"exit codes {codes}, {elapsed:.1f} s after the link went down")
    log = _logs(tmp_path)
    assert all(code != 0 for code in codes), log
    assert timeout_minutes * 60 - 1 <= elapsed < timeout_minutes * 60 + EXIT_SLACK, f"{elapsed:.0f} s\n{log}"
    assert log.count(f"Timed out waiting {int(timeout_minutes * 60_000)}ms") >= 2, log


# ------------------------------------------------------------------------------------------------ MPI

def _mpiexec() -> str:
    if importlib.util.find_spec("mpi4py") is None:
        unavailable("mpirun tests need the mpi extra: pip install 'fsam-dist[mpi]'")
    found = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
    if found is None:
        unavailable("no mpiexec (pip install mpich)")
    return found


def test_mpirun_two_processes_equals_one_process(reference, tmp_path, tiny_t5_dir, tiny_data):
    """mpirun -n 2 python launch/train.py: ranks from PMI_*/OMPI_* variables, rendezvous over mpi4py."""
    mpirun = _mpiexec()
    cfg = multi_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out")
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}   # if mpirun is Open MPI's
    result = check(launch([mpirun, "-n", "2", PYTHON, TRAIN, "--config", str(cfg)], timeout=300, env=env))
    assert "backend ddp, 2 process(es), global batch 8" in result.stderr, result.stderr[-3000:]
    worst = _assert_final_equal(tmp_path / "out", reference)
    print(f"mpirun -n 2 vs one process: worst relative weight error {worst:.2e}")


def test_mpiexec_across_two_hosts_equals_one_process(netns_pair, reference, tmp_path, tiny_t5_dir, tiny_data):
    """MPICH's mpiexec on host A starts one rank on each host (its ssh launcher replaced by `ip netns
    exec`): rank 0 must advertise its 198.51.100.1 address, not a loopback one."""
    mpirun = _mpiexec()
    if "hydra" not in subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout.lower():
        unavailable(f"{mpirun} is not MPICH's Hydra (the test drives its -launcher-exec)")
    cfg = multi_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out")
    script = hydra_netns_launcher(netns_pair, tmp_path / "netns-ssh.sh")
    cmd = netns_pair.exec(0, [mpirun, "-n", "2", "-ppn", "1", "-hosts", ",".join(netns_pair.addresses),
                              "-launcher", "ssh", "-launcher-exec", str(script), "-iface", netns_pair.ifname,
                              "-genv", "GLOO_SOCKET_IFNAME", netns_pair.ifname, PYTHON, TRAIN, "--config", str(cfg)])
    result = check(launch(cmd, timeout=300))
    assert "backend ddp, 2 process(es), global batch 8" in result.stderr, result.stderr[-3000:]
    worst = _assert_final_equal(tmp_path / "out", reference)
    print(f"mpiexec on 2 hosts vs one process: worst relative weight error {worst:.2e}")
