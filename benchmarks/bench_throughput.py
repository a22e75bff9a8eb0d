"""Training throughput (samples/s) of our trainer against open_clip's own trainer, side by side (CPU).

    python benchmarks/bench_throughput.py                        # tiny towers, 2 ranks, batch 32, 3 rounds
    python benchmarks/bench_throughput.py --systems ours-clip,open_clip --repeats 1 --steps 4 --warmup 1 --batch-size 4

Systems, each a real 2-rank training run on the same synthetic shards, same towers, same batch per
rank, fp32, same number of data-loader workers per rank and one thread per rank:

- ``ours-clip``: ``deepspeed --num_gpus R mlip_ds/train.py --objective clip`` (ZeRO-2,
  ``DS_ACCELERATOR=cpu``, gloo);
- ``ours-clip-zero0``: the same with ``ds_configs/zero0.json`` (plain data parallelism, what DDP
  does: no optimizer-state partitioning, whose bookkeeping costs more than it saves on small models);
- ``open_clip``: ``torchrun --nproc_per_node R -m open_clip_train.main`` (DDP over gloo) with a
  model config holding the same towers: the same open_clip vision-tower config and the same
  Hugging Face BERT-style text tower (``hf_model_name`` pointing at a local copy of our text-model
  folder, with random weights saved next to its config so that open_clip's default
  ``pretrained_text=True`` loads them from disk; nothing is downloaded). open_clip_train is started
  through this script (``--openclip-entry``), which registers that config with
  ``open_clip.add_model_config`` and works around open_clip_train's CPU DDP bug (it passes
  ``device_ids=[cpu]``, which torch rejects). open_clip_train also needs pandas and
  webdataset<=0.2.86 (its ``[training]`` extra; on webdataset 1.x its tar reader fails with
  ``KeyError: 'fname'``), which would change this venv's pins (numpy 2, webdataset 0.2.86), so
  they live in a separate folder put on PYTHONPATH for the open_clip_train run only:
  ``bash benchmarks/install_extra.sh``
  (``--extra-path``, default ``$MLIP_BENCH_EXTRA`` or ``.bench-extra``); without it that
  system is left out with the reason;
- ``ours-mlip``: the same trainer with ``--objective mlip`` (all six terms).

Both trainers log every step; the table gives the median per-step samples/s (whole global batch,
data wait included) after ``--warmup`` steps, each system run ``--repeats`` times in rounds
(A, B, C, A, B, C, ...) so that a change of machine load hits every system alike, and the median of
the runs. Ratios are to open_clip_train; "data wait" is the median fraction of a step spent waiting
for the batch (rank 0). Not a test: numbers depend on the machine; the table says
which, with the load average at start and end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from bench_common import (ROOT, add_common_args, begin, bench_env, load_avg,
                          machine_line, make_synthetic_shards, median, ours_cmd, ours_rates,
                          run_logged, shard_files, show, table, work_dir)

from mlip_ds.launch import free_port

SYSTEMS = ("ours-clip", "ours-clip-zero0", "open_clip", "ours-mlip")
LABEL = {"ours-clip": "ours, --objective clip (DeepSpeed ZeRO-2)",
         "ours-clip-zero0": "ours, --objective clip (DeepSpeed ZeRO-0)",
         "open_clip": "open_clip_train (torch DDP)",
         "ours-mlip": "ours, --objective mlip (DeepSpeed ZeRO-2)"}
# open_clip_train's per-step log line (log every step: the averages are the step's own values)
OC_STEP = re.compile(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+), ([0-9.eE+-]+)/s,")


# ---------------------------------------------------------------- open_clip_train, in each rank
def openclip_entry(config_dir: str, argv: list[str]) -> None:
    """What torchrun runs per rank: register the model config, fix DDP on CPU, run open_clip_train."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class CpuDDP(DistributedDataParallel):
        # open_clip_train 3.3.0 wraps with device_ids=[device]; torch rejects device_ids for CPU modules.
        def __init__(self, module, device_ids=None, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP
    import open_clip
    open_clip.add_model_config(config_dir)
    from open_clip_train import main as oc_main
    # "--logs" is spelled "--oc-logs" on torchrun's command line: torchrun's own parser takes the
    # prefix "--logs" for its "--logs-specs" and stops with "ambiguous option".
    oc_main.main(["--logs" if a == "--oc-logs" else a for a in argv])


def default_extra_path() -> str:
    """$MLIP_BENCH_EXTRA, else ``.bench-extra`` in the repository (``benchmarks/install_extra.sh``)
    when it exists, else ''."""
    if os.environ.get("MLIP_BENCH_EXTRA"):
        return os.environ["MLIP_BENCH_EXTRA"]
    local = ROOT / ".bench-extra"
    return str(local) if local.is_dir() else ""


def extra_env(extra_path: str) -> dict:
    env = bench_env()
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


EXTRA_HINT = "bash benchmarks/install_extra.sh (or --extra-path DIR, or MLIP_BENCH_EXTRA)"


def openclip_available(extra_path: str = "") -> str | None:
    """None when open_clip_train loads (with ``extra_path`` first on sys.path) next to a webdataset it
    works with, else why not."""
    import subprocess
    code = "import open_clip_train.main, webdataset; print(webdataset.__version__)"
    r = subprocess.run([sys.executable, "-c", code], env=extra_env(extra_path), capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["import failed"])[-1] + f"; {EXTRA_HINT}"
    version = r.stdout.strip().splitlines()[-1]
    if int(version.split(".")[0]) >= 1:
        return (f"open_clip_train 3.3.0 needs webdataset<=0.2.86 (its tarfile_to_samples_nothrow fails with "
                f"KeyError 'fname' on webdataset {version}); {EXTRA_HINT}")
    return None


def openclip_model(model_cfg: dict, work: Path, name: str) -> Path:
    """A folder with ``<name>.json``: our towers as an open_clip model config; the text tower's
    folder is copied (config + tokenizer files) and given random weights saved in HF format."""
    import torch
    import transformers
    text_src = Path(model_cfg["text_cfg"]["hf_model_name"])
    text_dir = work / "oc_text_model"
    if not (text_dir / "model.safetensors").exists():
        shutil.rmtree(text_dir, ignore_errors=True)
        shutil.copytree(text_src, text_dir)
        torch.manual_seed(0)
        config = transformers.AutoConfig.from_pretrained(str(text_dir))
        transformers.AutoModel.from_config(config).save_pretrained(str(text_dir))
    cfg = {"embed_dim": model_cfg["embed_dim"], "vision_cfg": model_cfg["vision_cfg"],
           "text_cfg": {**model_cfg["text_cfg"], "hf_model_name": str(text_dir)}, "custom_text": True}
    cfg_dir = work / "oc_model_configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / f"{name}.json").write_text(json.dumps(cfg, indent=1))
    return cfg_dir


def param_counts(model_cfg: dict, oc_dir: Path | None, oc_name: str) -> dict:
    """Trainable parameters of our two-tower model and of open_clip_train's (must be equal)."""
    from mlip_ds.model.towers import build_model
    out = {"ours": sum(p.numel() for p in build_model(model_cfg).parameters())}
    if oc_dir is not None:
        import open_clip
        open_clip.add_model_config(str(oc_dir))
        m = open_clip.create_model(oc_name, pretrained_text=False)
        out["open_clip"] = sum(p.numel() for p in m.parameters())
    return out


def openclip_cmd(args, shards: Path, cfg_dir: Path, name: str, logs: Path) -> list[str]:
    files = shard_files(shards)
    stem = files[0].name.rsplit("-", 1)[0]
    digits = len(files[0].stem.rsplit("-", 1)[1])
    pattern = str(shards / f"{stem}-{{{0:0{digits}d}..{len(files) - 1:0{digits}d}}}.tar")
    steps = args.warmup + args.steps
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
            "--master_port", str(free_port()), str(Path(__file__).resolve()), "--openclip-entry", str(cfg_dir),
            "--model", name, "--train-data", pattern, "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", str(steps * args.batch_size * args.ranks), "--batch-size", str(args.batch_size),
            "--epochs", "1", "--workers", str(args.workers), "--precision", "fp32", "--device", "cpu",
            "--lr", "5e-4", "--wd", "0.05", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
            "--warmup", "10", "--grad-clip-norm", "1.0", "--local-loss", "--gather-with-grad",
            "--log-every-n-steps", "1", "--seed", "0", "--oc-logs", str(logs), "--name", "run",
            "--save-frequency", "0"]


