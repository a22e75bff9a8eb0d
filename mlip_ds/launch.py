"""Launching the trainer (or a worker script) from Python: the command, its environment, a free port.

One place for what the tests, the benchmarks, the ablation runner and the GPU check each start::

    cmd = deepspeed_cmd(["--train-shards", shards, "--out-dir", out], ranks=2)
    subprocess.run(cmd, cwd=ROOT, env=train_env(), check=True)

``deepspeed_cmd`` is the user's ``deepspeed --num_gpus R mlip_ds/train.py --deepspeed_config CFG ARGS``
(the launcher run as ``python -m deepspeed.launcher.runner``, which is what the ``deepspeed`` script
does). No torch or DeepSpeed import at module level: it is cheap to import.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "mlip_ds" / "train.py"
DS_CONFIGS = ROOT / "ds_configs"
# What a launcher (deepspeed, torchrun, srun via slurm/pretrain.sh) sets for its children. A launch
# from inside such a process must not inherit them: the new launcher sets its own.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def train_env(**extra) -> dict:
    """This process's environment for a launch: no inherited launcher variables (``LAUNCHER_VARS``),
    ``OMP_NUM_THREADS=1`` unless set, ``DS_ACCELERATOR=cpu`` on a machine without CUDA unless set,
    unbuffered output, the repository first on ``PYTHONPATH``; then ``extra`` (values as strings)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in LAUNCHER_VARS:
        env.pop(var, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    if "DS_ACCELERATOR" not in env and "DS_ACCELERATOR" not in extra and not _cuda_available():
        env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # This Python's bin first on PATH: DeepSpeed builds its CPU comm op with the first ninja there, and a
    # venv's ninja and the system's hash commands differently, so launches that found different ones
    # rebuilt each other's op in the shared torch_extensions cache (every start then waited for a build).
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def deepspeed_cmd(args: Iterable = (), ranks: int = 2, ds_config: str | os.PathLike | None = "zero2.json",
                  port: int | None = None, script: str | os.PathLike = TRAIN_SCRIPT) -> list[str]:
    """``python -m deepspeed.launcher.runner --num_gpus RANKS --master_port PORT SCRIPT
    [--deepspeed_config CFG] ARGS``: ``ds_config`` a file name in ds_configs/ or a path (None: no
    flag, for worker scripts that read no config), ``port`` a free one when not given."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(port or free_port()), str(script)]
    if ds_config is not None:
        cmd += ["--deepspeed_config", str(DS_CONFIGS / ds_config)]
    return cmd + [str(a) for a in args]
