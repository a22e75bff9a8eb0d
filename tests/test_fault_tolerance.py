"""Never lose a run: kill -9 and resume step-exactly, a kill inside a save, non-finite losses,
and a preemption signal, each on a real 2-rank DeepSpeed CPU run."""
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, deepspeed_cmd, read_train_log, train_env


def _args(shards, out, **over):
    opts = {"--train-shards": shards, "--out-dir": out, "--batch-size": 4, "--samples-per-epoch": 96,
            "--epochs": 1, "--save-every": 4, "--log-every": 1, "--workers": 2, "--warmup-steps": 2,
            "--lr": 1e-3, "--seed": 5}
    opts.update(over)
    return [x for kv in opts.items() for x in kv] + ["--deterministic"]


def _run(args, env=None, timeout=300):
    return subprocess.run(deepspeed_cmd(args), cwd=ROOT, env=env or train_env(), capture_output=True,
                          text=True, timeout=timeout)


def _ok(r):
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def _wait_for_step(out, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if max(read_train_log(out), default=0) >= step:
            return
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_kill9_then_resume_gives_the_uninterrupted_losses(synthetic_shards, tmp_path):
    shards = synthetic_shards["train"]
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    _ok(_run(_args(shards, ref_out)))
    reference = read_train_log(ref_out)
    assert sorted(reference) == list(range(1, 13))

    proc = subprocess.Popen(deepspeed_cmd(_args(shards, out)), cwd=ROOT, env=train_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_step(out, 6, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(read_train_log(out))
    assert killed_at < 12
    resumed = _run(_args(shards, out) + ["--resume", "latest"])
    _ok(resumed)
    tag = (out / "checkpoints" / "latest").read_text()
    assert tag == "step00000012"
    after = read_train_log(out)
    resumed_from = int(resumed.stderr.split("resumed from")[1].split("step")[1][:8])
    assert 4 <= resumed_from <= killed_at
    for step in range(resumed_from + 1, 13):
        a, b = reference[step]["loss/total"], after[step]["loss/total"]
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
        assert reference[step]["lr"] == after[step]["lr"]
    assert json.loads((out / "summary.json").read_text())["step"] == 12


@pytest.mark.slow
def test_kill_inside_a_save_leaves_a_loadable_latest(synthetic_shards, tmp_path):
    out = tmp_path / "run"
    r = _run(_args(synthetic_shards["train"], out), env=train_env(MLIP_FAULT_INJECT="kill_in_save:8"))
    assert r.returncode != 0
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000004"
    assert (ckpts / "step00000008").is_dir() and not (ckpts / "step00000008" / "COMPLETE").exists()
    resumed = _run(_args(synthetic_shards["train"], out) + ["--resume", "latest"])
    _ok(resumed)
    assert "step00000004" in resumed.stderr.split("resumed from")[1].splitlines()[0]
    assert json.loads((out / "summary.json").read_text())["step"] == 12
    assert not (ckpts / "step00000008").exists() or (ckpts / "step00000008" / "COMPLETE").exists()


@pytest.mark.slow
def test_non_finite_losses_are_skipped_then_stop_the_run(synthetic_shards, tmp_path):
    out = tmp_path / "nan"
    r = _run(_args(synthetic_shards["train"], out, **{"--epochs": 1}),
             env=train_env(MLIP_FAULT_INJECT="nan_at:3"))
    _ok(r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nan_skipped"] == 1 and summary["step"] == 11  # one update skipped on both ranks
    assert "non-finite loss at step 3" in r.stderr

    out = tmp_path / "nan_stop"
    r = _run(_args(synthetic_shards["train"], out, **{"--max-nan-steps": 3}),
             env=train_env(MLIP_FAULT_INJECT="nan_at:3,4,5"))
    assert r.returncode != 0
    assert "3 non-finite losses in a row" in r.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"


@pytest.mark.slow
def test_preemption_signal_checkpoints_and_resumes(synthetic_shards, tmp_path):
    out = tmp_path / "preempted"
    proc = subprocess.Popen(deepspeed_cmd(_args(synthetic_shards["train"], out, **{"--save-every": 0})),
                            cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    _wait_for_step(out, 5, proc)
    ranks = subprocess.run(["pgrep", "-f", f"train.py --local_rank=.*{out}"], capture_output=True, text=True)
    for pid in ranks.stdout.split():
        os.kill(int(pid), signal.SIGUSR1)  # what SLURM sends before the time limit
    output, _ = proc.communicate(timeout=120)
    assert "stopped by SIGUSR1" in output
    tag = (out / "checkpoints" / "latest").read_text()
    stopped_at = int(tag[4:])
    assert 5 <= stopped_at < 12
    _ok(_run(_args(synthetic_shards["train"], out) + ["--resume", "latest"]))
    assert json.loads((out / "summary.json").read_text())["step"] == 12


@pytest.mark.slow
def test_non_finite_loss_skipped_by_deepspeeds_overflow_check_in_bf16(synthetic_shards, tmp_path):
    """--nan-check deepspeed (with a config that leaves bf16.check_grad_overflow on) skips the
    optimizer step through DeepSpeed's own gradient-overflow check, on every rank; here in bf16 on CPU,
    with the full MLIP objective: the path a GPU runs (fp32 EMA towers under autocast, the
    co-occurrence table guarded on the device)."""
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["bf16"] = {"enabled": True}
    ds_path = tmp_path / "zero2_bf16.json"
    ds_path.write_text(json.dumps(cfg))
    out = tmp_path / "nan_ds"
    r = subprocess.run(deepspeed_cmd(_args(synthetic_shards["train"], out, **{"--nan-check": "deepspeed",
                                                                             "--objective": "mlip"}),
                                     ds_config=str(ds_path)),
                       cwd=ROOT, env=train_env(MLIP_FAULT_INJECT="nan_at:3"), capture_output=True, text=True,
                       timeout=300)
    _ok(r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16"
    assert summary["nan_skipped"] == 1 and summary["step"] == 11, summary
    assert "non-finite loss at step 3" in r.stderr
    log = read_train_log(out)
    assert all(rec["loss/total"] == rec["loss/total"] for rec in log.values())  # finite after the skip
    # Without bf16/fp16 DeepSpeed checks nothing: refused before the run starts.
    r = _run(_args(synthetic_shards["train"], tmp_path / "refused", **{"--nan-check": "deepspeed"}))
    assert r.returncode != 0 and "--nan-check deepspeed needs" in r.stderr


@pytest.mark.slow
def test_corrupt_latest_checkpoint_loses_only_itself(synthetic_shards, tmp_path):
    """Truncate the newest checkpoint's model states: --resume latest skips it (naming it) for the
    older intact one and finishes; with every checkpoint damaged it stops and says why."""
    shards, out = synthetic_shards["train"], tmp_path / "run"
    args = _args(shards, out, **{"--samples-per-epoch": 48, "--save-every": 2, "--log-every": 2})
    _ok(_run(args))
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000006"
    marker = json.loads((ckpts / "step00000006" / "COMPLETE").read_text())
    assert "mp_rank_00_model_states.pt" in marker["files"] and "trainer_rank1.json" in marker["files"]
    states = ckpts / "step00000006" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])

    resumed = _run(args + ["--resume", "latest"])
    _ok(resumed)
    assert "step00000006" in resumed.stderr.split("skipped damaged checkpoint(s)")[1].splitlines()[0]
    assert "mp_rank_00_model_states.pt is" in resumed.stderr
    assert "step00000004" in resumed.stderr.split("resumed from")[1].splitlines()[0]
    assert json.loads((out / "summary.json").read_text())["step"] == 6
    assert not _damage(ckpts / "step00000006")  # saved again, intact

    for tag in ("step00000002", "step00000004", "step00000006"):
        states = ckpts / tag / "mp_rank_00_model_states.pt"
        states.write_bytes(states.read_bytes()[:100])
    failed = _run(args + ["--resume", "latest"])
    assert failed.returncode == 2
    error = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "no intact checkpoint" in error[0], failed.stderr[-3000:]
    assert all(t in error[0] for t in ("step00000002", "step00000004", "step00000006"))
    assert "another objective" not in failed.stderr


def _damage(tag_dir):
    from mlip_ds.checkpoint import damage
    return damage(tag_dir)


def test_checksums_catch_a_changed_byte_and_old_markers_load_unverified(tmp_path, caplog):
    from mlip_ds.checkpoint import COMPLETE, file_digests
    tag = tmp_path / "step00000004"
    (tag / "global_step4").mkdir(parents=True)
    (tag / "global_step4" / "optim.pt").write_bytes(b"x" * 1000)
    (tag / "trainer_rank0.json").write_text("{}")
    (tag / COMPLETE).write_text(json.dumps({"files": file_digests(tag)}))
    assert _damage(tag) is None
    (tag / "global_step4" / "optim.pt").write_bytes(b"x" * 999 + b"y")  # same size, one byte changed
    assert _damage(tag) == "global_step4/optim.pt does not match its sha256 checksum"
    (tag / "trainer_rank0.json").unlink()
    assert _damage(tag) == "trainer_rank0.json is missing"
    (tag / COMPLETE).write_text("")  # a marker written before checksums existed
    with caplog.at_level("INFO", logger="mlip_ds.checkpoint"):
        assert _damage(tag) is None
    assert "no checksums" in caplog.text and "unverified" in caplog.text


@pytest.mark.slow
def test_a_hung_loader_worker_is_replaced_and_the_run_is_unchanged(synthetic_shards, tmp_path):
    """A worker that hangs at its start (CPython < 3.11.8 can leave a forked worker so, gh-112275)
    costs --loader-timeout seconds, not the run: the rank rebuilds its loader at the same stream
    positions and trains the same losses as a run without the hang."""
    shards = synthetic_shards["train"]
    ref_out, out = tmp_path / "reference", tmp_path / "stalled"
    args = {"--epochs": 2, "--loader-timeout": 10}
    _ok(_run(_args(shards, ref_out, **args)))
    marker = tmp_path / "stalled-once"
    r = _run(_args(shards, out, **args), env=train_env(MLIP_FAULT_INJECT=f"stall_worker:1:{marker}"))
    _ok(r)
    assert marker.exists() and "rebuilding the loader" in r.stderr
    reference, after = read_train_log(ref_out), read_train_log(out)
    assert sorted(after) == sorted(reference) == list(range(1, 25))
    for step in reference:
        a, b = reference[step]["loss/total"], after[step]["loss/total"]
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
    assert json.loads((out / "summary.json").read_text())["loader_restarts"] == 1
    assert json.loads((ref_out / "summary.json").read_text())["loader_restarts"] == 0


@pytest.mark.slow
def test_a_loader_that_keeps_stalling_stops_the_run_with_a_clear_error(synthetic_shards, tmp_path):
    """Not a hung fork but data that never comes: after 3 rebuilds at one step the run stops and says
    what to check, instead of rebuilding for ever."""
    r = _run(_args(synthetic_shards["train"], tmp_path / "stuck", **{"--loader-timeout": 3}),
             env=train_env(MLIP_FAULT_INJECT="stall_worker:0:"))
    assert r.returncode != 0
    assert "the data loader stalled 4 times at step 0" in r.stdout + r.stderr


def test_the_fork_hang_warning_names_affected_pythons_only():
    from mlip_ds.data.pipeline import fork_hang_warning
    msg = fork_hang_warning(workers=1, world=2, version=(3, 11, 7))
    assert "3.11.7" in msg and "gh-112275" in msg and "3.11.8" in msg
    assert fork_hang_warning(1, 2, (3, 11, 0))
    for workers, world, version in [(1, 2, (3, 11, 8)), (1, 2, (3, 12, 1)), (1, 2, (3, 10, 14)),
                                    (0, 2, (3, 11, 7)), (1, 1, (3, 11, 7))]:
        assert fork_hang_warning(workers, world, version) == "", (workers, world, version)