def openclip_rates(log_text: str, warmup: int) -> dict:
    steps = [tuple(map(float, m)) for m in OC_STEP.findall(log_text)]
    if len(steps) <= warmup:
        raise RuntimeError(f"open_clip_train logged {len(steps)} steps, fewer than warm-up {warmup} + 1")
    steps = steps[warmup:]
    return {"rates": [rate for _, _, rate in steps], "data_wait": median(d / b for d, b, _ in steps if b > 0)}


# ---------------------------------------------------------------- one run of one system
def run_system(system: str, args, shards: Path, work: Path, i: int, oc: tuple | None) -> dict:
    out = work / f"{system}-{i}"
    shutil.rmtree(out, ignore_errors=True)
    if system == "open_clip":
        cfg_dir, name = oc
        cmd = openclip_cmd(args, shards, cfg_dir, name, out)
        env = extra_env(args.extra_path)
        log = work / f"{system}-{i}.log"
        wall = run_logged(cmd, log, args.timeout, env)
        res = openclip_rates(log.read_text(errors="replace"), args.warmup)
    else:
        cmd = ours_cmd(system.split("-")[1], shards, out, model=args.model, batch_size=args.batch_size,
                       steps=args.warmup + args.steps, ranks=args.ranks, workers=args.workers,
                       ds_config="zero0.json" if system.endswith("-zero0") else "zero2.json")
        wall = run_logged(cmd, work / f"{system}-{i}.log", args.timeout)
        res = ours_rates(out, args.warmup)
    res.update(cmd=cmd, wall=wall, median=median(res["rates"]))
    print(f"  {system} run {i + 1}: median {res['median']:.1f} samples/s over {len(res['rates'])} steps, "
          f"wall {wall:.0f} s, load {load_avg()}", file=sys.stderr, flush=True)
    return res


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--openclip-entry"]:
        return openclip_entry(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="model config (mlip_ds/model/configs) or JSON path")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=3, help="runs per system, interleaved")
    ap.add_argument("--workers", type=int, default=1, help="data-loader worker processes per rank (both trainers)")
    ap.add_argument("--samples", type=int, default=1024, help="synthetic samples in the shards")
    ap.add_argument("--extra-path", default=default_extra_path(),
                    help="folder put first on PYTHONPATH for open_clip_train only, holding pandas and "
                         "webdataset 0.2.86 (default: $MLIP_BENCH_EXTRA, else .bench-extra if present)")
    add_common_args(ap)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}: choose from {SYSTEMS}")

    from mlip_ds.model.towers import load_model_config
    model_cfg = load_model_config(args.model)
    work, tmp = work_dir(args.work, "bench_throughput_")
    shards = make_synthetic_shards(work / "shards", args.samples, model_cfg["preprocess"]["image_size"],
                                   samples_per_shard=max(16, args.samples // 8))
    oc, oc_note = None, ""
    if "open_clip" in systems:
        why = openclip_available(args.extra_path)
        if why:
            print(f"open_clip_train cannot run here, leaving it out: {why}", file=sys.stderr)
            systems.remove("open_clip")
            oc_note = f"open_clip_train left out: {why}"
        else:
            oc_note = f"open_clip_train runs with pandas and webdataset 0.2.86 from {args.extra_path or 'the venv'}"
            name = f"mlipbench-{Path(args.model).stem}"
            oc = (openclip_model(model_cfg, work, name), name)
    params = param_counts(model_cfg, oc[0] if oc else None, oc[1] if oc else "")

    begun = begin(args)
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for i in range(args.repeats):
        for system in systems:
            results[system].append(run_system(system, args, shards, work, i, oc))
    load_end = load_avg()

    med = {s: median(r["median"] for r in rs) for s, rs in results.items()}
    rows = []
    for s in systems:
        runs = results[s]
        waits = [r["data_wait"] for r in runs if r["data_wait"] is not None]
        rows.append([LABEL[s], f"{med[s]:.1f}", f"{med[s] / args.ranks:.1f}",
                     " / ".join(f"{r['median']:.1f}" for r in runs),
                     f"{med[s] / med['open_clip']:.2f}" if "open_clip" in med else "n/a",
                     f"{med[s] / med['ours-clip']:.2f}" if "ours-clip" in med else "n/a",
                     f"{100 * median(waits):.0f}%" if waits else "n/a"])
    print(machine_line(begun, load_end))
    print(f"model {args.model} ({params['ours']:,} parameters"
          + (f"; open_clip_train's model: {params['open_clip']:,}" if "open_clip" in params else "")
          + f"), {args.ranks} ranks x batch {args.batch_size} (global {args.ranks * args.batch_size}), fp32, "
          f"{args.workers} loader worker(s) per rank, {args.samples} synthetic samples at "
          f"{model_cfg['preprocess']['image_size']} px; per run the median per-step samples/s of "
          f"{args.steps} steps after {args.warmup} warm-up; {args.repeats} run(s) per system in rounds"
          + (f"; {oc_note}" if oc_note else ""))
    print(table(["system", "samples/s", "per rank", "runs (samples/s)", "x open_clip_train", "x ours clip",
                 "data wait"], rows, "lrrrrrr"))
    print("commands (first run of each; work folder paths):")
    for s in systems:
        env = f"PYTHONPATH={args.extra_path} " if s == "open_clip" and args.extra_path else ""
        print(f"  {s}: OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu {env}{show(results[s][0]['cmd'])}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
