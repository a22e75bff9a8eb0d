#!/usr/bin/env python
"""Submit MLIP pretraining with submitit: the same settings as slurm/pretrain.sh, from Python.

    python tools/submit.py --cluster slurm --shards data/train --out runs/clip --epochs 5 \\
        --nodes 1 --tasks-per-node 2 --cpus-per-task 1 --timeout-min 60 -- --batch-size 32 --lr 1e-3

Settings default to the same environment variables as slurm/pretrain.sh (MLIP_SHARDS, MLIP_OUT,
MLIP_DS_CONFIG, MLIP_MODEL, MLIP_EPOCHS, MLIP_SAVE_EVERY, MLIP_ARGS, MLIP_VENV); flags override
them; train.py flags after `--` come last. `--cluster` is always handed to submitit explicitly
(submitit's auto-detection picks SLURM whenever `srun` is installed): `slurm`, `local` (processes on
this machine) or `debug` (in this process, one task).

Each task runs `python mlip_ds/train.py ... --resume latest` as a child process with RANK,
LOCAL_RANK and WORLD_SIZE taken from submitit.JobEnvironment(), MASTER_ADDR the first node's
NodeAddr (`scontrol show node`, as slurm/pretrain.sh; node names need not resolve) and
MASTER_PORT 20000 + crc32(job id) mod 20000 (or MLIP_MASTER_PORT). Why a
child process and not `mlip_ds.train.main()` in the task process: train.py installs its own
SIGTERM/SIGUSR1 handlers (checkpoint at the next step, exit 75) and submitit installs SIGUSR2
(checkpoint + requeue) and SIGTERM handlers in the task process; in one process the two fight,
and submitit's handler would requeue from inside a training step before any checkpoint is written.
As a child, train.py runs exactly as under the deepspeed launcher or srun, ignores SIGUSR2 (which
SLURM sends to every process of the step), and the parent stays a thin supervisor: on SIGUSR2
(time limit near, or preemption) rank 0's `checkpoint()` sends SIGUSR1 to its child, waits for the
checkpoint (train.py agrees on the stop across ranks by an all-reduce, so one rank's signal stops
them all), and returns a DelayedSubmission of itself; submitit then requeues the job, and the next
start resumes from <out>/checkpoints/latest.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_INTERRUPTED = 75  # train.py: stopped by SIGTERM/SIGUSR1 with a checkpoint saved


def _has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def slurm_node_addr(node: str) -> str:
    """The address SLURM reaches `node` at (its NodeAddr in `scontrol show node`); the node name itself
    where scontrol does not answer or shows none."""
    try:
        r = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return node
    for word in r.stdout.split():
        if word.startswith("NodeAddr="):
            return word.split("=", 1)[1] or node
    return node


class Pretrain:
    """One training task of a submitit job; picklable (the running child process is not pickled).

    `settings` is a plain dict: shards, out, ds_config, model, epochs, save_every, args (list of extra
    train.py flags), python (interpreter for the child), root, cpus_per_task, stop_grace_s, and
    optionally requeue_wait_s (how long a task whose training was stopped by a signal waits to be
    requeued before it reports an error; default stop_grace_s + 60).
    """

    def __init__(self, settings: dict):
        self.settings = dict(settings)
        self._proc: subprocess.Popen | None = None
        self._rc: int | None = None

    def __getstate__(self):
        return {"settings": self.settings}

    def __setstate__(self, state):
        self.settings = state["settings"]
        self._proc, self._rc = None, None

    def train_argv(self) -> list[str]:
        s = self.settings
        argv = [str(Path(s["root"]) / "mlip_ds" / "train.py"), "--deepspeed_config", s["ds_config"],
                "--train-shards", s["shards"], "--out-dir", s["out"], "--save-every", str(s["save_every"])]
        if s.get("model"):
            argv += ["--model", s["model"]]
        if s.get("epochs"):
            argv += ["--epochs", str(s["epochs"])]
        return argv + list(s.get("args", [])) + ["--resume", "latest"]

    def rank_env(self) -> dict:
        import submitit
        env = submitit.JobEnvironment()
        # The rendezvous is the first node of the job, at the address SLURM itself reaches it by (as in
        # slurm/pretrain.sh): node names need not resolve on the other nodes.
        master = slurm_node_addr(env.hostnames[0]) if env.cluster == "slurm" else "127.0.0.1"
        port = os.environ.get("MLIP_MASTER_PORT") or str(20000 + zlib.crc32(str(env.job_id).encode()) % 20000)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK") or str(self.settings.get("cpus_per_task") or 1)
        out = {"RANK": str(env.global_rank), "LOCAL_RANK": str(env.local_rank),
               "WORLD_SIZE": str(env.num_tasks), "LOCAL_WORLD_SIZE": str(max(1, env.num_tasks // env.num_nodes)),
               "MASTER_ADDR": master, "MASTER_PORT": port, "OMP_NUM_THREADS": cpus, "PYTHONUNBUFFERED": "1"}
        if not _has_gpu():
            out["DS_ACCELERATOR"] = "cpu"
        return out

    def __call__(self) -> dict:
        env = dict(os.environ, **self.rank_env())
        self._forget_earlier_result()
        argv = [self.settings["python"], "-u"] + self.train_argv()
        rank = env["RANK"]
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        print(f"[submit.py] rank {rank}/{env['WORLD_SIZE']} on node {node}, restart "
              f"{os.environ.get('SLURM_RESTART_COUNT', '0')}, master {env['MASTER_ADDR']}:{env['MASTER_PORT']}: "
              f"{shlex.join(argv)}", flush=True)
        # The child ignores SIGUSR2 (submitit's time-limit/preemption signal, sent by SLURM to every
        # process of the step); SIGTERM and SIGUSR1 reach train.py's own handler.
        self._proc = subprocess.Popen(argv, cwd=self.settings["root"], env=env,
                                      preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
        # A helper thread reaps the child; this (main) thread only sleeps. submitit's signal handler
        # runs checkpoint() in the main thread: had it interrupted a Popen.wait(), Popen's internal
        # lock would be held and checkpoint() could never see the child exit.
        self._rc = None
        threading.Thread(target=self._reap, daemon=True).start()
        while self._rc is None:
            time.sleep(0.2)
        rc = self._rc
        if rc == 0:
            summary_path = Path(self.settings["out"]) / "summary.json"
            return json.loads(summary_path.read_text()) if summary_path.exists() else {"rank": int(rank)}
        if rc in (EXIT_INTERRUPTED, -signal.SIGTERM):
            # Stopped by a signal: the job is being requeued (rank 0's checkpoint(), or SLURM's
            # preemption) or cancelled. EXIT_INTERRUPTED: train.py saved a checkpoint. -SIGTERM: SLURM
            # stops every process of a job it requeues; a train.py that had already saved and was
            # finalizing (Python restores the default SIGTERM action at interpreter shutdown) dies of
            # it. Neither is a failure of this task: raising would write an error result file, which
            # whoever waits for the requeued job would read as its result; wait to be stopped instead.
            print(f"[submit.py] rank {rank}: training stopped by a signal (status {rc}); waiting for the "
                  "requeue", flush=True)
            time.sleep(float(self.settings.get("requeue_wait_s", float(self.settings.get("stop_grace_s", 120)) + 60)))
            raise RuntimeError(f"training was stopped by a signal (status {rc}) but the job was not requeued; "
                               "resubmit with the same --out to resume from its last checkpoint")
        raise RuntimeError(f"training (rank {rank}) exited with status {rc}; see this task's log")

    def _forget_earlier_result(self) -> None:
        """Remove this task's result file left by an earlier start of the same (requeued) job: a task
        that ended while the job was being requeued may have written one, and whoever waits for the
        job's results would read it as this start's. Called after rank_env(), so inside a job."""
        import submitit
        path = submitit.JobEnvironment().paths.result_pickle
        if path.exists():
            print(f"[submit.py] removing {path.name} from an earlier start of this job", flush=True)
            path.unlink(missing_ok=True)

    def _reap(self) -> None:
        self._rc = self._proc.wait()

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 when the job times out or is preempted: let the child save a
        checkpoint and stop, then requeue a fresh copy of this task (it resumes with --resume latest)."""
        import submitit
        proc = self._proc
        if proc is not None and getattr(self, "_rc", None) is None:
            grace = float(self.settings.get("stop_grace_s", 120))
            print(f"[submit.py] time limit/preemption: SIGUSR1 to training (pid {proc.pid}), "
                  f"waiting up to {grace:.0f}s for its checkpoint", flush=True)
            try:
                os.kill(proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            deadline = time.time() + grace
            while self._rc is None and time.time() < deadline:
                time.sleep(0.2)
            if self._rc is None:
                print("[submit.py] training did not stop in time: requeueing from the last periodic "
                      "checkpoint", flush=True)
            else:
                print(f"[submit.py] training stopped (status {self._rc}): requeueing", flush=True)
        return submitit.helpers.DelayedSubmission(Pretrain(self.settings), *args, **kwargs)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Extra train.py flags go after `--`.")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], default=os.environ.get("MLIP_CLUSTER", "slurm"),
                   help="submitit executor, always passed explicitly (default: $MLIP_CLUSTER or slurm)")
    g = p.add_argument_group("training (defaults: the MLIP_* variables of slurm/pretrain.sh)")
    g.add_argument("--shards", default=os.environ.get("MLIP_SHARDS", ""), help="training shards (MLIP_SHARDS)")
    g.add_argument("--out", default=os.environ.get("MLIP_OUT", ""), help="run folder (MLIP_OUT)")
    g.add_argument("--ds-config", default=os.environ.get("MLIP_DS_CONFIG", "ds_configs/zero2.json"),
                   help="DeepSpeed JSON (MLIP_DS_CONFIG)")
    g.add_argument("--model", default=os.environ.get("MLIP_MODEL", ""), help="--model (MLIP_MODEL)")
    g.add_argument("--epochs", type=int, default=_env_int("MLIP_EPOCHS", 0), help="--epochs (MLIP_EPOCHS)")
    g.add_argument("--save-every", type=int, default=_env_int("MLIP_SAVE_EVERY", 100),
                   help="checkpoint every N steps (MLIP_SAVE_EVERY, default 100)")
    g.add_argument("--args", default=os.environ.get("MLIP_ARGS", ""),
                   help="extra train.py flags as one string (MLIP_ARGS)")
    g.add_argument("--venv", default=os.environ.get("MLIP_VENV", ""),
                   help="virtualenv whose python runs the jobs (MLIP_VENV; default: this python)")
    r = p.add_argument_group("resources")
    r.add_argument("--nodes", type=int, default=1)
    r.add_argument("--tasks-per-node", type=int, default=2, help="ranks per node (one per GPU on GPU nodes)")
    r.add_argument("--cpus-per-task", type=int, default=1)
    r.add_argument("--gpus-per-node", type=int, default=0)
    r.add_argument("--timeout-min", type=int, default=60)
    r.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    r.add_argument("--name", default="mlip-pretrain", help="job name")
    r.add_argument("--folder", default="", help="submitit logs and pickles (default: <out>/submitit)")
    r.add_argument("--signal-delay-s", type=int, default=180,
                   help="SIGUSR2 this many seconds before the time limit (checkpoint + requeue; slurm only, "
                        "local uses submitit's 30 s)")
    r.add_argument("--stop-grace-s", type=int, default=120,
                   help="how long rank 0 waits for training to save its checkpoint (keep < --signal-delay-s)")
    r.add_argument("--max-num-timeout", type=int, default=20, help="requeues after time-outs before giving up")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its summary")
    return p


