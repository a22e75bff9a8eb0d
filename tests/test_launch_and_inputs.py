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


@pytest.mark.slow
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


def _launcher(args, ranks=2, ds_config="zero2.json", timeout=240):
    from conftest import deepspeed_cmd
    return subprocess.run(deepspeed_cmd(args, ranks=ranks, ds_config=ds_config), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_batch_size_zero_is_one_clear_error_before_any_rank_trains(synthetic_shards, tmp_path):
    """Tried as a new user would: it ended in a ZeroDivisionError traceback from every rank."""
    r = _launcher(["--train-shards", synthetic_shards["train"], "--out-dir", tmp_path / "b0", "--batch-size", "0",
                   "--lr", "0"])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "ZeroDivisionError" not in r.stderr
    errors = _error_lines(r.stderr)
    assert len(errors) == 1, r.stderr[-3000:]  # once, not once per rank
    assert "--batch-size 0: must be >= 1" in errors[0] and "--lr 0.0: must be > 0" in errors[0]
    assert not (tmp_path / "b0").exists()  # no rank got as far as the run folder


def test_flag_ranges_come_from_the_config_metadata():
    from mlip_ds.config import TrainConfig, range_errors
    cfg = TrainConfig()
    assert range_errors(cfg) == []  # the defaults are in range
    cfg.data.batch_size, cfg.data.workers, cfg.data.text_word_dropout = 0, -1, 1.5
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_accum, cfg.optim.beta2 = -1e-3, -1, 0, 1.0
    cfg.run.epochs, cfg.run.log_every = 0, 0
    cfg.model.init_temperature = 0.0
    cfg.objective.lambda_local, cfg.objective.swap_prob, cfg.objective.local_temperature = -1.0, 1.2, 0.0
    cfg.objective.proto_temperature = float("nan")
    got = "\n".join(range_errors(cfg))
    for want in ("--batch-size 0: must be >= 1", "--workers -1: must be >= 0", "--text-word-dropout 1.5: must be <= 1",
                 "--lr -0.001: must be > 0", "--warmup-steps -1: must be >= 1", "--grad-accum 0: must be >= 1",
                 "--beta2 1.0: must be < 1", "--epochs 0: must be >= 1", "--log-every 0: must be >= 1",
                 "--init-temperature 0.0: must be > 0", "--lambda-local -1.0: must be >= 0",
                 "--swap-prob 1.2: must be <= 1", "--local-temperature 0.0: must be > 0",
                 "--proto-temperature nan: must be"):
        assert want in got, (want, got)


@pytest.mark.slow
def test_global_batch_that_the_world_size_does_not_divide(synthetic_shards, tmp_path):
    from mlip_ds.config import TrainConfig
    from mlip_ds.ds_config import DSConfigError, check_batch, load_ds_config
    ds = load_ds_config(DS_CONFIG)
    ds["train_batch_size"] = 32
    cfg = TrainConfig()
    cfg.data.batch_size = 4
    with pytest.raises(DSConfigError, match="does not divide over 3 ranks"):
        check_batch(ds, cfg, 3)
    with pytest.raises(DSConfigError, match="16 samples per rank on 2 ranks.*use --grad-accum 4"):
        check_batch(ds, cfg, 2)
    cfg.optim.grad_accum = 4
    check_batch(ds, cfg, 2)  # 4 x 4 x 2 = 32
    ds_path = tmp_path / "global32.json"
    ds["train_batch_size"] = 9
    ds_path.write_text(json.dumps(ds))
    r = _launcher(["--train-shards", synthetic_shards["train"], "--out-dir", tmp_path / "g", "--batch-size", "4"],
                  ds_config=str(ds_path))
    assert r.returncode == 2
    errors = _error_lines(r.stderr)
    assert len(errors) == 1 and "train_batch_size = 9" in errors[0] and "does not divide over 2 ranks" in errors[0]
    assert "DeepSpeed info" not in r.stdout + r.stderr  # before deepspeed.initialize


@pytest.mark.slow
def test_checkpoint_of_another_model_config_is_refused_with_the_keys_that_differ(synthetic_shards, tmp_path):
    out = tmp_path / "run"
    common = ["--train-shards", synthetic_shards["train"], "--out-dir", out, "--batch-size", "4",
              "--samples-per-epoch", "8", "--workers", "1"]
    first = _plain_python(common)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoints" / "step00000002" / "run.json").exists()
    wider = json.loads((ROOT / "mlip_ds" / "model" / "configs" / "tiny.json").read_text())
    wider["vision_cfg"]["width"] = 96
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    r = _plain_python(common + ["--model", tmp_path / "wider.json", "--resume", "latest"])
    assert r.returncode == 2, r.stderr[-3000:]
    errors = _error_lines(r.stderr)
    assert len(errors) == 1, r.stderr[-3000:]
    assert "saved by another model configuration" in errors[0]
    assert "vision_cfg.width (saved 64, now 96)" in errors[0] and "with another shape" in errors[0]
    assert "Traceback" not in r.stderr
    # A checkpoint saved on another number of ranks is converted, not refused:
    # tests/test_world_size_resume.py.


def _pretrain_sh(tmp_path, **slurm_env):
    """slurm/pretrain.sh up to srun, with scontrol/srun stubs (no cluster needed)."""
    import os
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (stubs / "srun").write_text("#!/bin/sh\necho srun-started\n")
    for f in ("scontrol", "srun"):
        os.chmod(stubs / f, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLIP_"))}
    env.update(PATH=f"{stubs}:{env['PATH']}", MLIP_SHARDS=str(tmp_path), MLIP_OUT=str(tmp_path / "out"),
               SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost", **slurm_env)
    return subprocess.run(["bash", str(ROOT / "slurm" / "pretrain.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_pretrain_sh_refuses_tasks_that_do_not_spread_over_the_nodes(tmp_path):
    r = _pretrain_sh(tmp_path, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="3", SLURM_TASKS_PER_NODE="2,1")
    assert r.returncode == 2 and "3 tasks do not match 2 nodes" in r.stderr and "srun-started" not in r.stdout
    r = _pretrain_sh(tmp_path, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
                     SLURM_TASKS_PER_NODE="1(x2)")
    assert r.returncode == 2 and "ntasks-per-node: 2" in r.stderr
    ok = _pretrain_sh(tmp_path, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2",
                      SLURM_TASKS_PER_NODE="2(x2)")
    assert ok.returncode == 0 and "srun-started" in ok.stdout, ok.stderr
