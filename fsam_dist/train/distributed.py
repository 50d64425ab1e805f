"""Process-group set-up for every launcher (torchrun, deepspeed, accelerate, mpirun, srun).

Everything here runs once per process; the FSAM collectives themselves are in core/comm.py.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

HOST_BARRIER_TIMEOUT = datetime.timedelta(hours=2)
"""How long :func:`host_barrier` waits (rank 0 hashing a large checkpoint while the others wait)."""
_host_group = None
"""A gloo group over all ranks when the default group is NCCL (see :func:`host_barrier`)."""

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                       "PALS_LOCAL_RANKID", "SLURM_LOCALID")
"""Local rank under Open MPI, MVAPICH2, MPICH/Hydra, PMI, Cray PALS, and srun (``--mpi=pmi2/pmix``
sets PMI_RANK/PMIX_RANK but no local rank of its own). SLURM_LOCALID comes last: under ``mpirun``
inside an sbatch script it is the batch step's 0 on every rank."""


@dataclass
class DistEnv:
    """Where this process sits, read from the launcher's environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    """'none' (plain python), 'torchrun' (also deepspeed/accelerate launchers), or 'mpi'."""

    @property
    def distributed(self) -> bool:
        return self.launcher != "none"


def _first(names) -> str | None:
    return next((os.environ[n] for n in names if n in os.environ), None)


def detect_env() -> DistEnv:
    """Rank and world size from RANK/WORLD_SIZE (torchrun, deepspeed, accelerate) or from an MPI
    launcher's variables (Open MPI, MPICH/Hydra, PMIx)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                       int(os.environ.get("LOCAL_RANK", "0")), "torchrun")
    rank, size = _first(MPI_RANK_VARS), _first(MPI_SIZE_VARS)
    if rank is not None and size is not None:
        return DistEnv(int(rank), int(size), int(_first(MPI_LOCAL_RANK_VARS) or 0), "mpi")
    return DistEnv()


def device_for(env: DistEnv) -> torch.device:
    """This process's device: ``cuda:<local rank>`` (made current) when CUDA is available, else the
    CPU. A local rank beyond the visible GPUs is an error, never a modulo: two ranks on one GPU
    fail later in NCCL ("Duplicate GPU detected") or silently share it."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise RuntimeError(f"local rank {env.local_rank} but only {count} GPU(s) visible on this node "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at "
                           f"most {count} processes per node, or check the launcher's local-rank variable "
                           f"({', '.join(('LOCAL_RANK',) + MPI_LOCAL_RANK_VARS)})")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def init(env: DistEnv, dist_backend: str, timeout_minutes: float, use_deepspeed: bool) -> torch.device:
    """Pick this process's device (:func:`device_for`), then start the default process group bound
    to it (no process group for a single plain process). Returns the device."""
    device = device_for(env)
    if not env.distributed or dist.is_initialized():
        return device
    backend = dist_backend if dist_backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if env.launcher == "mpi":
        # MPI launchers set ranks but no rendezvous: rank 0's address is broadcast over MPI.
        _mpi_rendezvous(env)
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # device_id binds the group to this GPU (NCCL then never guesses one from the rank).
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    if use_deepspeed:
        import deepspeed

        from ..shards.deepspeed_internals import skip_cpu_shm_build

        if backend == "gloo":
            skip_cpu_shm_build()

        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        # DeepSpeed adopts the process group started above.
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
    if backend == "nccl":
        global _host_group
        _host_group = dist.new_group(backend="gloo", timeout=HOST_BARRIER_TIMEOUT)
    return device


def _mpi_rendezvous(env: DistEnv) -> None:
    """MASTER_ADDR/MASTER_PORT for ``init_process_group`` under mpirun: rank 0 picks a free port and
    the address the other ranks can reach it at, and broadcasts both over MPI.

    The address: MASTER_ADDR if the environment sets it; 127.0.0.1 when every rank shares rank 0's
    network stack (one host); otherwise rank 0's address on GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
    if set, else its address on a subnet that holds another host's address, else what its hostname
    resolves to. A hostname that resolves to a loopback address (Debian's 127.0.1.1) is never sent
    to other hosts."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("launched by mpirun but mpi4py is missing: pip install 'fsam-dist[mpi]' "
                           "(mpi4py and an MPI runtime, e.g. mpich)") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != env.world_size:
        raise RuntimeError(f"MPI world size {comm.Get_size()} != launcher's {env.world_size}")
    hosts = comm.allgather((_network_stack_id(), _ipv4_interfaces()))
    message = None
    if env.rank == 0:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        try:
            message = ("ok", _master_address(hosts), port)
        except RuntimeError as err:
            message = ("error", str(err), 0)
    status, address, port = comm.bcast(message, root=0)
    if status != "ok":   # every rank raises, none waits for a rank 0 that gave up
        raise RuntimeError(address)
    os.environ.setdefault("MASTER_ADDR", address)
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))


def _network_stack_id() -> tuple:
    """Equal for two processes exactly when they share a network stack (same kernel, same network
    namespace), i.e. when 127.0.0.1 of one is 127.0.0.1 of the other."""
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return (boot, os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return (socket.gethostname(),)


def _ipv4_interfaces() -> list[tuple[str, str, str]]:
    """(interface, address, netmask) of this host's non-loopback IPv4 interfaces."""
    import socket

    try:
        import psutil
    except ImportError:
        return []
    return [(name, a.address, a.netmask or "255.255.255.255") for name, addrs in psutil.net_if_addrs().items()
            for a in addrs if a.family == socket.AF_INET and not a.address.startswith("127.")]


def _master_address(hosts: list[tuple[tuple, list]]) -> str:
    """Rank 0's address for the others (see :func:`_mpi_rendezvous`); ``hosts[r]`` is rank r's
    (network stack id, interfaces)."""
    import ipaddress
    import socket

    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    my_stack, mine = hosts[0]
    if all(stack == my_stack for stack, _ in hosts):
        return "127.0.0.1"
    wanted = [n.strip().lstrip("=") for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
              for n in os.environ.get(var, "").split(",") if n.strip() and not n.strip().startswith("^")]
    for prefix in wanted:
        for name, address, _ in mine:
            if name == prefix or name.startswith(prefix):
                return address
    others = [ipaddress.ip_address(address) for stack, interfaces in hosts if stack != my_stack
              for _, address, _ in interfaces]
    for _, address, netmask in mine:
        network = ipaddress.ip_network(f"{address}/{netmask}", strict=False)
        if any(other in network for other in others):
            return address
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    if not address.startswith("127."):
        return address
    raise RuntimeError("mpirun across hosts: cannot tell which address of rank 0's host the others reach "
                       f"(its hostname resolves to {address}, no shared subnet found); set MASTER_ADDR "
                       "(e.g. mpirun -genv MASTER_ADDR=<rank 0 host's IP>) or GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def host_barrier() -> None:
    """A barrier for waits on host work (rank 0 hashing and verifying a checkpoint): a gloo
    ``monitored_barrier`` with :data:`HOST_BARRIER_TIMEOUT`, never an NCCL collective, so the NCCL
    watchdog (backend.timeout_minutes) does not kill the waiting ranks; a rank that never arrives
    is named in the error."""
    if not dist.is_initialized():
        return
    group = _host_group
    if group is None and dist.get_backend() != "gloo":
        dist.barrier()   # another backend without a gloo side group (not one we start)
        return
    dist.monitored_barrier(group=group, timeout=HOST_BARRIER_TIMEOUT, wait_all_ranks=True)


def shutdown() -> None:
    global _host_group
    _host_group = None
    if dist.is_initialized():
        dist.destroy_process_group()
