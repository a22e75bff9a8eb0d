"""Process-group start-up: DeepSpeed's ``init_distributed`` plus the clean-up it leaves out."""
from __future__ import annotations

import os

import deepspeed
import torch.distributed as dist

from mlip_ds.launch import free_port

SHM_DIR = "/dev/shm"
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Set by mpirun / MPI launchers: DeepSpeed's own MPI discovery handles those.
MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


class LaunchError(RuntimeError):
    """The process was started in a way that cannot give it a rank; says how to start it."""


def init_distributed() -> None:
    """``single_process_env()``, ``deepspeed.init_distributed()``, then ``release_shm_buffers()``."""
    single_process_env()
    deepspeed.init_distributed()
    release_shm_buffers()


def single_process_env(environ=None) -> bool:
    """``python mlip_ds/train.py ...`` without a launcher: one process, rank 0 of 1.

    Without RANK/WORLD_SIZE/LOCAL_RANK, ``deepspeed.init_distributed`` falls back to MPI discovery,
    which needs mpi4py (and an MPI launch). When no launcher set them (deepspeed, torchrun, srun via
    slurm/pretrain.sh) and no MPI launcher is present, set rank 0 of 1 on 127.0.0.1 and a free port,
    as nanoGPT's and open_clip's scripts do. Returns True when it did. Under ``srun`` with several
    tasks but no RANK (each task would think it is alone) it raises ``LaunchError``.
    """
    env = os.environ if environ is None else environ
    if any(v in env for v in RANK_VARS) or any(v in env for v in MPI_VARS):
        return False
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) if "SLURM_PROCID" in env else 1
    if tasks > 1:
        raise LaunchError(f"started by srun as one of {tasks} tasks, but RANK/WORLD_SIZE/LOCAL_RANK are not set: "
                          "submit slurm/pretrain.sh (it sets them from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), "
                          "or run one task (srun -n 1) or use the deepspeed launcher")
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE=env.get("LOCAL_WORLD_SIZE", "1"))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return True


def launch_world_size(environ=None) -> int:
    """The world size the launcher announced (before the process group exists); 1 without one."""
    env = os.environ if environ is None else environ
    for var in ("WORLD_SIZE",) + MPI_VARS[:2] + ("MV2_COMM_WORLD_SIZE",):
        if env.get(var, "").isdigit():
            return int(env[var])
    return 1


def shm_buffer_name(rank: int, addr: str | None = None, port: str | None = None) -> str:
    """The name DeepSpeed's CPU all-reduce gives a rank's shared-memory buffer (``shm.cpp``)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffers() -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer once every rank has mapped it.

    Why by hand: with all ranks on one machine, DeepSpeed's CPU communication op creates a 66 MB
    buffer per rank in /dev/shm (RAM) at start-up and never unlinks it, so every run, finished or
    killed, leaves 66 MB per rank behind until the machine reboots (we found 19 GB of them after a
    day of tests). DeepSpeed's start-up waits until each rank has mapped every other rank's buffer,
    so after a barrier the names can go: the mappings stay valid, and the kernel frees the memory
    when the ranks exit, however they exit. No-op where the buffer does not exist (GPU, several nodes).
    """
    if not dist.is_initialized():
        return
    path = os.path.join(SHM_DIR, shm_buffer_name(dist.get_rank()))
    dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
