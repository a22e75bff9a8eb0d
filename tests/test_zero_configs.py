"""The shipped DeepSpeed configs (ZeRO-0, -2, -3, ZeRO-2 with optimizer offload) train the same
model: on the same data and seed their exported weights agree, so sharding changes memory, not maths."""
import subprocess

import pytest
import torch

from conftest import ROOT, deepspeed_cmd, train_env
from mlip_ds.export import load_model

pytestmark = pytest.mark.slow  # every test here launches DeepSpeed training or SLURM


@pytest.fixture(scope="module")
def zero2_export(synthetic_shards, tmp_path_factory):
    return _train(synthetic_shards, tmp_path_factory.mktemp("zero2"), "zero2.json")


def _train(shards, out, config):
    args = ["--train-shards", shards["train"], "--out-dir", out, "--batch-size", 4, "--samples-per-epoch", 48,
            "--workers", 1, "--warmup-steps", 1, "--lr", 1e-3, "--deterministic"]
    r = subprocess.run(deepspeed_cmd(args, ds_config=config), cwd=ROOT, env=train_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out / "export"


@pytest.mark.parametrize("config", ["zero0.json", "zero3.json", "zero2_offload.json"])
def test_config_trains_the_same_weights_as_zero2(config, zero2_export, synthetic_shards, tmp_path):
    other = _train(synthetic_shards, tmp_path, config)
    a, b = load_model(str(zero2_export))[0].state_dict(), load_model(str(other))[0].state_dict()
    assert a.keys() == b.keys()
    initial = load_model(str(other), random_init=True)[0].state_dict()
    moved = max((a[k] - initial[k]).abs().max().item() for k in a if a[k].is_floating_point())
    assert moved > 1e-3  # training changed the weights, so the comparison below means something
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
