import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
