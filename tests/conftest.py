import os
import sys
from pathlib import Path

import pytest

from mlip_ds import launch
from mlip_ds.launch import deepspeed_cmd, free_port  # noqa: F401  (the tests import them from here)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Small synthetic train/test shard sets made once per test session with the real CLI."""
    import subprocess
    base = tmp_path_factory.mktemp("synthetic")
    sets = {"train": (0, 192), "test": (100000, 96)}
    for name, (start, n) in sets.items():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "synthetic", "--out",
                        str(base / name), "--num-samples", str(n), "--start-index", str(start),
                        "--image-size", "64", "--samples-per-shard", "48"], check=True, cwd=ROOT,
                       capture_output=True, timeout=300)
    return {name: base / name for name in sets}


def train_env(**extra):
    """The launch environment (mlip_ds/launch.py), on the CPU with one thread whatever the machine."""
    return launch.train_env(**{"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **extra})


def read_train_log(out_dir):
    """{step: record} from train_log.jsonl; a step logged twice (before a kill and after the
    resume) keeps its last record."""
    import json
    records = {}
    path = Path(out_dir) / "train_log.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                records[rec["step"]] = rec
    return records
