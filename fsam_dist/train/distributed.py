"""Process-group set-up for every launcher (torchrun, deepspeed, accelerate, mpirun, srun).

Everything here runs once per process; the FSAM collectives themselves are in core/comm.py.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PALS_LOCAL_RANKID")


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
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(env: DistEnv, dist_backend: str, timeout_minutes: float, use_deepspeed: bool) -> None:
    """Start the default process group (no-op for a single plain process)."""
    if not env.distributed or dist.is_initialized():
        return
    backend = dist_backend if dist_backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if env.launcher == "mpi":
        # MPI launchers set ranks but no rendezvous: rank 0's address is broadcast over MPI.
        _mpi_rendezvous(env)
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if use_deepspeed:
        import deepspeed

        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
    else:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)


def _mpi_rendezvous(env: DistEnv) -> None:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("launched by mpirun but mpi4py is missing: pip install 'fsam-dist[mpi]' "
                           "(mpi4py and an MPI runtime, e.g. mpich)") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != env.world_size:
        raise RuntimeError(f"MPI world size {comm.Get_size()} != launcher's {env.world_size}")
    address = None
    if env.rank == 0:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        address = (os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname()), port)
    address = comm.bcast(address, root=0)
    os.environ.setdefault("MASTER_ADDR", address[0])
    os.environ.setdefault("MASTER_PORT", str(address[1]))
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
