"""Training step without a data loader: torch DDP (open_clip_train's step) vs our DeepSpeed step.

    python benchmarks/bench_engine.py                       # tiny towers, 2 ranks x batch 32, 40 steps, 3 rounds
    python benchmarks/bench_engine.py --model vit-b16 --batch-size 2 --steps 3 --rounds 1

Isolates the engine from the loader (`benchmarks/bench_throughput.py` measures both together): every rank
steps on one fixed in-memory batch, same towers, same initial weights, same AdamW settings and
gradient clipping, 2 ranks over gloo, one thread per rank. Systems, interleaved in rounds:

- ``ddp``: ``DistributedDataParallel`` + open_clip's ``ClipLoss(local_loss, gather_with_grad)`` +
  ``clip_grad_norm_`` + ``torch.optim.AdamW``, what open_clip_train's step does;
- ``zero0`` / ``zero2``: ``deepspeed.initialize`` with ``ds_configs/zero2.json`` (stage 0 or 2)
  resolved as the trainer resolves it, ``MLIPModel`` with ``--objective clip``, the trainer's loss
  (``compute_terms`` + ``total_loss``), ``engine.backward`` + ``engine.step``;
- ``zero2+flags``: ``zero2`` plus the trainer's per-step all-reduce of the NaN/stop flags
  (``--nan-check sync``, the CPU default).

Prints the median step time and samples/s per system. Not a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_common import (ROOT, add_common_args, begin, bench_env, in_rounds, machine_line, median,
                          run_logged, show, table, work_dir)

from mlip_ds.launch import deepspeed_cmd

SYSTEMS = ("ddp", "zero0", "zero2", "zero2+flags")


def worker(system: str, model_name: str, batch: int, steps: int, warmup: int, out: Path) -> None:
    """One rank (run under the DeepSpeed launcher)."""
    import torch
    import torch.distributed as dist
    from open_clip.loss import ClipLoss

    from mlip_ds.config import build_parser, config_from_args
    from mlip_ds.distributed import init_distributed
    from mlip_ds.ds_config import load_ds_config, resolve_ds_config
    from mlip_ds.losses.objective import total_loss
    from mlip_ds.model.mlip import MLIPModel
    from mlip_ds.objective.terms import compute_terms
    from mlip_ds.model.towers import build_model, load_model_config
    from mlip_ds.train import param_groups

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cfg = config_from_args(build_parser().parse_args(["--train-shards", "-", "--batch-size", str(batch)]))
    model_cfg = load_model_config(model_name)
    torch.manual_seed(0)
    clip = build_model(model_cfg)
    g = torch.Generator().manual_seed(rank)
    size, length = model_cfg["preprocess"]["image_size"], model_cfg["text_cfg"]["context_length"]
    image = torch.randn(batch, 3, size, size, generator=g)
    vocab = int(clip.text.transformer.config.vocab_size)
    text = torch.randint(5, min(vocab, 400), (batch, length), generator=g)
    o = cfg.optim
    times = []
    if system == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(clip)
        opt = torch.optim.AdamW(param_groups(clip, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(*model(image, text))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            times.append(time.perf_counter() - t0)
    else:
        ds = load_ds_config(str(ROOT / "ds_configs" / "zero2.json"))
        ds["zero_optimization"]["stage"] = 0 if system == "zero0" else 2
        ds = resolve_ds_config(ds, cfg, world, 1000, None)
        import deepspeed
        model = MLIPModel(clip, cfg.objective)
        engine, *_ = deepspeed.initialize(model=model, config=ds,
                                          model_parameters=param_groups(model, o.weight_decay))
        flags = system.endswith("+flags")
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            out_ = engine(image=image, text=text)
            loss, _ = total_loss(compute_terms(out_, {}, cfg.objective), cfg.objective, step=i)
            if flags:
                f = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, 0.0])
                dist.all_reduce(f, op=dist.ReduceOp.MAX)
            engine.backward(loss)
            engine.step()
            times.append(time.perf_counter() - t0)
    if rank == 0:
        step = statistics.median(times[warmup:])
        out.write_text(json.dumps({"system": system, "step_s": step, "samples_per_s": batch * world / step}))
    dist.barrier()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="runs per system, interleaved")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    add_common_args(ap)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.model, args.batch_size, args.steps, args.warmup, Path(args.out))
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; choose from {SYSTEMS}")
    work, tmp = work_dir(args.work, "bench_engine_")
    begun = begin(args)
    cmds = {}

    def run(system: str, r: int) -> dict:
        out = work / f"{system}-{r}.json"
        cmd = deepspeed_cmd(["--worker", system, "--out", out, "--model", args.model, "--batch-size",
                             args.batch_size, "--steps", args.steps, "--warmup", args.warmup],
                            ranks=args.ranks, ds_config=None, script=Path(__file__).resolve())
        cmds.setdefault(system, show(cmd))
        run_logged(cmd, work / f"{system}-{r}.log", timeout=3600, env=bench_env())
        res = json.loads(out.read_text())
        print(f"round {r} {system}: {res['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
        return res

    results = in_rounds(systems, args.rounds, run)
    rates = {s: [res["samples_per_s"] for res in results[s]] for s in systems}
    steps = {s: [res["step_s"] * 1000 for res in results[s]] for s in systems}
    print(machine_line(begun))
    print(f"model {args.model}, {args.ranks} ranks x batch {args.batch_size}, fp32, one fixed batch per rank (no "
          f"loader), median step of {args.steps} after {args.warmup} warm-up, {args.rounds} round(s), medians")
    base = median(rates[systems[0]])
    rows = [[s, f"{median(steps[s]):.1f}", f"{median(rates[s]):.1f}",
             " / ".join(f"{x:.0f}" for x in rates[s]), f"{median(rates[s]) / base:.2f}"] for s in systems]
    print(table(["system", "step ms", "samples/s", "runs (samples/s)", f"x {systems[0]}"], rows))
    for s in systems:
        print(f"  {s}: {cmds[s]}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
