"""Helpers shared by the benchmark scripts (benchmarks/bench_*.py): the machine line, waiting for a quiet
machine, synthetic shards, launching DeepSpeed runs of the trainer, and markdown tables.

Not a library API: the benchmark scripts import it from ``tools/``.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from mlip_ds.launch import deepspeed_cmd, train_env


def load_avg() -> str:
    try:
        return "%.2f/%.2f/%.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> str:
    from importlib import metadata
    out = [f"Python {platform.python_version()}"]
    for dist in ("torch", "deepspeed", "open_clip_torch", "webdataset", "transformers"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def machine(load_at_start: str | None = None) -> str:
    """CPU model, cores, versions and the 1/5/15-minute load average (at start unless given)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return (f"{cpu_model()}; {os.cpu_count()} logical CPUs ({usable} usable); "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {versions()}; "
            f"{platform.system()} {platform.release()}; load avg 1/5/15 min at start {load_at_start or load_avg()}")


def wait_for_quiet(max_load: float, max_wait: float) -> str:
    """Poll the 1-minute load until it is below ``max_load`` (at most ``max_wait`` s); returns a note."""
    if max_load <= 0 or max_wait <= 0:
        return f"no wait for a quiet machine (load {load_avg()})"
    t0 = time.time()
    while os.getloadavg()[0] >= max_load and time.time() - t0 < max_wait:
        print(f"waiting for 1-min load < {max_load} (now {load_avg()})", file=sys.stderr, flush=True)
        time.sleep(15)
    waited = time.time() - t0
    quiet = os.getloadavg()[0] < max_load
    return (f"waited {waited:.0f} s for 1-min load < {max_load}: "
            + ("reached" if quiet else f"NOT reached, measured anyway (load {load_avg()})"))


def add_common_args(ap) -> None:
    """``--work``, ``--wait-load``, ``--wait-max``: what every benchmark script takes."""
    ap.add_argument("--work", default="", help="work folder (default: a temporary one, removed)")
    ap.add_argument("--wait-load", type=float, default=1.0, help="wait for a 1-min load below this first (0: no)")
    ap.add_argument("--wait-max", type=float, default=600, help="at most this many seconds")


def work_dir(work: str, prefix: str):
    """(folder, TemporaryDirectory or None): ``--work`` when given, else a temporary folder."""
    if work:
        path = Path(work).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path, None
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    return Path(tmp.name), tmp


def begin(args) -> dict:
    """Wait for a quiet machine (``--wait-load``/``--wait-max``); the note and the load at the start."""
    note = wait_for_quiet(args.wait_load, args.wait_max)
    return {"note": note, "load_start": load_avg()}


def machine_line(begun: dict, load_end: str | None = None) -> str:
    """The ``machine: ...`` line every table comes with."""
    return f"machine: {machine(begun['load_start'])}; load avg at end {load_end or load_avg()}; {begun['note']}"


def bench_env(**extra) -> dict:
    """The launch environment (``mlip_ds.launch.train_env``: one thread per process unless set, no
    inherited launcher variables) on the CPU accelerator, tokenizers single-threaded."""
    return train_env(**{"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", **extra})


def show(cmd: list[str]) -> str:
    """A command as a user would type it (paths relative to the repository where possible)."""
    parts = []
    for c in cmd:
        c = str(c)
        if c == sys.executable:
            c = "python"
        elif c.startswith(str(ROOT) + os.sep):
            c = os.path.relpath(c, ROOT)
        parts.append(shlex.quote(c))
    return " ".join(parts)


def make_synthetic_shards(out: Path, num_samples: int, image_size: int, samples_per_shard: int = 256,
                          workers: int = 1) -> Path:
    """Synthetic shards with the real CLI, reused when the manifest already says the same."""
    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        opts = m.get("created_with", {})
        if m.get("num_samples") == num_samples and opts.get("image_size") == image_size:
            return out
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "synthetic", "--out", str(out),
                    "--num-samples", str(num_samples), "--image-size", str(image_size),
                    "--samples-per-shard", str(samples_per_shard), "--workers", str(workers), "--quiet",
                    "--overwrite"], check=True, cwd=ROOT, env=bench_env(), capture_output=True, timeout=3600)
    return out


def shard_files(shards: Path) -> list[Path]:
    return sorted(shards.glob("*.tar"))


def ours_cmd(objective: str, shards: Path, out: Path, *, model: str, batch_size: int, steps: int, ranks: int,
             workers: int, ds_config: str = "zero2.json", extra: tuple[str, ...] = ()) -> list[str]:
    """``deepspeed --num_gpus R mlip_ds/train.py ...`` for ``steps`` optimizer steps, logging every step."""
    return deepspeed_cmd(["--train-shards", shards, "--out-dir", out, "--model", model, "--objective", objective,
                          "--batch-size", batch_size, "--max-steps", steps,
                          "--samples-per-epoch", batch_size * ranks * (steps + 1), "--log-every", 1,
                          "--workers", workers, "--save-every", 0, "--keep-last", 1, *extra],
                         ranks=ranks, ds_config=ds_config)


def run_logged(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None) -> float:
    """Run a command with stdout+stderr to a file; raise with its tail when it fails. Returns wall s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=env or bench_env(), stdout=f, stderr=subprocess.STDOUT,
                           timeout=timeout)
    wall = time.time() - t0
    if r.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed (exit {r.returncode}): {show(cmd)}\n--- log tail ---\n{tail}")
    return wall


def in_rounds(names: list[str], rounds: int, measure) -> dict[str, list]:
    """``measure(name, round)`` for every name in every round, the names interleaved within a round
    (a drift in the machine's load then hits each alike): {name: [its result in each round]}."""
    results: dict[str, list] = {n: [] for n in names}
    for r in range(rounds):
        for n in names:
            results[n].append(measure(n, r))
    return results


def ours_rates(out: Path, warmup: int) -> dict:
    """Per-step samples/s (global) from the trainer's train_log.jsonl, after ``warmup`` steps."""
    records = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records[rec["step"]] = rec
    steps = sorted(records)
    timed = [records[s] for s in steps if s > warmup]
    if not timed:
        raise RuntimeError(f"{out}: no steps after the {warmup} warm-up steps")
    return {"rates": [r["perf/samples_per_s"] for r in timed],
            "data_wait": statistics.median(r["perf/data_wait_fraction"] for r in timed),
            "loss_first": records[steps[0]]["loss/total"], "loss_last": records[steps[-1]]["loss/total"]}


def table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; ``align`` is one character per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in row] for row in [header] + rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, width, align)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + (":" if a == "r" else "-") for w, a in zip(width, align)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")
