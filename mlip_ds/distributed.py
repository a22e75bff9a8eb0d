"""Process-group start-up: DeepSpeed's ``init_distributed`` plus the clean-up it leaves out."""
from __future__ import annotations

import os

import deepspeed
import torch.distributed as dist

SHM_DIR = "/dev/shm"


def init_distributed() -> None:
    """``deepspeed.init_distributed()``, then ``release_shm_buffers()``."""
    deepspeed.init_distributed()
    release_shm_buffers()


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
