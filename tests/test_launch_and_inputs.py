"""Starting the trainer as a new user would: `python mlip_ds/train.py ...` without a launcher runs as
one process; wrong inputs end with one clear `error: ...` line (exit 2) before any rank trains."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, train_env

DS_CONFIG = str(ROOT / "ds_configs" / "zero2.json")


def _plain_python(args, env=None, timeout=240):
    """The command without a launcher: python mlip_ds/train.py --deepspeed_config ... ARGS."""
    cmd = [sys.executable, str(ROOT / "mlip_ds" / "train.py"), "--deepspeed_config", DS_CONFIG] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=env or train_env(), capture_output=True, text=True, timeout=timeout)


def test_plain_python_without_launcher_trains_as_one_process(synthetic_shards, tmp_path):
    out = tmp_path / "plain"
    r = _plain_python(["--train-shards", synthetic_shards["train"], "--out-dir", out, "--batch-size", "4",
                       "--samples-per-epoch", "16", "--workers", "1", "--log-every", "1"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mpi4py" not in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["step"] == 4


def test_single_process_env_rules():
    from mlip_ds.distributed import LaunchError, launch_world_size, single_process_env
    env = {}
    assert single_process_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert int(env["MASTER_PORT"]) > 0 and launch_world_size(env) == 1
    kept = {"MASTER_PORT": "29555"}
    assert single_process_env(kept) and kept["MASTER_PORT"] == "29555"  # a port the user chose stays
    launched = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert not single_process_env(launched) and launched == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert launch_world_size(launched) == 2
    assert not single_process_env({"OMPI_COMM_WORLD_SIZE": "4"})  # mpirun: DeepSpeed's MPI discovery
    assert single_process_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"})
    with pytest.raises(LaunchError, match="slurm/pretrain.sh"):  # srun -n 2 python train.py: no ranks
        single_process_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"})
