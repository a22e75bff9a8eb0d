"""The SLURM launchers against a real one-node SLURM cluster that this file starts itself
(tools/slurm_local.sh, as root; skipped with the reason otherwise): slurm/pretrain.sh trains on 2 CPU
tasks, survives an `scontrol requeue` and its own time-limit signal (USR1 -> requeue) and ends at the
right step; tools/submit.py (submitit, cluster=slurm) does the same, requeued through checkpoint().
Tiny settings: the whole file takes about 3 minutes on 2 cores."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test here launches DeepSpeed training or SLURM

SLURM_LOCAL = ROOT / "tools" / "slurm_local.sh"
TINY = "--batch-size 4 --workers 0 --log-every 4 --warmup-steps 2"  # 2 ranks x 4 = 8 samples a step
# Pending for one of these reasons, a job never starts on this cluster.
NEVER_STARTS = {"PartitionConfig", "PartitionTimeLimit", "PartitionNodeLimit", "ReqNodeNotAvail", "BadConstraints",
                "InvalidQOS", "JobHeldAdmin", "JobHeldUser", "NodeDown"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _two_free_ports() -> int:
    """A port p with p + 1 free too (slurmctld, slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 60000:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node cluster in a temp state dir: the environment for sbatch/scontrol/submit.py."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux: tools/slurm_local.sh installs SLURM/munge and starts the daemons as root")
    if os.environ.get("MLIP_SKIP_SLURM") == "1":
        pytest.skip("MLIP_SKIP_SLURM=1")
    state = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_", "MLIP_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["MLIP_SLURM_PORT"] = str(_two_free_ports())
    env["MLIP_SLURM_CPUS"] = str(max(2, len(os.sched_getaffinity(0))))  # the jobs run 2 tasks
    r = subprocess.run(["bash", str(SLURM_LOCAL), "start", str(state)], env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode == 3:
        pytest.skip(f"tools/slurm_local.sh: {r.stderr.strip()}")
    if r.returncode == 4:
        apt_log = (state / "apt.log").read_text()[-1500:] if (state / "apt.log").exists() else ""
        pytest.skip(f"SLURM packages could not be installed: {r.stderr.strip()}\n{apt_log}")
    assert r.returncode == 0, f"tools/slurm_local.sh start failed:\n{r.stderr}\n{_daemon_logs(state)}"
    assert r.stdout.strip() == f"export SLURM_CONF={state}/slurm.conf", r.stdout
    env.update(SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if (Path(sys.prefix) / "bin" / "activate").exists():
        env["MLIP_VENV"] = sys.prefix  # the jobs run in the virtualenv running the tests
    # start is idempotent: a second call finds the daemons and returns at once
    again = subprocess.run(["bash", str(SLURM_LOCAL), "start", str(state)], env=env, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "already running" in again.stderr, again.stderr
    yield {"env": env, "state": state}
    stop = subprocess.run(["bash", str(SLURM_LOCAL), "stop", str(state)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert not (state / "run" / "slurmctld.pid").exists() and not (state / "run" / "slurmd.pid").exists()


def _daemon_logs(state: Path) -> str:
    text = ""
    for name in ("slurmctld.log", "slurmd.log"):
        p = state / "log" / name
        if p.exists():
            text += f"--- {name}\n" + "\n".join(p.read_text().splitlines()[-15:]) + "\n"
    return text


def _job(slurm, job_id: str) -> dict:
    r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=slurm["env"], capture_output=True,
                       text=True, timeout=30)
    return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)


def _wait(cond, what: str, slurm, job_id: str, timeout: float, logs=()) -> None:
    """Poll cond() until true; fail with the job's state and logs if the job ends first or time runs out."""
    start = time.time()
    while not cond():
        info = _job(slurm, job_id)
        if info.get("JobState") in ENDED and not cond():
            time.sleep(2)  # files may trail the job's end
            if cond():
                return
            pytest.fail(f"job {job_id} ended ({info.get('JobState')}) before: {what}\n{_tails(logs)}"
                        f"{_daemon_logs(slurm['state'])}")
        if info.get("JobState") == "PENDING" and info.get("Reason") in NEVER_STARTS and time.time() - start > 10:
            pytest.fail(f"job {job_id} cannot start: pending with reason {info['Reason']}\n"
                        f"{_daemon_logs(slurm['state'])}")
        if time.time() - start > timeout:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for: {what}; job {job_id} is "
                        f"{info.get('JobState')} ({info.get('Reason')})\n{_tails(logs)}{_daemon_logs(slurm['state'])}")
        time.sleep(0.3)


def _tails(paths) -> str:
    out = ""
    for p in paths:
        p = Path(p)
        if p.exists():
            lines = [ln[-300:] for ln in p.read_text(errors="replace").splitlines() if "it/s]" not in ln]
            out += f"--- {p.name}\n" + "\n".join(lines[-25:]) + "\n"
    return out


def _latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip()[4:])
    except (FileNotFoundError, ValueError):
        return -1


def _sbatch(slurm, tmp_path, shards, out, samples, save_every) -> tuple[str, list[Path]]:
    env = dict(slurm["env"], MLIP_SHARDS=str(shards), MLIP_OUT=str(out), MLIP_SAVE_EVERY=str(save_every),
               MLIP_ARGS=f"{TINY} --samples-per-epoch {samples}")
    r = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
                        f"--output={tmp_path}/job-%j.out", f"--error={tmp_path}/job-%j.err", "slurm/pretrain.sh"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    return job_id, [tmp_path / f"job-{job_id}.out", tmp_path / f"job-{job_id}.err"]


def _completed(slurm, job_id):
    return lambda: _job(slurm, job_id).get("JobState") == "COMPLETED"


def test_sbatch_two_tasks_train_and_checkpoint(slurm, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    job_id, logs = _sbatch(slurm, tmp_path, synthetic_shards["train"], out, samples=64, save_every=4)
    _wait(_completed(slurm, job_id), "the job to complete", slurm, job_id, 300, logs)
    info = _job(slurm, job_id)
    assert info["ExitCode"] == "0:0" and info["NumTasks"] == "2", info
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 8 and summary["world_size"] == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000008"
    assert (out / "checkpoints" / "step00000004").is_dir()
    log = logs[1].read_text()
    assert "2 tasks on" in log and "accelerator cpu" in log
    assert "no checkpoint in" in log  # --resume latest on a first start begins from scratch


def test_sbatch_requeue_and_time_limit_signal_resume(slurm, synthetic_shards, tmp_path):
    """First an external `scontrol requeue` after the first checkpoint, then (in the restarted job)
    the batch script's own time-limit path (USR1 -> forward to train.py -> `scontrol requeue`);
    the third start finishes at the full step count."""
    out = tmp_path / "run"
    job_id, logs = _sbatch(slurm, tmp_path, synthetic_shards["train"], out, samples=768, save_every=8)
    err = logs[1]
    _wait(lambda: _latest_step(out) >= 8, "the first checkpoint", slurm, job_id, 300, logs)
    r = subprocess.run(["scontrol", "requeue", job_id], env=slurm["env"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    def resumed(restart):
        text = err.read_text(errors="replace") if err.exists() else ""
        part = text.split(f"restart {restart}] 2 tasks on", 1)
        found = re.findall(r"resumed from \S*step(\d+)", part[1]) if len(part) == 2 else []
        return int(found[0]) if found else None

    _wait(lambda: resumed(1) is not None, "the requeued job to resume", slurm, job_id, 300, logs)
    first_resume = resumed(1)
    assert first_resume >= 8
    # Time limit near: SLURM would send USR1 to the batch shell (--signal=B:USR1@...); do it now.
    _wait(lambda: _latest_step(out) > first_resume, "a checkpoint after the resume", slurm, job_id, 300, logs)
    r = subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm["env"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    _wait(lambda: resumed(2) is not None, "the second restart to resume", slurm, job_id, 300, logs)
    _wait(_completed(slurm, job_id), "the job to complete", slurm, job_id, 300, logs)

    info = _job(slurm, job_id)
    assert info["Restarts"] == "2" and info["ExitCode"] == "0:0", info
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 96 and summary["samples_seen"] == 96 * 8, summary
    log = err.read_text(errors="replace")
    assert "time limit near (USR1)" in log and "requeueing" in log, _tails(logs)
    assert "stopped by SIGUSR1" in log, _tails(logs)  # train.py saved a checkpoint on the forwarded signal
    assert resumed(2) > first_resume
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000096"


def _submit(slurm, out, samples, save_every, wait=False):
    cmd = [sys.executable, str(ROOT / "tools" / "submit.py"), "--cluster", "slurm", "--shards",
           str(slurm["shards"]), "--out", str(out), "--save-every", str(save_every), "--tasks-per-node", "2",
           "--cpus-per-task", "1", "--timeout-min", "10", "--stop-grace-s", "60"]
    cmd += ["--wait"] if wait else []
    cmd += ["--"] + TINY.split() + ["--samples-per-epoch", str(samples)]
    r = subprocess.run(cmd, cwd=ROOT, env=slurm["env"], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+) \(slurm\)", r.stdout).group(1)
    folder = out / "submitit"
    logs = [folder / f"{job_id}_{t}_log.{ext}" for t in (0, 1) for ext in ("out", "err")]
    return job_id, r, folder, logs


@pytest.fixture
def slurm_shards(slurm, synthetic_shards):
    pytest.importorskip("submitit", reason="tools/submit.py needs submitit: pip install submitit==1.5.4")
    return dict(slurm, shards=synthetic_shards["train"])


def test_submitit_slurm_runs_to_completion(slurm_shards, tmp_path):
    out = tmp_path / "run"
    job_id, r, folder, logs = _submit(slurm_shards, out, samples=64, save_every=4, wait=True)
    printed = json.loads(r.stdout[r.stdout.index("{"):])
    assert printed["step"] == 8 and printed["world_size"] == 2
    import submitit
    results = submitit.SlurmJob(folder, job_id, tasks=(0, 1)).results()
    assert [res["step"] for res in results] == [8, 8]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000008"
    submission = (folder / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --requeue" in submission and "#SBATCH --signal=USR2@" in submission
    assert "rank 1/2" in logs[2].read_text()


def test_submitit_slurm_requeued_through_checkpoint(slurm_shards, tmp_path):
    out = tmp_path / "run"
    job_id, _, folder, logs = _submit(slurm_shards, out, samples=768, save_every=8)
    _wait(lambda: _latest_step(out) >= 8, "the first checkpoint", slurm_shards, job_id, 300, logs)
    # What SLURM sends before the time limit (--signal=USR2@...), and what job._interrupt(timeout=True) does.
    r = subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_shards["env"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pickles = [folder / f"{job_id}_{t}_result.pkl" for t in (0, 1)]
    _wait(lambda: all(p.exists() for p in pickles), "both tasks' results", slurm_shards, job_id, 400, logs)

    import submitit
    results = submitit.SlurmJob(folder, job_id, tasks=(0, 1)).results()
    assert [res["step"] for res in results] == [96, 96], results
    _wait(_completed(slurm_shards, job_id), "the job to complete", slurm_shards, job_id, 60, logs)
    assert _job(slurm_shards, job_id)["Restarts"] == "1"
    rank0 = logs[0].read_text(errors="replace") + logs[1].read_text(errors="replace")
    assert "Calling checkpoint method" in rank0 and "Requeued job" in rank0, _tails(logs)
    assert "stopped by SIGUSR1" in rank0, _tails(logs)  # checkpoint() let train.py save before the requeue
    resumed = [int(s) for s in re.findall(r"resumed from \S*step(\d+)", rank0)]
    assert len(resumed) == 1 and 8 <= resumed[0] < 96, _tails(logs)
