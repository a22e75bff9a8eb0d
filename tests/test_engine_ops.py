"""Issue 15's CPU proxy for the host time of a GPU step: ATen ops dispatched per optimizer step
(forward, backward, optimizer step) by the trainer's DeepSpeed engine with the shipped default
config, against a bare torch loop (bf16 weights, clip_grad_norm_, fused AdamW) on the same model
(``benchmarks/engine_ops.py``). A count, not a timing: deterministic on any CPU."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, train_env

TARGET = 1.3  # issue 15: the engine dispatches at most 1.3x the bare loop's ops
# The shipped zero2.json at the tiny structure today (2026-12-04, torch 2.14.1, DeepSpeed 0.19.8): 2.29x
# (4.05x before issue 15's settings). What is left is per-parameter work inside DeepSpeed's ZeRO-2 that
# no config key removes (docs/benchmarks.md, "Ops per optimizer step"); this bound stops it growing back.
SHIPPED_BOUND = 2.4
# Shipped as ds_configs/one_gpu.json: DeepSpeed at stage 0 with fp32 weights under torch_autocast; on one
# rank the trainer skips DeepSpeed's gradient all-reduce and clips once by torch's foreach norm
# (mlip_ds.ds_config.one_device_route, train.one_device_step: two settings no DeepSpeed config key expresses).
ROUTE = "one_gpu"


@pytest.fixture(scope="module")
def counts():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_ops.py"), "--model", "tiny", "--objectives",
                        "clip", "--configs", f"zero2,zero2@defaults,{ROUTE}", "--json"], cwd=ROOT, env=train_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["clip"]


def _ratio(counts, system):
    return sum(counts[system].values()) / sum(counts["bare"].values())


@pytest.mark.slow
def test_shipped_config_dispatches_fewer_ops_than_deepspeeds_defaults(counts):
    assert counts["zero2"]["forward"] == counts["bare"]["forward"]  # the engine's forward adds nothing
    assert counts["zero2"]["step"] < counts["zero2@defaults"]["step"] / 2  # no per-gradient overflow scan
    assert _ratio(counts, "zero2") <= SHIPPED_BOUND, counts


@pytest.mark.xfail(strict=True, reason="issue 15's target: ZeRO-2's per-parameter bucket copies, norms and "
                                       "bf16 weight updates remain (docs/benchmarks.md)")
@pytest.mark.slow
def test_shipped_config_meets_the_issue_15_target(counts):
    assert _ratio(counts, "zero2") <= TARGET, counts


def test_the_one_gpu_config_meets_the_target(counts):
    """ds_configs/one_gpu.json on one rank, as the trainer runs it: no ZeRO-2 bucket copies or
    per-tensor norms, so at most 1.3x the bare loop's ops."""
    assert _ratio(counts, ROUTE) <= TARGET, counts
    assert counts[ROUTE]["step"] <= 2 * counts["bare"]["step"], counts


@pytest.mark.parametrize("config", ["zero0.json", "zero2.json", "zero3.json", "zero2_offload.json"])
def test_shipped_configs_keep_a_cheap_non_finite_check(config):
    """No per-gradient overflow scan or throughput-timer synchronize on a GPU (bf16 on), and
    ``--nan-check auto`` then checks the loss (one isfinite per micro-step), so NaN steps are still
    skipped."""
    from mlip_ds.config import build_parser, config_from_args
    from mlip_ds.ds_config import load_ds_config, resolve_ds_config
    from mlip_ds.train import resolve_nan_check
    cfg = config_from_args(build_parser().parse_args(["--train-shards", "-"]))
    ds = resolve_ds_config(load_ds_config(str(ROOT / "ds_configs" / config)), cfg, 2, 100, bf16_ok=True)
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert ds["timers"]["throughput"]["enabled"] is False
    assert resolve_nan_check("auto", ds) == "sync"