def make_settings(a: argparse.Namespace, extra: list[str]) -> dict:
    if not a.shards:
        raise SystemExit("error: --shards (or MLIP_SHARDS) is required: a folder from tools/make_shards.py")
    if not a.out:
        raise SystemExit("error: --out (or MLIP_OUT) is required: the run folder (fixed across requeues)")

    def absolute(path: str) -> str:
        return path if os.path.isabs(path) or any(c in path for c in "{*?[") else str(Path(path).resolve())

    python = str(Path(a.venv) / "bin" / "python") if a.venv else sys.executable
    return {"shards": absolute(a.shards), "out": absolute(a.out), "ds_config": absolute(a.ds_config),
            "model": a.model, "epochs": a.epochs, "save_every": a.save_every,
            "args": shlex.split(a.args) + list(extra), "python": python, "root": str(ROOT),
            "cpus_per_task": a.cpus_per_task, "stop_grace_s": a.stop_grace_s}


def make_executor(a: argparse.Namespace, folder: str, python: str):
    import submitit
    kwargs = {}
    if a.cluster == "slurm":
        kwargs = {"slurm_max_num_timeout": a.max_num_timeout, "slurm_python": shlex.quote(python)}
    elif a.cluster == "local":
        kwargs = {"local_max_num_timeout": a.max_num_timeout, "local_python": shlex.quote(python)}
    executor = submitit.AutoExecutor(folder=folder, cluster=a.cluster, **kwargs)
    params = {"name": a.name, "timeout_min": a.timeout_min, "nodes": a.nodes,
              "tasks_per_node": a.tasks_per_node, "cpus_per_task": a.cpus_per_task}
    if a.gpus_per_node:
        params["gpus_per_node"] = a.gpus_per_node
    if a.cluster == "slurm":
        # One failed rank ends the step instead of leaving the others waiting in a collective.
        params.update(slurm_signal_delay_s=a.signal_delay_s, slurm_srun_args=["--kill-on-bad-exit=1"],
                      slurm_additional_parameters={"requeue": True})
        if a.partition:
            params["slurm_partition"] = a.partition
    if a.cluster == "debug":
        params = {"timeout_min": a.timeout_min}
    executor.update_parameters(**params)
    return executor


