"""The prepared GPU check runs end to end on CPU with the tiny model (the same code path a lent
GPU runs with ViT-B/16 in bf16), and its MFU arithmetic is right."""
import subprocess
import sys

import pytest

from conftest import ROOT, train_env

import gpu_check  # benchmarks/gpu_check.py (pytest.ini: pythonpath)
from mlip_ds.bench.meta_step import count_flops


def test_tower_flops_match_torchs_flop_counter():
    """The analytic forward count of each tower is torch's count (up to the projection heads it leaves
    out), and forward + backward is 3x forward, as step_flops assumes."""
    import torch
    from mlip_ds.model.towers import build_model, build_tokenizer, load_model_config
    cfg = load_model_config("tiny")
    model = build_model(cfg)
    image = torch.randn(2, 3, 64, 64)
    text = build_tokenizer(cfg)(["Small left pleural effusion.", "No pneumothorax."])
    analytic = gpu_check.tower_flops(cfg, 2)
    vision, words = count_flops(lambda: model.visual(image)), count_flops(lambda: model.text(text))
    assert vision == pytest.approx(analytic["vision"], rel=0.005)
    assert words == pytest.approx(analytic["text"], rel=0.005)
    both = count_flops(lambda: (model.visual(image).sum() + model.text(text).sum()).backward())
    # The image needs no gradient, so the patch embedding skips one backward matmul: slightly under 3x.
    assert 2.9 * (vision + words) < both <= 3 * (vision + words)


@pytest.mark.parametrize("objective", ["clip", "mlip"])
def test_step_flops_match_torchs_count_at_vit_b16(objective):
    """The MFU numerator at the size the GPU check runs (ViT-B/16 + BERT-base, batch 64), counted by
    torch on the meta device (shapes only). CLIP: the towers are the step. MLIP: the heads the
    analytic count leaves out (knowledge encoding, TKP attention, prototypes, fusion) add little, so
    the reported MFU is a slight underestimate, never an overestimate."""
    from mlip_ds.bench.meta_step import model_and_inputs, training_step
    from mlip_ds.config import objective_preset
    from mlip_ds.model.towers import load_model_config
    cfg, spec = load_model_config("vit-b16"), objective_preset(objective)
    model, inputs = model_and_inputs(cfg, spec, 64)
    counted = count_flops(lambda: training_step(model, spec, inputs, ema=False))
    swapped = inputs["swap_rows"].numel() / 64 if objective == "mlip" else 0.5  # what the batch's swap changed
    analytic = gpu_check.step_flops(cfg, 64, 1, objective, swapped_fraction=swapped)
    if objective == "clip":
        assert counted == pytest.approx(analytic, rel=0.005)
    else:
        assert analytic < counted < 1.03 * analytic, counted / analytic


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path):
    """Every row kind on CPU at tiny sizes: the in-memory references (bare loop, DDP) and the engine
    with the default config (profiled), then the trainer (2 ranks), in the order a GPU runs them."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--model", "tiny", "--steps", "6",
                        "--batch-size", "8", "--ranks", "2", "--workers", "1", "--samples", "128",
                        "--out", str(tmp_path), "--json", str(tmp_path / "rows.json")], cwd=ROOT, env=train_env(),
                       capture_output=True, text=True, timeout=400)
    out = r.stdout[-3000:] + r.stderr[-3000:]
    assert "| clip | fp32 |" in r.stdout and "| mlip | fp32 |" in r.stdout and "compile" not in r.stdout, out
    assert "| bare/clip | bf16 autocast |" in r.stdout and "| engine/clip | bf16 (DeepSpeed) |" in r.stdout, out
    assert "MFU" in r.stdout and "first step (s)" in r.stdout and "| profiled row |" in r.stdout
    import json
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]  # written after each row
    assert [row["variant"] for row in rows] == list(gpu_check.CPU_ROWS), out
    assert all(row["samples_per_s"] > 0 and row["first_step_s"] > 0 for row in rows), rows
    profile = next(row["profile"] for row in rows if row["variant"] == "engine/clip")
    assert profile["host_ms_backward"] > 0 and profile["host_ms_step"] > 0 and profile["gpu_idle"] is None
    # exit 0 only if losses were finite and decreasing; at 6 steps a decrease is likely but not certain
    assert r.returncode in (0, 1) and "losses finite in every row" in r.stdout


def test_a_row_over_its_budget_is_a_failed_row_not_the_end(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--model", "tiny", "--steps", "4",
                        "--batch-size", "4", "--rows", "bare/clip,ddp/clip", "--row-budget-scale", "0.03",
                        "--out", str(tmp_path)], cwd=ROOT, env=train_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "| bare/clip | failed: bare/clip: over its 1 s budget" in r.stdout, r.stdout[-2000:]
    assert "| ddp/clip | failed: ddp/clip: over its 1 s budget" in r.stdout


def test_profile_summary_on_cpu():
    """The profiler summary's fields, on a toy step (no GPU: no kernels, idle fraction n/a)."""
    import torch
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = type("Step", (), {"forward": staticmethod(lambda: model(torch.randn(4, 8)).square().mean()),
                             "backward": staticmethod(lambda loss: loss.backward()),
                             "step": staticmethod(lambda: (opt.step(), opt.zero_grad()))})
    p = gpu_check.profile_steps(step, "cpu", steps=2)
    assert p["steps"] == 2 and p["gpu_idle"] is None and p["kernels_per_step"] is None
    assert all(p[f"host_ms_{phase}"] > 0 for phase in ("forward", "backward", "step")), p


