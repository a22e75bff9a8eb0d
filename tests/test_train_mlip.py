"""The trainer with every MLIP term on, on a real 2-rank DeepSpeed CPU run: every term logged and
finite, the loss goes down, the export holds the two-tower model and the MLIP state, a kill -9 and
resume reproduces the uninterrupted losses; ZeRO-3 refuses the terms it cannot run, before DeepSpeed."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, deepspeed_cmd, read_train_log, train_env

pytestmark = pytest.mark.slow  # every test here launches DeepSpeed training or SLURM

TERMS = ("global", "divergence", "local", "category", "itm", "swap")
STEPS = 24  # 2 epochs of 12 steps


def _args(shards, out):
    opts = {"--train-shards": shards, "--out-dir": out, "--objective": "mlip", "--batch-size": 4,
            "--samples-per-epoch": 96, "--epochs": 2, "--save-every": 8, "--log-every": 1, "--workers": 2,
            "--warmup-steps": 2, "--lr": 1e-3, "--seed": 5, "--num-prototypes": 32, "--local-dim": 64}
    return [x for kv in opts.items() for x in kv] + ["--deterministic"]


def _run(args, timeout=300):
    return subprocess.run(deepspeed_cmd(args), cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=timeout)


def _ok(r):
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlip") / "uninterrupted"
    _ok(_run(_args(synthetic_shards["train"], out)))
    return out


def test_all_terms_logged_finite_and_the_loss_goes_down(reference):
    log = read_train_log(reference)
    assert sorted(log) == list(range(1, STEPS + 1))
    # The default recipe: the auxiliary terms are off (not computed, not logged) for the first 20% of
    # the steps, then ramp in over 10%; the resolved steps are in train_config.json.
    from mlip_ds.losses.objective import ObjectiveConfig, active_terms, aux_scale
    saved = json.loads((reference / "train_config.json").read_text())["cfg"]["objective"]
    objective = ObjectiveConfig(**saved)
    assert (objective.aux_start_steps, objective.aux_warmup_steps) == (5, 2)  # 0.2 and 0.1 of 24 steps
    for step, rec in log.items():
        on = active_terms(objective, step - 1)  # step s is logged after the forward at s - 1
        assert {k[len("loss/"):] for k in rec if k.startswith("loss/")} == set(on) | {"total"}, (step, rec)
        for term in tuple(on) + ("total",):
            assert torch.isfinite(torch.tensor(rec[f"loss/{term}"])), rec
    assert set(active_terms(objective, STEPS - 1)) == set(TERMS)
    # Once every term has its full weight, the total goes down.
    full = [s for s in sorted(log) if aux_scale(objective, s - 1) == 1.0]
    total = [log[s]["loss/total"] for s in full]
    first, last = sum(total[:4]) / 4, sum(total[-4:]) / 4
    assert last < first - 0.3, (first, last, total)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(reference / "tb"))
    acc.Reload()
    assert {f"loss/{t}" for t in TERMS + ("total",)} <= set(acc.Tags()["scalars"])
    # Export: the two-tower model as before, plus the MLIP state and its description.
    from safetensors.torch import load_file

    from mlip_ds.export import load_model
    model, meta = load_model(str(reference / "export"))
    assert meta["info"]["step"] == STEPS and meta["info"]["objective"]["use_local"]
    state = load_file(str(reference / "export" / "mlip_state.safetensors"))
    online = model.state_dict()
    ema = {k[len("ema_visual."):]: v for k, v in state.items() if k.startswith("ema_visual.")}
    assert ema.keys() == {k[len("visual."):] for k in online if k.startswith("visual.")}
    # The EMA followed the online tower but lags behind it.
    assert not torch.equal(ema["conv1.weight"], online["visual.conv1.weight"])
    protos = state["prototypes.weight"]
    assert protos.shape == (32, 64) and torch.allclose(protos.norm(dim=-1), torch.ones(32), atol=1e-4)
    info = json.loads((reference / "export" / "mlip.json").read_text())
    assert info["concepts"]["source"].startswith("kb:") and "no_finding" in info["concepts"]["categories"]


def test_kill9_then_resume_gives_the_uninterrupted_losses_with_mlip_on(reference, synthetic_shards, tmp_path):
    out = tmp_path / "killed"
    args = _args(synthetic_shards["train"], out)
    proc = subprocess.Popen(deepspeed_cmd(args), cwd=ROOT, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while max(read_train_log(out), default=0) < 11:  # past the checkpoint at step 8 (mid-epoch 1)
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() - t0 < 240, "step 11 not reached"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(read_train_log(out))
    resumed = _run(args + ["--resume", "latest"])
    _ok(resumed)
    resumed_from = int(resumed.stderr.split("resumed from")[1].split("step")[1][:8])
    assert 8 <= resumed_from <= killed_at < STEPS  # the resumed part crosses into epoch 2 (prototypes unfrozen)
    reference_log, after = read_train_log(reference), read_train_log(out)
    for step in range(resumed_from + 1, STEPS + 1):
        for term in TERMS + ("total",):
            a, b = reference_log[step][f"loss/{term}"], after[step][f"loss/{term}"]
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (step, term, a, b)


def test_zero3_refuses_the_terms_it_cannot_run_before_deepspeed_starts(synthetic_shards):
    cmd = [sys.executable, str(ROOT / "mlip_ds" / "train.py"), "--deepspeed_config",
           str(ROOT / "ds_configs" / "zero3.json"), "--train-shards", str(synthetic_shards["train"]),
           "--objective", "mlip"]
    r = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "ZeRO stage 3 cannot run the divergence, local, itm, swap term(s)" in r.stderr
    assert "zero2.json" in r.stderr and "--no-use-divergence" in r.stderr
    assert "DeepSpeed info" not in r.stdout + r.stderr


def test_grounding_maps_from_the_mlip_export(reference, synthetic_shards, tmp_path, capsys):
    """The export reloads as the trained MLIP model (its state equal to the file) and gives one
    token-to-patch distribution per report token, drawn as PNGs for the report's findings."""
    from safetensors.torch import load_file

    from mlip_ds.eval import grounding
    export = str(reference / "export")
    model, meta, vocab = grounding.load_mlip(export)
    state = load_file(str(reference / "export" / "mlip_state.safetensors"))
    loaded = model.state_dict()
    assert state and all(torch.equal(loaded[k], v) for k, v in state.items())
    samples = grounding.read_samples(synthetic_shards["train"], 3)
    maps = grounding.grounding_maps(model, meta, vocab, samples)
    for (attn, tokens), s in zip(maps, samples):
        assert attn.shape[0] == len(tokens)
        n_words = sum(1 for t in tokens if t not in ("[PAD]", "[SEP]"))
        assert torch.allclose(attn[:n_words].sum(-1), torch.ones(n_words), atol=1e-4)
        assert attn.min() >= 0
    out = tmp_path / "maps"
    assert grounding.main(["--encoder", export, "--data", str(synthetic_shards["train"]), "--num", "2",
                           "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 5000 for p in pngs)
    # A two-tower export without the MLIP state: a clear error, exit 2.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((reference / "export" / "config.json").read_text())
    assert grounding.main(["--encoder", str(bare), "--data", str(synthetic_shards["train"])]) == 2
    assert "mlip_state" in capsys.readouterr().err