def submit(argv: list[str] | None = None):
    """Parse flags, submit, return the submitit job (and print its id)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = build_parser().parse_args(argv)
    if a.cluster == "debug" and (a.nodes != 1 or a.tasks_per_node != 1):
        a.nodes, a.tasks_per_node = 1, 1  # the debug executor runs one task in this process
    if a.cluster == "local" and a.nodes != 1:
        raise SystemExit("error: --cluster local runs on this machine only: --nodes 1")
    settings = make_settings(a, extra)
    folder = a.folder or str(Path(settings["out"]) / "submitit")
    executor = make_executor(a, folder, settings["python"])
    job = executor.submit(Pretrain(settings))
    print(f"submitted job {job.job_id} ({a.cluster}): logs in {folder}", flush=True)
    return job, a


SLURM_ENDED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "COMPLETED"}


def slurm_job_state(job_id: str) -> str:
    """The job's state from `scontrol show job` ("" if SLURM no longer knows it). Unlike submitit's
    own watcher this needs no accounting database (sacct)."""
    r = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30)
    for word in r.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return ""


def wait_results(job, poll_s: float = 2.0, timeout_s: float | None = None) -> list:
    """Every task's return value, once all have written their result file; raises if the SLURM job
    ends without them (failed, cancelled, timed out and not requeued)."""
    if not isinstance(job, __import__("submitit").SlurmJob):
        return job.results()
    tasks = getattr(job, "_sub_jobs", None) or [job]
    start, ended_at = time.time(), None
    while not all(t.paths.result_pickle.exists() for t in tasks):
        state = slurm_job_state(job.job_id)
        if state in SLURM_ENDED or state == "":
            ended_at = ended_at or time.time()
            if time.time() - ended_at > 15:  # result files can trail the job's end a little
                raise RuntimeError(f"job {job.job_id} ended ({state or 'unknown to scontrol'}) without results; "
                                   f"see {job.paths.folder}")
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"job {job.job_id} still {state} after {timeout_s:.0f}s")
        time.sleep(poll_s)
    return job.results()


def main(argv: list[str] | None = None) -> None:
    job, a = submit(argv)
    if a.wait or a.cluster == "debug":
        results = wait_results(job)
        print(json.dumps(results[0], indent=2))


if __name__ != "__main__":
    # Imported (tests, notebooks): pickle Pretrain by value, so job processes need not import this file.
    try:
        import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    except (ImportError, AttributeError, ValueError):
        pass

if __name__ == "__main__":
    main()
