"""One-shot GPU check (issue 8): bf16 ZeRO-2 training of CLIP-only and full MLIP with GPU-sized
towers, then a table of samples/s, step time, peak memory, MFU and a loss sanity check.

    bash tools/gpu_check.sh                       # on a CUDA machine: ViT-B/16 + BERT-base, random init
    python tools/gpu_check.py --model tiny --steps 12 --batch-size 8 --ranks 2   # the same path on CPU

MFU = model FLOPs per optimizer step / step time / the chip's dense peak, where the peak is
measured in this run by a large bf16 matmul (fp32 on CPU) and the model FLOPs are counted
analytically for the two transformer towers: forward 2·(weights)·(tokens) + attention
4·layers·tokens²·width, backward twice the forward; full MLIP adds the EMA towers' forward on the
second view and the text tower's forward+backward on the swapped reports. The heads (knowledge
encoding, TKP attention, prototypes, Tucker fusion) are left out, so the MLIP MFU is a slight
underestimate. tests/test_gpu_check.py checks these counts against torch's FlopCounterMode at
ViT-B/16 + BERT-base, batch 64 (on the meta device): CLIP within 0.5%, MLIP 1-3% under.

Each variant trains with ``--sync-debug``: on CUDA the table says how often per step the host
waited for the device, and the lines where it did are printed under it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_peak_tflops(device: str) -> float:
    import torch
    n, dtype, reps = (8192, torch.bfloat16, 50) if device == "cuda" else (1024, torch.float32, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def tower_flops(model_cfg: dict, batch: int) -> dict:
    """Analytic forward FLOPs of one micro-batch through each tower (transformer towers)."""
    v = model_cfg["vision_cfg"]
    tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    width, layers = v["width"], v["layers"]
    mlp = v.get("mlp_ratio", 4.0)
    per_layer = 2 * tokens * (4 * width * width + 2 * mlp * width * width) + 4 * tokens * tokens * width
    vision = batch * (layers * per_layer + 2 * (tokens - 1) * 3 * v["patch_size"] ** 2 * width)
    text_dir = Path(model_cfg["text_cfg"]["hf_model_name"])
    t = json.loads((text_dir / "config.json").read_text())
    seq, h, tl, inter = model_cfg["text_cfg"].get("context_length", 77), t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"]
    text = batch * tl * (2 * seq * (4 * h * h + 2 * h * inter) + 4 * seq * seq * h)
    return {"vision": float(vision), "text": float(text)}


def step_flops(model_cfg: dict, batch_per_rank: int, ranks: int, objective: str) -> float:
    f = tower_flops(model_cfg, batch_per_rank * ranks)
    flops = 3 * (f["vision"] + f["text"])            # forward + backward of both towers
    if objective == "mlip":
        flops += f["vision"] + f["text"]             # EMA towers: forward on the second view
        flops += 3 * f["text"] * 0.5                 # swapped reports (swap probability 0.5)
    return flops


VARIANTS = ("clip", "mlip", "clip+compile", "mlip+compile")


def fit_workers_to_shm(workers: int, batch: int, image_size: int, shm: str = "/dev/shm") -> int:
    """Loader workers hand their batches over in shared memory, two in flight each; MLIP's two
    fp32 views at batch 256 and 224 px are 294 MiB a batch. A container's /dev/shm is often
    64 MiB, where workers die with a bus error: fewer workers (0: load in the training process)
    rather than a lost run."""
    import shutil
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return workers
    per_batch = batch * 2 * 3 * image_size ** 2 * 4
    fit = int(0.5 * free // (2 * per_batch))
    if fit < workers:
        print(f"/dev/shm has {free / 2**30:.1f} GiB free: {fit} loader workers instead of {workers}", flush=True)
    return max(0, min(workers, fit))


def default_batch(device: str) -> int:
    """Large enough that the GPU, not the host's kernel launches, sets the step time. The host side
    of an MLIP step (about 10.5k ops at ViT-B/16 + BERT-base) costs about 60 ms on a CPU core, more
    than the GPU needs for batch 64 on an H200 (tools/bench_host.py). Batch 256 holds about 53 GiB
    of bf16 activations for MLIP (counted on the meta device), so it needs the H200's memory."""
    import torch
    if device != "cuda":
        return 8
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return 256 if gib >= 120 else 128 if gib >= 60 else 64


