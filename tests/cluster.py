"""Real clusters on this one machine for tests/test_multinode.py.

- :class:`SlurmCluster`: munged + slurmctld + two slurmd (nodes n1, n2 on 127.0.0.1, distinct ports),
  all private to one directory (own munge key and socket, own slurm.conf, free ports), stopped by pid.
- :class:`NetnsPair`: two "hosts" -- network namespaces joined by a veth pair, 198.51.100.1/24 and
  198.51.100.2/24, each with the interface named ``fsam0`` (like eth0 on two real hosts).
- :func:`step_delay_hook`: a ``sitecustomize`` that slows every training step down, so that a test can
  kill a process between two checkpoints without racing the run.

Everything needs root (and apt-get for SLURM); where that is missing the tests are skipped with the reason
(failed instead under .ci/run, which sets FSAM_TESTS_REQUIRE_ALL=1).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import unavailable

SLURM_PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge"}
_apt_updated = False


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"{what} needs root (this is uid {os.geteuid()})")


def ensure_packages(binaries: dict[str, str]) -> None:
    """apt-get install the packages of the missing binaries (apt-get update at most once a session);
    skip the test with the reason when that is impossible."""
    global _apt_updated
    missing = sorted({pkg for binary, pkg in binaries.items() if shutil.which(binary) is None})
    if not missing:
        return
    require_root(f"installing {', '.join(missing)}")
    if shutil.which("apt-get") is None:
        unavailable(f"{', '.join(missing)} missing and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = ([] if _apt_updated else [["apt-get", "update", "-qq"]]) + [["apt-get", "install", "-y", "-qq", *missing]]
    for cmd in steps:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            unavailable(f"`{' '.join(cmd)}` failed ({result.returncode}): {(result.stdout + result.stderr)[-800:]}")
        if cmd[1] == "update":
            _apt_updated = True
    still = [b for b in binaries if shutil.which(b) is None]
    if still:
        unavailable(f"installed {missing} but {still} still not found")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pids(pids: list[int], grace: float = 10.0) -> list[int]:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL what is left. Returns the pids that needed SIGKILL."""
    pids = [p for p in pids if pid_alive(p)]
    _send(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if pid_alive(p)]
    _send(killed, signal.SIGKILL)
    return killed


