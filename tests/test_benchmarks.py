"""The benchmark scripts (benchmarks/bench_*.py) run end to end on the tiniest settings and print a
well-formed table with the machine line. Never timings: the numbers are not checked. One rank where
the script allows it (start-up of DeepSpeed ranks dominates the time on 2 cores)."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT, train_env

BENCHMARKS = ROOT / "benchmarks"
QUICK = ["--wait-load", "0"]  # never wait for a quiet machine in tests


def run_tool(script, args, tmp_path, timeout=300, extra_env=None):
    r = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args), *QUICK, "--work", str(tmp_path)],
                       cwd=ROOT, env=train_env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def tables(text):
    """Markdown tables in the output: lists of rows (lists of stripped cells), header first."""
    out, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            out.append(current)
            current = []
    return out


def check_table(rows, header, numeric_cols, n_rows):
    assert rows[0] == header
    assert all(re.fullmatch(r"-+:?", c) for c in rows[1]), rows[1]
    body = rows[2:]
    assert len(body) == n_rows, body
    for row in body:
        assert len(row) == len(header), row
        for i in numeric_cols:
            float(row[i].rstrip("%"))  # a number (n/a would fail)
    return body


def check_machine(out):
    line = next(ln for ln in out.splitlines() if ln.startswith("machine: "))
    assert "logical CPUs" in line and "torch " in line and "load avg 1/5/15 min at start" in line
    assert "load avg at end" in line


@pytest.mark.slow
def test_bench_make_shards(tmp_path):
    out = run_tool("bench_make_shards.py", ["--samples", 6, "--small", 2, "--workers", "1", "--sources",
                                            "synthetic,csv", "--repeats", 1, "--image-size", 64,
                                            "--source-size", 64], tmp_path)
    check_machine(out)
    [t] = tables(out)
    body = check_table(t, ["source", "workers", "wall s", "end-to-end samples/s", "steady samples/s", "x 1 worker"],
                       [1, 2, 3], 2)
    assert [r[0] for r in body] == ["synthetic", "csv"]
    assert "make_shards.py synthetic --num-samples 6" in out


@pytest.mark.slow
def test_bench_loader(tmp_path):
    out = run_tool("bench_loader.py", ["--objectives", "clip", "--batch-size", 4, "--batches", 2, "--warmup", 1,
                                       "--steps", 1, "--repeats", 1, "--samples", 32, "--workers", 1, "--ranks", 1],
                   tmp_path)
    check_machine(out)
    [t] = tables(out)
    check_table(t, ["objective", "loader samples/s", "loader runs", "step samples/s per rank",
                    "step samples/s (all ranks)", "loader / step", "data wait in training"], range(1, 7), 1)
    assert "mlip_ds/train.py" in out


@pytest.mark.slow
def test_bench_zero_memory(tmp_path):
    out = run_tool("bench_zero_memory.py", ["--model", "tiny", "--image-size", 0, "--context", 0, "--stages", "2",
                                            "--steps", 1, "--ranks", 1], tmp_path)
    check_machine(out)
    [t] = tables(out)
    body = check_table(t, ["stage", "ranks", "rank", "RSS before build GiB", "construction peak MiB",
                           "params after build MiB", "params MiB", "grads MiB", "Adam MiB", "fp32 master MiB",
                           "peak RSS GiB", "RSS after steps GiB", "step s", "last loss"], [1, 2, 3, 4, 10, 11, 12, 13], 1)
    assert body[0][:3] == ["2", "1", "0"]
    measured, analytic = (float(v) for v in body[0][9].split(" / "))  # ZeRO-2 keeps an fp32 master partition
    assert measured > 0 and analytic > 0


@pytest.mark.slow
def test_bench_throughput(tmp_path):
    from bench_throughput import default_extra_path, openclip_available
    why = openclip_available(default_extra_path())
    if why:
        pytest.skip(f"open_clip_train cannot run here: {why}")
    # open_clip_train alone on 2 ranks (its CPU DDP work-around, the shards, the model config): our
    # trainer's run is the same code path as in test_bench_loader, so it is not repeated here (time).
    out = run_tool("bench_throughput.py", ["--systems", "open_clip", "--repeats", 1, "--steps", 1,
                                           "--warmup", 1, "--batch-size", 4, "--samples", 32], tmp_path)
    check_machine(out)
    [t] = tables(out)
    body = check_table(t, ["system", "samples/s", "per rank", "runs (samples/s)", "x open_clip_train",
                           "x ours clip", "data wait"], [1, 2, 3, 4, 6], 1)
    assert body[0][0].startswith("open_clip_train") and body[0][4] == "1.00"
    m = re.search(r"model tiny \(([\d,]+) parameters; open_clip_train's model: ([\d,]+)\)", out)
    assert m and m.group(1) == m.group(2), "both trainers must train the same towers"


@pytest.mark.slow
def test_bench_engine(tmp_path):
    out = run_tool("bench_engine.py", ["--systems", "ddp,zero2+flags", "--steps", 1, "--warmup", 0, "--rounds", 1,
                                       "--batch-size", 4], tmp_path)
    check_machine(out)
    [t] = tables(out)
    body = check_table(t, ["system", "step ms", "samples/s", "runs (samples/s)", "x ddp"], [1, 2, 4], 2)
    assert [r[0] for r in body] == ["ddp", "zero2+flags"] and body[0][4] == "1.00"


def test_bench_host(capsys):
    """In-process (no DeepSpeed launch). Besides the table: the ops per step do not grow with the
    batch (no loss loops over samples, so a GPU's launches stay fixed as the batch grows)."""
    import bench_host
    bench_host.main(["--model", "tiny", "--batch-sizes", "4,8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "Host cost and memory of one step: model tiny" in out
    header, _, *rows = tables(out)[0]
    assert header[:3] == ["objective", "batch", "ops/step"] and len(rows) == 4
    ops = {(r[0], int(r[1])): int(r[2]) for r in rows}
    assert ops["clip", 4] == ops["clip", 8] and ops["mlip", 4] == ops["mlip", 8] > 2 * ops["clip", 4]
