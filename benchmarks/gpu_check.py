"""One-shot GPU check (issue 8): bf16 ZeRO-2 training of CLIP-only and full MLIP with GPU-sized
towers, then a table of samples/s, step time, peak memory, MFU and a loss sanity check.

    bash benchmarks/gpu_check.sh                       # on a CUDA machine: ViT-B/16 + BERT-base, random init
    python benchmarks/gpu_check.py --model tiny --steps 12 --batch-size 8 --ranks 2   # the same path on CPU

MFU = model FLOPs per optimizer step / step time / the chip's dense peak, where the peak is
measured in this run by a large bf16 matmul (fp32 on CPU) and the model FLOPs are counted
analytically for the two transformer towers: forward 2·(weights)·(tokens) + attention
4·layers·tokens²·width, backward twice the forward; full MLIP adds the EMA towers' forward on the
second view and the text tower's forward+backward on the swapped reports. The heads (knowledge
encoding, TKP attention, prototypes, Tucker fusion) are left out, so the MLIP MFU is a slight
underestimate. tests/test_gpu_check.py checks these counts against torch's FlopCounterMode at
ViT-B/16 + BERT-base, batch 64 (on the meta device): CLIP within 0.5%, MLIP 1-3% under.

Each trainer row trains with ``--sync-debug``: on CUDA the table says how often per step the host
waited for the device, and the lines where it did are printed under it.

Rows (issue 15), each in its own process with a time budget (a failed or timed-out row is a row of
the table, not the end of the check), the whole run within ``--budget-s`` (default 480 s):
- in memory, the batch already on the device, no loader (``benchmarks/engine_ops.build_step``, the op
  count's own setup): ``bare/<objective>`` a bare torch loop (fp32 weights, bf16 autocast, foreach
  clipping, fused AdamW), ``ddp/<objective>`` the same under torch DDP (one process),
  ``engine/<objective>`` the DeepSpeed engine with ``ds_configs/zero2.json`` (bf16, as the trainer),
  ``one/<objective>`` the engine with ``ds_configs/one_gpu.json`` on the trainer's one-device route
  (fp32 weights under bf16 autocast, no all-reduce, one foreach clip);
- ``clip``, ``mlip`` (``+compile``): the trainer end to end (loader, logging, ZeRO-2).
``first step (s)``: from the row's launch to the end of its first optimizer step (for trainer rows,
from the first log record less the steps before it). The ``engine/clip`` row (the default config)
then profiles a few steps with ``torch.profiler``: GPU idle fraction, kernels per step, host ms in
forward, backward and step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from mlip_ds.launch import deepspeed_cmd, train_env


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


def step_flops(model_cfg: dict, batch_per_rank: int, ranks: int, objective: str,
               swapped_fraction: float = 0.5) -> float:
    """FLOPs of one optimizer step (towers only). ``swapped_fraction``: the share of reports the swap
    changes, at most the swap probability (0.5); reports without an affirmed finding are never
    swapped, so on real data it is lower and the MLIP figure (and its MFU) is an upper bound."""
    f = tower_flops(model_cfg, batch_per_rank * ranks)
    flops = 3 * (f["vision"] + f["text"])            # forward + backward of both towers
    if objective == "mlip":
        flops += f["vision"] + f["text"]             # EMA towers: forward on the second view
        flops += 3 * f["text"] * swapped_fraction    # swapped reports
    return flops


VARIANTS = ("clip", "mlip", "clip+compile", "mlip+compile")  # the trainer's rows
MEMORY_ROWS = ("bare/clip", "ddp/clip", "engine/clip", "one/clip", "bare/mlip", "ddp/mlip", "engine/mlip", "one/mlip")
ROWS = MEMORY_ROWS + VARIANTS
# The order on a GPU: references and the default config first, compile (minutes) last.
CUDA_ROWS = ("bare/clip", "engine/clip", "one/clip", "ddp/clip", "clip", "bare/mlip", "engine/mlip", "mlip",
             "clip+compile", "mlip+compile")
CPU_ROWS = ("bare/clip", "engine/clip", "one/clip", "ddp/clip", "clip", "mlip")
# Seconds per row at most (H200, ViT-B/16 + BERT-base, batch 256): start-up + 60 steps + margin.
ROW_BUDGET_S = {"bare": 40, "ddp": 40, "engine": 60, "one": 50, "trainer": 75, "compile": 120}
PROFILE_STEPS = 3
# The whole check: rows start only while time is left and each is killed at its budget, so the table
# is printed by about this many seconds after the start (benchmarks/gpu_check.sh allows 530, issue 15 540).
BUDGET_S = 500


def row_budget(row: str) -> float:
    kind = row.split("/")[0] if "/" in row else ("compile" if row.endswith("+compile") else "trainer")
    return ROW_BUDGET_S[kind]


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def profile_steps(step, device: str, steps: int = PROFILE_STEPS) -> dict:
    """``steps`` steps of ``step`` (an ``engine_ops.Step``) under torch.profiler: the GPU idle fraction
    over their wall time (n/a on CPU), kernels (and copies/memsets) per step, host ms per phase."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    phases = ("forward", "backward", "step")
    _sync(device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            with record_function("forward"):
                loss = step.forward()
            with record_function("backward"):
                step.backward(loss)
            with record_function("step"):
                step.step()
        _sync(device)
    events = prof.events()
    ranges = [e for e in events if e.name in phases and e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.name not in phases]
    host = {f"host_ms_{p}": sum(e.time_range.elapsed_us() for e in ranges if e.name == p) / steps / 1e3
            for p in phases}
    out = {"steps": steps, **host, "kernels_per_step": len(kernels) / steps if device == "cuda" else None,
           "gpu_idle": None}
    if kernels and ranges:
        busy, end = 0.0, None
        for s, e in sorted((k.time_range.start, k.time_range.end) for k in kernels):
            if end is None or s > end:
                busy, end = busy + (e - s), e
            elif e > end:
                busy, end = busy + (e - end), e
        t0 = min(r.time_range.start for r in ranges)
        t1 = max(max(r.time_range.end for r in ranges), max(k.time_range.end for k in kernels))
        out["gpu_idle"] = max(0.0, 1 - busy / max(t1 - t0, 1e-9))
    return out


def run_memory_row(row: str, model: str, batch: int, steps: int, launched: float, budget: float,
                   profile: bool) -> dict:
    """One in-memory row in this process (``--row``): build, train ``steps`` steps on one fixed
    batch (or fewer when the budget runs out), time them, optionally profile."""
    import torch
    from engine_ops import build_step
    from mlip_ds.config import objective_preset
    from mlip_ds.model.towers import load_model_config
    kind, objective = row.split("/")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    system = {"bare": "bare:autocast", "ddp": "ddp:autocast", "engine": "zero2", "one": "one_gpu"}[kind]
    ds_file = {"engine": "zero2.json", "one": "one_gpu.json"}.get(kind)
    step = build_step(load_model_config(model), objective_preset(objective), system, batch, device,
                      ds_file=str(ROOT / "ds_configs" / ds_file) if ds_file else None)
    precision = "bf16 autocast" if kind != "engine" else "bf16 (DeepSpeed)"
    losses = [step().detach()]
    _sync(device)
    first = time.time() - launched
    deadline = launched + 0.75 * budget
    warm = min(2, max(0, steps - 2))
    for _ in range(warm):
        losses.append(step().detach())
    _sync(device)
    t0, n = time.perf_counter(), 0
    while n < max(1, steps - 1 - warm) and (n < 2 or time.time() < deadline):
        losses.append(step().detach())
        n += 1
    _sync(device)
    step_s = (time.perf_counter() - t0) / n
    values = [float(x) for x in losses]
    k = max(1, len(values) // 4)
    res = {"precision": precision, "samples_per_s": batch / step_s, "step_s": step_s, "timed_steps": n,
           "first_step_s": first, "data_wait": None, "finite": all(math.isfinite(v) for v in values),
           "first": statistics.mean(values[:k]), "last": statistics.mean(values[-k:]),
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None, "sync_audit": None}
    if profile:
        try:
            res["profile"] = profile_steps(step, device)
        except Exception as exn:  # the timing stands without it
            res["profile"] = {"error": f"{type(exn).__name__}: {exn}"[:200]}
    return res


def run_memory(row: str, args, budget: float) -> dict:
    """``run_memory_row`` in a child process with a time limit (a hang or OOM ends the row only)."""
    launched = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row, "--model", args.model,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--row-budget", str(budget),
           "--launched", repr(launched)] + (["--profile"] if row == "engine/clip" and args.profile else [])
    env = train_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{row}: over its {budget:.0f} s budget") from None
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"{row} failed (exit {r.returncode})")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {**res, "wall_s": time.time() - launched}


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
    than the GPU needs for batch 64 on an H200 (benchmarks/bench_host.py). Batch 256 holds about 53 GiB
    of bf16 activations for MLIP (counted on the meta device), so it needs the H200's memory."""
    import torch
    if device != "cuda":
        return 8
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return 256 if gib >= 120 else 128 if gib >= 60 else 64