def _send(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:   # exited meanwhile
            pass


def pgrep(pattern: str) -> list[int]:
    result = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in result.stdout.split() if int(p) != os.getpid()]


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of processes whose environment has ``name=value`` (as root: every process's)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and pid_alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def process_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def process_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def children(pid: int) -> list[int]:
    """Every descendant of ``pid``."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


# ---------------------------------------------------------------------------------------------- SLURM

SLURM_CONF = """\
# written by tests/cluster.py: two simulated nodes on this machine
ClusterName=fsamtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={n1_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=120
NodeName=n1 NodeAddr=127.0.0.1 Port={n1_port} CPUs=1 RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port={n2_port} CPUs=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


class SlurmCluster:
    """munged, slurmctld and ``slurmd -N n1`` / ``slurmd -N n2`` under ``root``; clients use ``self.env``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.nodes = ("n1", "n2")

    # -- lifecycle
    def start(self) -> None:
        for sub in ("munge", "state", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(SLURM_CONF.format(root=self.root, ctld_port=free_port(), n1_port=free_port(),
                                               n2_port=free_port()))
        self._daemon(["munged", "--force", f"--socket={munge}/munge.sock", f"--key-file={key}",
                      f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                      f"--seed-file={munge}/munged.seed"], munge / "munged.pid")
        self._daemon(["slurmctld", "-f", str(self.conf)], self.root / "run" / "slurmctld.pid")
        for node in self.nodes:
            self._daemon(["slurmd", "-f", str(self.conf), "-N", node], self.root / "run" / f"slurmd-{node}.pid")
        wait_for(lambda: self._node_states() == ["idle"] * len(self.nodes), 60, "both nodes idle "
                 f"(sinfo: {self._node_states()}; logs in {self.root / 'log'})", interval=0.5)

    def _daemon(self, cmd: list[str], pid_file: Path) -> None:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60,
                                start_new_session=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        wait_for(lambda: pid_file.is_file() and pid_file.read_text().strip(), 30, f"{pid_file}")

    def daemon_pids(self) -> list[int]:
        files = [self.root / "munge" / "munged.pid", self.root / "run" / "slurmctld.pid",
                 *(self.root / "run" / f"slurmd-{n}.pid" for n in self.nodes)]
        return [int(f.read_text().strip()) for f in files if f.is_file() and f.read_text().strip()]

    def stop(self) -> None:
        """Cancel every job, stop the daemons by pid file (slurmd, slurmctld, then munged), and check
        that nothing of this cluster is left: no daemon, no slurmstepd, no job process."""
        leftovers: list[int] = []
        if (self.root / "run" / "slurmctld.pid").is_file():
            jobs = self.run(["squeue", "-h", "-o", "%A"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                try:
                    wait_for(lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(), 30, "jobs to end")
                except TimeoutError:
                    pass
        pids = self.daemon_pids()
        munged = pids[:1]
        stop_pids(pids[1:])      # slurmd/slurmctld first: they still talk to munged while stopping
        stop_pids(munged)
        # job processes carry SLURM_CONF=<ours> (sbatch exports it), slurmstepd inherits it from slurmd
        leftovers = sorted(set(processes_with_env("SLURM_CONF", str(self.conf)) + pgrep(str(self.root))))
        if leftovers:
            described = {p: " ".join(process_cmdline(p))[:120] for p in leftovers}
            stop_pids(leftovers, grace=2)
            raise AssertionError(f"processes of the test cluster outlived its daemons (now killed): {described}")
        assert not pgrep(str(self.root)), "pgrep still finds cluster processes"

    # -- clients
    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, env={**self.env, **kwargs.pop("env", {})}, capture_output=True, text=True,
                                timeout=kwargs.pop("timeout", 60), **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def _node_states(self) -> list[str]:
        result = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return sorted(result.stdout.split()) if result.returncode == 0 else []

    def sbatch(self, args: list[str], env: dict, cwd: Path) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait for the job to reach a final state; returns its record."""
        def final():
            record = self.job(job_id)
            return record if record["JobState"] in FINAL_STATES else None
        try:
            return wait_for(final, timeout, f"job {job_id}", interval=0.5)
        except TimeoutError:
            self.run(["scancel", str(job_id)], check=False)
            raise

    def requeue(self, job_id: int) -> None:
        """Requeue a finished job (same id) and let it start now: SLURM otherwise holds a requeued job
        back for two minutes (BeginTime)."""
        old_end = self.job(job_id).get("EndTime")
        self.run(["scontrol", "requeue", str(job_id)])
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

        # Under load slurmctld can still report the old final record for a moment after the
        # requeue; a wait() then would return it. Wait until the requeued run is visible.
        def requeued():
            record = self.job(job_id)
            return record["JobState"] not in FINAL_STATES or record.get("EndTime") != old_end
        wait_for(requeued, 60, f"job {job_id} to be requeued", interval=0.2)


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory):
    require_root("a SLURM cluster (slurmd as root)")
    ensure_packages(SLURM_PACKAGES)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


# ---------------------------------------------------------------------------- network namespaces

class NetnsPair:
    """Two network namespaces ("hosts") joined by a veth pair; interface ``fsam0`` in both."""

    addresses = ("198.51.100.1", "198.51.100.2")
    ifname = "fsam0"

    def __init__(self, tag: str):
        self.names = (f"fsamtest-a-{tag}", f"fsamtest-b-{tag}")
        self._veth = (f"fsv{tag}a", f"fsv{tag}b")

    def _ip(self, *args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")

    def create(self) -> None:
        for name in self.names:
            self._ip("netns", "add", name)
        self._ip("link", "add", self._veth[0], "type", "veth", "peer", "name", self._veth[1])
        for name, veth, address in zip(self.names, self._veth, self.addresses):
            self._ip("link", "set", veth, "netns", name)
            self._ip("-n", name, "link", "set", veth, "name", self.ifname)
            self._ip("-n", name, "addr", "add", f"{address}/24", "dev", self.ifname)
            self._ip("-n", name, "link", "set", self.ifname, "up")
            self._ip("-n", name, "link", "set", "lo", "up")

    def pids(self, index: int) -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", self.names[index]], capture_output=True, text=True)
        return [int(p) for p in result.stdout.split()]

    def set_link(self, index: int, up: bool) -> None:
        self._ip("-n", self.names[index], "link", "set", self.ifname, "up" if up else "down")

    def exec(self, index: int, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[index], *args]

    def delete(self) -> None:
        """Kill what still runs inside (by pid), delete both namespaces (the veth pair goes with them)."""
        leftovers = [p for i in range(2) for p in self.pids(i)]
        stop_pids(leftovers, grace=2)
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for name in self.names:
            if name in existing:
                subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        remaining = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(name in remaining for name in self.names), remaining
        assert not leftovers, f"processes were still running in the namespaces (now killed): {leftovers}"


@pytest.fixture(scope="session", name="netns_pair")
def netns_pair_fixture():
    require_root("network namespaces")
    if shutil.which("ip") is None:
        ensure_packages({"ip": "iproute2"})
    pair = NetnsPair(str(os.getpid() % 10_000_000))
    try:
        pair.create()
    except RuntimeError as err:
        pair.delete()
        unavailable(f"cannot create network namespaces here: {err}")
    yield pair
    pair.delete()


def hydra_netns_launcher(pair: NetnsPair, path: Path) -> Path:
    """A script for ``mpiexec -launcher ssh -launcher-exec SCRIPT``: Hydra calls it like ssh
    (``[-x] HOST COMMAND``); it runs COMMAND inside HOST's namespace instead of over ssh."""
    cases = "\n".join(f"    {addr}) ns={name} ;;" for addr, name in zip(pair.addresses, pair.names))
    path.write_text(f"""#!/bin/bash
while [[ "$1" == -* ]]; do shift; done
host="$1"; shift
case "$host" in
{cases}
    *) echo "no namespace for host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" bash -c "$*"
""")
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------- slow steps

SITECUSTOMIZE = '''\
"""Test hook (tests/cluster.py): FSAM_TEST_STEP_DELAY=SECONDS sleeps after every training step, so a
test can kill a process between two checkpoints. Only fsam_dist.train.step.train_step is wrapped."""
import os

_delay = float(os.environ.get("FSAM_TEST_STEP_DELAY") or 0)
if _delay > 0:
    import importlib.abc
    import importlib.util
    import sys
    import time

    class _SlowSteps(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "fsam_dist.train.step":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                step = module.train_step

                def slow_step(*args, **kwargs):
                    out = step(*args, **kwargs)
                    time.sleep(_delay)
                    return out

                module.train_step = slow_step

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _SlowSteps())
'''


def step_delay_hook(directory: Path, seconds: float) -> dict[str, str]:
    """Environment that makes every training step of a launched run ``seconds`` longer."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    # keep a PYTHONPATH already set (a worktree that puts its own checkout first)
    path = os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "FSAM_TEST_STEP_DELAY": str(seconds)}
