"""The shipped DeepSpeed configs (ZeRO-0, -2, -3, ZeRO-2 with optimizer offload) train the same
model: on the same data and seed their exported weights agree, so sharding changes memory, not maths."""
import json
import subprocess

import pytest
import torch

from conftest import ROOT, deepspeed_cmd, train_env
from mlip_ds.export import load_model

pytestmark = pytest.mark.slow  # every test here launches DeepSpeed training or SLURM


@pytest.fixture(scope="module")
def zero2_export(synthetic_shards, tmp_path_factory):
    return _train(synthetic_shards, tmp_path_factory.mktemp("zero2"), "zero2.json")


def _train(shards, out, config, ranks=2, extra=()):
    args = ["--train-shards", shards["train"], "--out-dir", out, "--batch-size", 4, "--samples-per-epoch", 48,
            "--workers", 1, "--warmup-steps", 1, "--lr", 1e-3, "--deterministic", *extra]
    r = subprocess.run(deepspeed_cmd(args, ranks=ranks, ds_config=config), cwd=ROOT, env=train_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (out / "stderr.txt").write_text(r.stderr)
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


def test_one_device_route_trains_the_same_weights_as_zero2_on_one_rank(synthetic_shards, tmp_path):
    """ds_configs/one_gpu.json on one rank: no DeepSpeed all-reduce, the trainer's own foreach clip
    (issue 15). The same weights as ZeRO-2 on one rank, with a max norm small enough that clipping
    acts on every step (a run without clipping ends elsewhere)."""
    clip = ["--grad-clip", "0.01"]
    zero2 = _train(synthetic_shards, tmp_path / "zero2", "zero2.json", ranks=1, extra=clip)
    route = _train(synthetic_shards, tmp_path / "route", "one_gpu.json", ranks=1, extra=clip)
    unclipped = _train(synthetic_shards, tmp_path / "unclipped", "one_gpu.json", ranks=1, extra=["--grad-clip", "0"])
    summaries = [json.loads((d.parent / "summary.json").read_text()) for d in (zero2, route)]
    assert [s["one_device_route"] for s in summaries] == [False, True]
    hints = ["takes the one-device route" in (d.parent / "stderr.txt").read_text() for d in (zero2, route)]
    assert hints == [True, False]  # ZeRO-2 on one rank points to one_gpu.json
    a, b, c = (load_model(str(d))[0].state_dict() for d in (zero2, route, unclipped))
    assert max((a[k] - c[k]).abs().max().item() for k in a if a[k].is_floating_point()) > 1e-3
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
