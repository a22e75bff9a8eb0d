"""tools/submit.py's task supervisor, in seconds and without SLURM: how a task ends when its training
child ends, inside a real submitit (local) job environment. The full requeue path runs against real
SLURM in test_slurm.py; this pins the two cases a requeue can leave behind there, which are timing
dependent on a real cluster: a child killed by SLURM's SIGTERM while it was finishing, and a result
file written by an earlier start of the same job."""
import importlib.util
import os
import signal
import stat
import sys

import pytest

from conftest import ROOT

pytest.importorskip("submitit", reason="tools/submit.py needs submitit: pip install submitit==1.5.4")


def _load_submit(monkeypatch):
    spec = importlib.util.spec_from_file_location("mlip_submit_under_test", ROOT / "tools" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def task(tmp_path, monkeypatch):
    """A Pretrain task whose 'python' is a script that ends the way the test says, in a local job env."""
    folder = tmp_path / "submitit"
    folder.mkdir()
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    for key, value in {"SUBMITIT_FOLDER": str(folder), "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "7",
                       "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
                       "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "0",
                       "SUBMITIT_LOCAL_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    submit = _load_submit(monkeypatch)

    def make(ending: str):
        script = tmp_path / "fake_python"
        script.write_text(f"#!/bin/sh\n{ending}\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        settings = {"shards": str(tmp_path), "out": str(tmp_path / "run"), "ds_config": "zero2.json", "model": "",
                    "epochs": 0, "save_every": 4, "args": [], "python": str(script), "root": str(ROOT),
                    "cpus_per_task": 1, "stop_grace_s": 0, "requeue_wait_s": 0.1}
        return submit.Pretrain(settings), folder / "7_0_result.pkl"
    return make


def test_child_killed_by_sigterm_waits_for_the_requeue_instead_of_failing(task):
    pretrain, _ = task("kill -TERM $$")
    with pytest.raises(RuntimeError, match=rf"stopped by a signal \(status {-signal.SIGTERM}\) but the job was not "
                                           "requeued"):
        pretrain()


def test_child_failure_is_reported_with_its_status(task):
    pretrain, _ = task("exit 3")
    with pytest.raises(RuntimeError, match=r"exited with status 3"):
        pretrain()


def test_result_of_an_earlier_start_is_removed_at_start(task):
    pretrain, stale = task('[ -e "$SUBMITIT_FOLDER/7_0_result.pkl" ] && exit 4; exit 0')
    stale.write_bytes(b"an error result from the start that was requeued")
    assert pretrain() == {"rank": 0}  # no summary.json in this fake run: the rank is returned
    assert not stale.exists()
