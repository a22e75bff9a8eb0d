"""The trainer end to end: a 2-rank DeepSpeed CPU run that checkpoints, resumes and continues;
inputs that are wrong fail before DeepSpeed starts; the DeepSpeed config's "auto" values."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, deepspeed_cmd, train_env
from mlip_ds.config import TrainConfig
from mlip_ds.ds_config import DSConfigError, load_ds_config, resolve_ds_config

DS_CONFIG = str(ROOT / "ds_configs" / "zero2.json")


def _deepspeed(args, timeout=300, port=None, ranks=2):
    return subprocess.run(deepspeed_cmd(args, ranks=ranks, port=port), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=timeout)


def _port():
    from conftest import free_port
    return free_port()


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_two_rank_run_checkpoints_resumes_and_exports(synthetic_shards, tmp_path):
    out = tmp_path / "run"
    common = ["--train-shards", str(synthetic_shards["train"]), "--out-dir", str(out), "--batch-size", "4",
              "--samples-per-epoch", "64", "--save-every", "4", "--log-every", "2", "--workers", "1",
              "--warmup-steps", "2"]
    port = _port()
    first = _deepspeed(common + ["--epochs", "1"], port=port)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (66 MB per rank in /dev/shm) are not left behind.
    from mlip_ds.distributed import SHM_DIR, shm_buffer_name
    left = [n for r in (0, 1) for n in [shm_buffer_name(r, "127.0.0.1", str(port))]
            if os.path.exists(os.path.join(SHM_DIR, n))]
    assert not left, left
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000008"
    assert {"step00000004", "step00000008"} <= set(os.listdir(ckpts))
    assert json.loads((out / "summary.json").read_text())["step"] == 8

    second = _deepspeed(common + ["--epochs", "2", "--resume", "latest"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 16 and summary["samples_seen"] == 16 * 8
    assert (ckpts / "latest").read_text().strip() == "step00000016"

    scalars = _scalars(out / "tb")
    for tag in ("loss/total", "lr", "temperature", "perf/samples_per_s", "perf/data_wait_fraction"):
        assert tag in scalars, sorted(scalars)
    steps = [s for s, _ in scalars["loss/total"]]
    assert max(steps) == 16 and 10 in steps  # logged after the resume too
    assert all(torch.isfinite(torch.tensor(v)) for _, v in scalars["loss/total"])

    # The export loads without DeepSpeed and reproduces the trained towers.
    from mlip_ds.export import load_image_encoder, load_model
    model, meta = load_model(str(out / "export"))
    assert meta["info"]["step"] == 16
    encoder, preprocess = load_image_encoder(str(out / "export"))
    x = torch.randn(2, 3, preprocess["image_size"], preprocess["image_size"])
    with torch.no_grad():
        feats = encoder(x)
        random_feats = load_image_encoder(str(out / "export"), random_init=True)[0](x)
    assert feats.shape[0] == 2 and torch.isfinite(feats).all()
    assert not torch.allclose(feats, random_feats)


def _train_cli(args):
    cmd = [sys.executable, str(ROOT / "mlip_ds" / "train.py"), "--deepspeed_config", DS_CONFIG] + args
    return subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_wrong_shard_path_fails_before_deepspeed(tmp_path):
    r = _train_cli(["--train-shards", str(tmp_path / "nope")])
    assert r.returncode == 2
    assert "not found" in r.stderr and "make_shards" in r.stderr
    assert "DeepSpeed info" not in r.stdout + r.stderr  # never reached deepspeed.initialize


@pytest.mark.slow
def test_unknown_model_fails_with_choices(synthetic_shards):
    r = _train_cli(["--train-shards", str(synthetic_shards["train"]), "--model", "vit-huge-typo"])
    assert r.returncode == 2
    assert "unknown model 'vit-huge-typo'" in r.stderr and "tiny" in r.stderr


def test_ds_config_auto_values_filled_and_contradictions_refused():
    cfg = TrainConfig()
    cfg.data.batch_size, cfg.optim.grad_accum, cfg.optim.lr = 8, 2, 1e-3
    ds = resolve_ds_config(load_ds_config(DS_CONFIG), cfg, world_size=2, total_steps=100, bf16_ok=False)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["scheduler"]["params"]["total_num_steps"] == 100
    assert ds["bf16"]["enabled"] is False
    bad = load_ds_config(DS_CONFIG)
    bad["train_micro_batch_size_per_gpu"] = 16
    with pytest.raises(DSConfigError, match="contradicts --batch-size"):
        resolve_ds_config(bad, cfg, world_size=2, total_steps=100, bf16_ok=False)
    with pytest.raises(DSConfigError, match="does not exist"):
        load_ds_config("/nonexistent.json")


def test_optimizer_kernel_choice():
    from mlip_ds.ds_config import optimizer_kernel
    base = load_ds_config(DS_CONFIG)
    for impl, cuda, want in (("auto", True, {"torch_adam": True, "fused": True}), ("auto", False, {"torch_adam": True}),
                             ("deepspeed", True, {"torch_adam": False}), ("torch", True, {"torch_adam": True})):
        ds = json.loads(json.dumps(base))
        optimizer_kernel(ds, impl, cuda)
        params = {k: v for k, v in ds["optimizer"]["params"].items() if k in ("torch_adam", "fused")}
        assert params == want, (impl, cuda, params)
    with pytest.raises(DSConfigError, match="needs CUDA"):
        optimizer_kernel(json.loads(json.dumps(base)), "torch-fused", cuda=False)
    chosen = json.loads(json.dumps(base))
    chosen["optimizer"]["params"]["torch_adam"] = False  # the user's config wins
    optimizer_kernel(chosen, "auto", cuda=True)
    assert chosen["optimizer"]["params"] == {**base["optimizer"]["params"], "torch_adam": False}


@pytest.mark.slow
def test_compiled_model_trains_and_exports_the_same_parameter_names(synthetic_shards, tmp_path):
    """--compile (DeepSpeed's in-place engine.compile) with the full MLIP objective: it trains, and
    checkpoints/exports have the same keys as eager. The "aot_eager" backend traces the backward as
    inductor does (it caught a frozen-prototype gradient that failed ZeRO-2) without compiling
    kernels; inductor is the default on GPUs."""
    from mlip_ds.export import load_model
    out = tmp_path / "compiled"
    args = ["--train-shards", synthetic_shards["train"], "--out-dir", out, "--batch-size", "8",
            "--samples-per-epoch", "32", "--epochs", "1", "--log-every", "1", "--workers", "1",
            "--objective", "mlip", "--compile", "--compile-backend", "aot_eager"]
    # One rank: ZeRO-2's gradient hooks are the same, and one compilation instead of two on 2 cores.
    r = _deepspeed(args, ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and summary["loss"] == summary["loss"]
    model, _ = load_model(str(out / "export"))  # strict load: no "_orig_mod." prefixes
    assert not any("_orig_mod" in k for k in model.state_dict())


def _reduce_worker(rank, world, port, q):
    import torch
    import torch.distributed as dist

    from mlip_ds.train import _reduce_for_log
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    values = {"loss/total": torch.tensor(1.0 + rank), "loss/global": torch.tensor(3.0 * rank)}
    terms, skipped = _reduce_for_log(values, [rank, 2 * rank + 1])  # per-stream counts of this rank
    q.put((rank, terms, skipped))
    dist.destroy_process_group()


@pytest.mark.slow
def test_logged_terms_are_rank_means_and_skipped_samples_a_rank_sum():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.spawn(_reduce_worker, args=(2, _port(), q), nprocs=2, join=True)
    got = sorted(q.get(timeout=60) for _ in range(2))
    for _, terms, skipped in got:
        assert terms == {"loss/global": 1.5, "loss/total": 1.5} and skipped == (0 + 1) + (1 + 3)
