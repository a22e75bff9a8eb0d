"""Resume on another world size (issue 17): a ZeRO checkpoint saved on 2 ranks continues on 1 rank,
and one saved on 1 rank continues on 2, through DeepSpeed's universal checkpoint, converted by
``--resume latest`` itself; the step, the LR schedule and the epoch's data position carry over.

The 2 -> 1 check (ZeRO-2): after the conversion the 1-rank engine holds exactly the 2-rank fp32
weights, Adam moments, Adam step and scheduler position (compared file against file, tolerance 0),
and its continued loss curve equals, to 1e-6 relative, that of a 1-rank run started from a native
1-rank checkpoint of those same states (same step, same LR). The LR at each continued step equals
the uninterrupted 2-rank run's (same global batch). The 1 -> 2 check runs ZeRO-3."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, deepspeed_cmd, read_train_log, train_env

TAG4 = "step00000004"


def _args(shards, out, **over):
    opts = {"--train-shards": shards, "--out-dir": out, "--batch-size": 4, "--samples-per-epoch": 64,
            "--epochs": 1, "--save-every": 4, "--log-every": 1, "--workers": 2, "--warmup-steps": 2,
            "--lr": 1e-3, "--seed": 5}
    opts.update(over)
    return [str(x) for kv in opts.items() for x in kv] + ["--deterministic"]


def _run(args, ranks, ds_config="zero2.json", timeout=300):
    if ranks == 1:  # plain python, one process: what a user does on one device
        cmd = [sys.executable, str(ROOT / "mlip_ds" / "train.py"), "--deepspeed_config",
               str(ROOT / "ds_configs" / ds_config)] + args
    else:
        cmd = deepspeed_cmd(args, ranks=ranks, ds_config=ds_config)
    r = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    return r


def _branch(src_out, dst_out, tag=TAG4):
    """A new --out-dir holding only checkpoint ``tag`` of ``src_out`` (named in ``latest``)."""
    (dst_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_out / "checkpoints" / tag, dst_out / "checkpoints" / tag)
    (dst_out / "checkpoints" / "latest").write_text(tag)


def _zero2_states(tag_dir):
    """Per parameter group: the flat fp32 master weights, Adam exp_avg and exp_avg_sq (the ranks'
    partitions concatenated in rank order), and the Adam step; plus the scheduler position."""
    files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    sds = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    groups = []
    for g in range(len(sds[0]["single_partition_of_fp32_groups"])):
        state = [sd["base_optimizer_state"]["state"][g] for sd in sds]
        groups.append({"fp32": torch.cat([sd["single_partition_of_fp32_groups"][g] for sd in sds]),
                       "exp_avg": torch.cat([s["exp_avg"] for s in state]),
                       "exp_avg_sq": torch.cat([s["exp_avg_sq"] for s in state]),
                       "step": {float(s["step"]) for s in state}})
    model = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return groups, model["lr_scheduler"], len(files)


@pytest.mark.slow
def test_zero2_checkpoint_of_2_ranks_continues_on_1_rank(synthetic_shards, tmp_path):
    shards = synthetic_shards["train"]
    two = tmp_path / "two_ranks"
    _run(_args(shards, two), ranks=2)  # 8 steps, checkpoints at 4 and 8
    reference_lr = {s: rec["lr"] for s, rec in read_train_log(two).items()}

    # 1. Convert and load on 1 rank (global batch kept: --batch-size 8), save at once: a native
    #    1-rank checkpoint of the converted state, compared with the 2-rank files.
    native = tmp_path / "native"
    _branch(two, native)
    r = _run(_args(shards, native, **{"--batch-size": 8, "--save-every": 0, "--max-steps": 4})
             + ["--resume", "latest"], ranks=1)
    assert "saved on 2 rank(s), this run has 1: converting" in r.stderr
    assert f"(through {TAG4}_universal)" in r.stderr
    assert "continuing at micro-batch 4 of the epoch" in r.stderr  # 4 x 8 samples = 4 x (2 ranks x 4)
    ckpts = native / "checkpoints"
    assert not (ckpts / f"{TAG4}_universal").exists()  # the tag was saved again: its old conversion went
    assert not list(ckpts.glob(".*tmp*"))
    saved2, sched2, n2 = _zero2_states(two / "checkpoints" / TAG4)
    saved1, sched1, n1 = _zero2_states(ckpts / TAG4)
    assert (n2, n1) == (2, 1) and sched1 == sched2
    assert not (ckpts / TAG4 / "trainer_rank1.json").exists()
    for a, b in zip(saved2, saved1):
        assert a["step"] == b["step"]
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            n = min(a[key].numel(), b[key].numel())  # ZeRO pads only the end of a group
            assert torch.equal(a[key][:n], b[key][:n]), key
            assert not a[key][n:].any() and not b[key][n:].any()
    client = torch.load(ckpts / TAG4 / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert client["step"] == 4 and client["samples_seen"] == 32 and client["micro_in_epoch"] == 4

    # 2. The reference: 1 rank from that native checkpoint (same weights, step, LR) -> step 8.
    _run(_args(shards, native, **{"--batch-size": 8}) + ["--resume", "latest"], ranks=1)
    reference = read_train_log(native)

    # 3. The 2-rank checkpoint resumed on 1 rank directly (converted by --resume latest) -> step 8.
    direct = tmp_path / "direct"
    _branch(two, direct)
    r = _run(_args(shards, direct, **{"--batch-size": 8}) + ["--resume", "latest"], ranks=1)
    assert "converting it to DeepSpeed's universal format" in r.stderr
    continued = read_train_log(direct)
    assert sorted(continued) == [5, 6, 7, 8]
    for step in range(5, 9):
        a, b = reference[step]["loss/total"], continued[step]["loss/total"]
        assert abs(a - b) <= 1e-6 * abs(a), (step, a, b)
        assert continued[step]["lr"] == reference[step]["lr"] == reference_lr[step]
    summary = json.loads((direct / "summary.json").read_text())
    assert summary["step"] == 8 and summary["samples_seen"] == 64 and summary["world_size"] == 1
    # The universal folder is kept while its checkpoint is, and reused by the next resume.
    assert (direct / "checkpoints" / f"{TAG4}_universal" / "COMPLETE").exists()


@pytest.mark.slow
def test_zero3_checkpoint_of_1_rank_continues_on_2_ranks(synthetic_shards, tmp_path):
    shards = synthetic_shards["train"]
    one = tmp_path / "one_rank"
    _run(_args(shards, one, **{"--batch-size": 8}), ranks=1, ds_config="zero3.json")
    reference = read_train_log(one)
    two = tmp_path / "two_ranks"
    _branch(one, two)
    r = _run(_args(shards, two) + ["--resume", "latest"], ranks=2, ds_config="zero3.json")
    assert r.stderr.count("saved on 1 rank(s), this run has 2: converting") == 1  # rank 0 converts
    continued = read_train_log(two)
    assert sorted(continued) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert continued[step]["lr"] == reference[step]["lr"]
        # Other ranks read other samples: the same model, not the same batches (see docs/resume.md).
        assert abs(continued[step]["loss/total"] - reference[step]["loss/total"]) < 0.1
    summary = json.loads((two / "summary.json").read_text())
    assert summary["step"] == 8 and summary["samples_seen"] == 64 and summary["world_size"] == 2


def test_data_position_is_kept_in_samples_and_rounded_to_a_whole_step(caplog):
    from mlip_ds.checkpoint import remap_data_position
    saved = {"micro_in_epoch": 6, "epoch": 1, "step": 3,
             "ds_config": {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}}
    # 2 ranks x 4 x 6 micro-batches = 48 samples read; on 1 rank x 8: micro-batch 6 (same global batch).
    assert remap_data_position(saved, 2, 1, micro_batch=8, accum=2)["micro_in_epoch"] == 6
    # On 3 ranks x 4 (global batch 24 instead of 16): 48 / 12 = 4 micro-batches, a whole step of 2.
    with caplog.at_level("WARNING", logger="mlip_ds.checkpoint"):
        out = remap_data_position(saved, 2, 3, micro_batch=4, accum=2)
    assert out["micro_in_epoch"] == 4 and out["step"] == 3 and "the global batch changed" in caplog.text
    # 48 / (5 x 4) = 2.4 -> 2 micro-batches: 8 samples of the epoch are read again.
    assert remap_data_position(saved, 2, 5, micro_batch=4, accum=2)["micro_in_epoch"] == 2


def test_a_checkpoint_that_cannot_be_converted_says_why(tmp_path):
    from mlip_ds.checkpoint import CheckpointError, convert_to_universal
    (tmp_path / "step00000004").mkdir()
    (tmp_path / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not convert checkpoint .*step00000004 to DeepSpeed's universal"):
        convert_to_universal(tmp_path, "step00000004")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000004"]  # nothing half-written left