def test_rows_fit_the_nine_minutes():
    """Every default GPU row but the compile rows (which get what is left) fits the check's budget; the
    check stops starting rows at it and kills a row at its own, so the table comes within 9 minutes."""
    rows = gpu_check.CUDA_ROWS
    assert sum(gpu_check.row_budget(r) for r in rows if "compile" not in r) + 60 <= gpu_check.BUDGET_S <= 500
    assert rows[-1] == "mlip+compile" and {"bare/clip", "ddp/clip", "engine/clip", "engine/mlip", "clip",
                                           "mlip", "clip+compile"} <= set(rows)
    assert "timeout 530 " in (ROOT / "benchmarks" / "gpu_check.sh").read_text()


def test_sync_audit_counts_syncs_per_step_on_cuda():
    """On a GPU (skipped on CPU, where nothing syncs): two ``.item()`` per step are counted at their
    line, the paused one (logging) is not."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the sync debug mode exists only there")
    from mlip_ds.sync_audit import SyncAudit
    audit, x = SyncAudit(True, start_step=1), torch.ones(4, device="cuda")
    for step in range(1, 5):
        x.sum().item(), x.max().item()
        with audit.paused():
            x.min().item()
        audit.after_step(step)
    report = audit.close()
    assert report["steps"] == 3 and report["syncs_per_step"] == 2.0 and len(report["sites"]) == 1
    assert next(iter(report["sites"])).startswith(__file__)


def test_sync_audit_is_off_on_cpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("on CUDA the audit is on: test_sync_audit_counts_syncs_per_step_on_cuda")
    from mlip_ds.sync_audit import SyncAudit
    audit = SyncAudit(True)
    audit.after_step(5)
    with audit.paused():
        pass
    assert audit.close() is None


def test_loader_workers_fit_the_shared_memory(monkeypatch, tmp_path):
    """MLIP at batch 256, 224 px: 294 MiB a batch, two in flight per worker, half of /dev/shm used.
    A container's default 64 MiB holds none: load in the training process."""
    import collections
    import shutil
    usage = collections.namedtuple("usage", "total used free")
    for free_gib, workers in ((1 / 16, 0), (4, 3), (24, 12)):
        monkeypatch.setattr(shutil, "disk_usage", lambda path, f=free_gib: usage(0, 0, int(f * 2**30)))
        assert gpu_check.fit_workers_to_shm(12, 256, 224, shm=str(tmp_path)) == workers, free_gib
    monkeypatch.undo()
    assert gpu_check.fit_workers_to_shm(12, 256, 224, shm=str(tmp_path / "missing")) == 12