def run(variant: str, args, shards: Path, out: Path, port: int) -> dict:
    """Train one variant (an objective, ``+compile`` for torch.compile) in its own DeepSpeed launch."""
    objective, compiled = variant.split("+")[0], variant.endswith("+compile")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
           "--master_port", str(port),
           str(ROOT / "mlip_ds" / "train.py"), "--deepspeed_config", str(ROOT / "ds_configs" / "zero2.json"),
           "--train-shards", str(shards), "--out-dir", str(out), "--model", args.model,
           "--objective", objective, "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
           "--samples-per-epoch", str(args.batch_size * args.ranks * args.steps * 4),
           "--log-every", str(max(1, args.steps // 12)), "--sync-debug",  # syncs counted on CUDA
           "--workers", str(args.workers), "--warmup-steps", "2", "--lr", "2e-4",
           "--save-every", "0"] + (["--compile"] if compiled else []) + args.extra
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"{variant} run failed (exit {r.returncode})")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    # The median after the first third: warm-up (and, with --compile, the compilation) left out.
    sps = statistics.median(rec["perf/samples_per_s"] for rec in log[len(log) // 3:])
    wait = statistics.median(rec["perf/data_wait_fraction"] for rec in log[len(log) // 3:])
    losses = [rec["loss/total"] for rec in log]
    k = max(1, len(losses) // 4)
    return {"samples_per_s": sps, "step_s": args.batch_size * args.ranks / sps, "wall_s": time.time() - t0,
            "data_wait": wait, "finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
            "first": statistics.mean(losses[:k]), "last": statistics.mean(losses[-k:]),
            "peak_gb": summary.get("peak_device_memory_gb"), "precision": summary.get("precision"),
            "sync_audit": summary.get("sync_audit")}


HEADER = ("| variant | precision | samples/s | step (s) | peak mem (GiB) | MFU | data wait | loss first→last | "
          "finite | host syncs/step | wall (s) |\n|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|")


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['variant']} | failed: {row['error']} | | | | | | | | | |"
    mem = f"{row['peak_gb']:.1f}" if row["peak_gb"] is not None else "n/a"
    audit = row.get("sync_audit") or {}
    syncs = f"{audit['syncs_per_step']:.1f}" if audit.get("syncs_per_step") is not None else "n/a"
    return (f"| {row['variant']} | {row['precision']} | {row['samples_per_s']:.1f} | {row['step_s']:.3f} | {mem} | "
            f"{100 * row['mfu']:.1f}% | {100 * row['data_wait']:.0f}% | {row['first']:.3f}→{row['last']:.3f} | "
            f"{row['finite']} | {syncs} | "
            f"{row['wall_s']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit-b16")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=0,
                    help="per rank; 0: by GPU memory (256 from 120 GiB, 128 from 60 GiB, else 64), 8 on CPU")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0,
                    help="loader workers per rank; 0: min(12, cores - 2) on CUDA, 1 on CPU")
    ap.add_argument("--samples", type=int, default=2048, help="synthetic samples in the shards")
    ap.add_argument("--variants", default="",
                    help=f"comma-separated, in order, from {', '.join(VARIANTS)} (default: all on CUDA, "
                         "clip,mlip on CPU, where compiling takes minutes)")
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--json", default="", help="also write the rows here after each one (the lent machine "
                                               "returns $OUT; what finished survives a time-out)")
    ap.add_argument("extra", nargs="*", help="extra train.py flags after --")
    args = ap.parse_args()
    import torch
    from mlip_ds.model.towers import load_model_config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = [v for v in (args.variants or (",".join(VARIANTS) if device == "cuda" else "clip,mlip")).split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    out = ROOT / args.out
    model_cfg = load_model_config(args.model)
    args.batch_size = args.batch_size or default_batch(device)
    args.workers = args.workers or (max(1, min(12, (os.cpu_count() or 4) - 2)) if device == "cuda" else 1)
    args.workers = fit_workers_to_shm(args.workers, args.batch_size, model_cfg["preprocess"]["image_size"])
    peak = matmul_peak_tflops(device)
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "synthetic", "--out", str(shards),
                        "--num-samples", str(args.samples), "--image-size", str(model_cfg["preprocess"]["image_size"]),
                        "--workers", str(max(1, (os.cpu_count() or 2) - 1)), "--quiet", "--overwrite"], check=True)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    title = (f"# GPU check: {name}, {args.ranks} rank(s), model {args.model}, batch {args.batch_size}/rank, "
             f"{args.steps} steps, ZeRO-2, measured peak {peak:.1f} TFLOP/s per device "
             f"({'bf16' if device == 'cuda' else 'fp32'}), torch {torch.__version__}")
    print(f"\n{title}\n\n{HEADER}", flush=True)
    rows = []
    for i, variant in enumerate(variants):
        try:
            res = run(variant, args, shards, out / variant.replace("+", "_"), port=29500 + 11 * (i + 1))
            flops = step_flops(model_cfg, args.batch_size, args.ranks, variant.split("+")[0])
            row = {"variant": variant, "mfu": flops / res["step_s"] / (peak * 1e12 * args.ranks), **res}
        except (RuntimeError, OSError, ValueError, KeyError) as exn:  # one failed variant does not end the check
            row = {"variant": variant, "error": str(exn)}
        rows.append(row)
        print(format_row(row), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({
                "title": title, "device": name, "ranks": args.ranks, "model": args.model,
                "batch_per_rank": args.batch_size, "steps": args.steps, "peak_tflops": peak,
                "torch": torch.__version__, "rows": rows}, indent=2))
    ok = all("error" not in r and r["finite"] and r["last"] < r["first"] for r in rows)
    print(f"\n{title}\n\n{HEADER}\n" + "\n".join(map(format_row, rows)))
    for row in rows:  # where the host waited for the device, by source line (CUDA only)
        for site, count in ((row.get("sync_audit") or {}).get("sites") or {}).items():
            print(f"sync site ({row['variant']}): {count} x {site}")
    print(f"\nlosses finite and decreasing in every variant: {ok}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