def run(variant: str, args, shards: Path, out: Path, port: int | None = None, budget: float = 1e9) -> dict:
    """Train one variant (an objective, ``+compile`` for torch.compile) in its own DeepSpeed launch."""
    objective, compiled = variant.split("+")[0], variant.endswith("+compile")
    cmd = deepspeed_cmd(["--train-shards", shards, "--out-dir", out, "--model", args.model, "--objective", objective,
                         "--batch-size", args.batch_size, "--max-steps", args.steps,
                         "--samples-per-epoch", args.batch_size * args.ranks * args.steps * 4,
                         "--log-every", log_every(args.steps), "--sync-debug",  # syncs counted on CUDA
                         "--workers", args.workers, "--warmup-steps", 2, "--lr", "2e-4", "--save-every", 0]
                        + (["--compile"] if compiled else []) + args.extra, ranks=args.ranks, port=port)
    env = train_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    t0 = time.time()
    logfile, first_log = out / "train_log.jsonl", None
    logfile.unlink(missing_ok=True)
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=so, stderr=se, text=True, start_new_session=True)
        while proc.poll() is None:  # the first log record's time: when the first steps were done
            if first_log is None and logfile.exists() and logfile.stat().st_size:
                first_log = time.time()
            if time.time() - t0 > budget:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"{variant}: over its {budget:.0f} s budget"
                                   + ("" if first_log else " before its first logged step"))
            time.sleep(0.25)
        if proc.returncode != 0:
            so.seek(0), se.seek(0)
            print(so.read()[-3000:], se.read()[-3000:], file=sys.stderr)
            raise RuntimeError(f"{variant} run failed (exit {proc.returncode})")
    log = [json.loads(line) for line in logfile.read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    # The median after the first third: warm-up (and, with --compile, the compilation) left out.
    sps = statistics.median(rec["perf/samples_per_s"] for rec in log[len(log) // 3:])
    wait = statistics.median(rec["perf/data_wait_fraction"] for rec in log[len(log) // 3:])
    losses = [rec["loss/total"] for rec in log]
    # Decreasing: the global term, the one term every step computes (MLIP's recipe starts the others
    # after 20% of the run, so the total of the first quarter holds fewer terms than the last's).
    glob = [rec.get("loss/global", rec["loss/total"]) for rec in log]
    k = max(1, len(losses) // 4)
    step_s = args.batch_size * args.ranks / sps
    first_step = None if first_log is None else max(0.0, first_log - t0 - (log[0]["step"] - 1) * step_s)
    return {"samples_per_s": sps, "step_s": step_s, "wall_s": time.time() - t0, "first_step_s": first_step,
            "data_wait": wait, "finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
            "first": statistics.mean(glob[:k]), "last": statistics.mean(glob[-k:]),
            "peak_gb": summary.get("peak_device_memory_gb"), "precision": summary.get("precision"),
            "sync_audit": summary.get("sync_audit")}


HEADER = ("| row | precision | samples/s | step (s) | x bare | peak mem (GiB) | MFU | first step (s) | data wait "
          "| loss first→last | finite | host syncs/step | wall (s) |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
PROFILE_HEADER = ("| profiled row | steps | GPU idle | kernels/step | host ms forward | host ms backward | "
                  "host ms step |\n|---|---:|---:|---:|---:|---:|---:|")


def log_every(steps: int) -> int:
    return max(1, steps // 12)


def _f(value, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, fmt)


def format_row(row: dict, rows: list | None = None) -> str:
    if "error" in row:
        return f"| {row['variant']} | failed: {row['error']} | | | | | | | | | | | |"
    audit = row.get("sync_audit") or {}
    objective = row["variant"].split("/")[-1].split("+")[0]
    bare = next((r for r in rows or [] if r["variant"] == f"bare/{objective}" and "error" not in r), None)
    vs_bare = f"{row['samples_per_s'] / bare['samples_per_s']:.2f}x" if bare else "n/a"
    return (f"| {row['variant']} | {row['precision']} | {row['samples_per_s']:.1f} | {row['step_s']:.3f} | {vs_bare} | "
            f"{_f(row['peak_gb'], '.1f')} | {100 * row['mfu']:.1f}% | {_f(row.get('first_step_s'), '.1f')} | "
            f"{_f(row['data_wait'], '.0f', 100)}{'' if row['data_wait'] is None else '%'} | "
            f"{row['first']:.3f}→{row['last']:.3f} | {row['finite']} | {_f(audit.get('syncs_per_step'), '.1f')} | "
            f"{row['wall_s']:.0f} |")


def format_profile(row: dict) -> str:
    p = row.get("profile") or {}
    if "error" in p:
        return f"| {row['variant']} | failed: {p['error']} | | | | | |"
    return (f"| {row['variant']} | {p['steps']} | {_f(p['gpu_idle'], '.0%')} | {_f(p['kernels_per_step'], '.0f')} | "
            f"{p['host_ms_forward']:.1f} | {p['host_ms_backward']:.1f} | {p['host_ms_step']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit-b16")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=0,
                    help="per rank; 0: by GPU memory (256 from 120 GiB, 128 from 60 GiB, else 64), 8 on CPU")
    ap.add_argument("--ranks", type=int, default=1, help="ranks of the trainer rows (in-memory rows: one)")
    ap.add_argument("--workers", type=int, default=0,
                    help="loader workers per rank; 0: min(12, cores - 2) on CUDA, 1 on CPU")
    ap.add_argument("--samples", type=int, default=2048, help="synthetic samples in the shards")
    ap.add_argument("--rows", "--variants", dest="rows", default="",
                    help=f"comma-separated, in order, from {', '.join(ROWS)} (default on CUDA: "
                         f"{','.join(CUDA_ROWS)}; on CPU {','.join(CPU_ROWS)}, where compiling takes minutes)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help="the whole check's time; a row gets min(its budget, what is left)")
    ap.add_argument("--row-budget-scale", type=float, default=1.0, help="multiplies each row's budget")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="no torch.profiler summary")
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--json", default="", help="also write the rows here after each one (the lent machine "
                                               "returns $OUT; what finished survives a time-out)")
    ap.add_argument("--row", default="", help=argparse.SUPPRESS)  # internal: one in-memory row, JSON out
    ap.add_argument("--row-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", dest="profile_row", help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="extra train.py flags after --")
    args = ap.parse_args()
    if args.row:
        print(json.dumps(run_memory_row(args.row, args.model, args.batch_size, args.steps,
                                        args.launched or time.time(), args.row_budget, args.profile_row)))
        return
    started = time.time()
    import torch
    from mlip_ds.model.towers import load_model_config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows_wanted = [v for v in (args.rows or ",".join(CUDA_ROWS if device == "cuda" else CPU_ROWS)).split(",") if v]
    unknown = [v for v in rows_wanted if v not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    out = ROOT / args.out
    model_cfg = load_model_config(args.model)
    args.batch_size = args.batch_size or default_batch(device)
    args.workers = args.workers or (max(1, min(12, (os.cpu_count() or 4) - 2)) if device == "cuda" else 1)
    args.workers = fit_workers_to_shm(args.workers, args.batch_size, model_cfg["preprocess"]["image_size"])
    peak = matmul_peak_tflops(device)
    shards = out / "shards"
    if any(r in VARIANTS for r in rows_wanted) and not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "synthetic", "--out", str(shards),
                        "--num-samples", str(args.samples), "--image-size", str(model_cfg["preprocess"]["image_size"]),
                        "--workers", str(max(1, (os.cpu_count() or 2) - 1)), "--quiet", "--overwrite"], check=True)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    title = (f"# GPU check: {name}, trainer rows on {args.ranks} rank(s) (ZeRO-2), in-memory rows on 1, model "
             f"{args.model}, batch {args.batch_size}/rank, {args.steps} steps, measured peak {peak:.1f} TFLOP/s "
             f"per device ({'bf16' if device == 'cuda' else 'fp32'}), torch {torch.__version__}")
    print(f"\n{title}\n\n{HEADER}", flush=True)
    rows = []
    for variant in rows_wanted:
        left = args.budget_s - (time.time() - started)
        budget = min(row_budget(variant) * args.row_budget_scale, left)
        try:
            if left < 10:
                raise RuntimeError(f"not run: the check's {args.budget_s:.0f} s budget is spent")
            objective = variant.split("/")[-1].split("+")[0]
            if variant in MEMORY_ROWS:
                res, ranks = run_memory(variant, args, budget), 1
            else:
                res = run(variant, args, shards, out / variant.replace("+", "_"), budget=budget)
                ranks = args.ranks
            flops = step_flops(model_cfg, args.batch_size, ranks, objective)
            row = {"variant": variant, "mfu": flops / res["step_s"] / (peak * 1e12 * ranks), **res}
        except (RuntimeError, OSError, ValueError, KeyError) as exn:  # one failed row does not end the check
            row = {"variant": variant, "error": str(exn)}
        rows.append(row)
        print(format_row(row, rows), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({
                "title": title, "device": name, "ranks": args.ranks, "model": args.model,
                "batch_per_rank": args.batch_size, "steps": args.steps, "peak_tflops": peak,
                "torch": torch.__version__, "budget_s": args.budget_s, "rows": rows}, indent=2))
    trainer = [r for r in rows if r["variant"] in VARIANTS]
    ok = (all("error" not in r and r["finite"] for r in rows if r["variant"] in MEMORY_ROWS)
          and all("error" not in r and r["finite"] and r["last"] < r["first"] for r in trainer))
    print(f"\n{title}\n\n{HEADER}\n" + "\n".join(format_row(r, rows) for r in rows))
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        print(f"\ntorch.profiler, {PROFILE_STEPS} steps after the timed ones (default config: ZeRO-2, bf16)\n\n"
              f"{PROFILE_HEADER}\n" + "\n".join(map(format_profile, profiled)))
    for row in rows:  # where the host waited for the device, by source line (CUDA only)
        for site, count in ((row.get("sync_audit") or {}).get("sites") or {}).items():
            print(f"sync site ({row['variant']}): {count} x {site}")
    print(f"\nwhole check {time.time() - started:.0f} s of a {args.budget_s:.0f} s budget")
    print(f"\nlosses finite in every row, global term decreasing in every trainer row: {ok}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
