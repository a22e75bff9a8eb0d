"""The data loader alone against what the training step consumes, side by side (CPU).

    python benchmarks/bench_loader.py                         # tiny model, batch 32, 1 worker, both objectives
    python benchmarks/bench_loader.py --objectives clip --batches 3 --warmup 1 --steps 3 --batch-size 4

Loader: ``mlip_ds.data.pipeline.make_train_loader`` built exactly as the trainer builds it for the
objective (same ``LoaderSpec``: the train augmentation, tokenisation, for MLIP the second view, the
raw report fields and the ``BatchPreparer`` run in the worker), iterated alone in one process
(rank 0 of 1) with ``--workers`` worker processes, after ``--warmup`` batches; samples/s = samples
delivered per second. Consumption: a real ``deepspeed --num_gpus R mlip_ds/train.py`` run with the
same batch, workers and objective (ZeRO-2, fp32), median per-step samples/s after warm-up divided by
the ranks (one rank consumes its share of the global batch); its median data-wait fraction says
whether the loader kept up inside the run. "loader / step" = loader samples/s over one rank's
consumption: above 1 the loader can feed a rank; the target is 3x. The loader measured alone gets
a whole core per worker; inside a 2-rank run on 2 cores it shares them with the ranks.
Loader and training are measured in rounds (loader, train, loader, train, ...), medians reported.
Not a test: numbers depend on the machine; the table says which.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench_common import (add_common_args, begin, bench_env, in_rounds, load_avg, machine_line,
                          make_synthetic_shards, median, ours_cmd, ours_rates, run_logged, show, table,
                          work_dir)


def loader_rate(objective: str, shards: Path, model: str, batch_size: int, batches: int, warmup: int,
                workers: int, seed: int = 0) -> float:
    """Samples/s of the trainer's loader for ``objective``, alone, after ``warmup`` batches."""
    import torch
    from mlip_ds.config import objective_preset
    from mlip_ds.data.pipeline import LoaderSpec, expand_shards, make_train_loader
    from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD
    from mlip_ds.model.concepts import load_concepts
    from mlip_ds.model.mlip import needs
    from mlip_ds.objective.batch import BatchPreparer
    from mlip_ds.model.towers import build_tokenizer, load_model_config

    torch.set_num_threads(1)
    model_cfg = load_model_config(model)
    tokenizer = build_tokenizer(model_cfg)
    obj = objective_preset(objective)
    data_needs = needs(obj)
    vocab = load_concepts("", expand_shards(str(shards))) if (data_needs["knowledge"] or data_needs["categories"]) \
        else None
    preparer = BatchPreparer(obj, tokenizer, vocab)
    pre = model_cfg["preprocess"]
    spec = LoaderSpec(str(shards), batch_size, warmup + batches, pre["image_size"], tuple(pre.get("mean", CLIP_MEAN)),
                      tuple(pre.get("std", CLIP_STD)), workers, 1000, seed, "resampled",
                      second_view=data_needs["second_view"], raw=data_needs["raw"],
                      batch_fn=preparer if preparer.active else None)
    it = iter(make_train_loader(spec, tokenizer))
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += len(batch["key"])
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--objectives", default="clip,mlip")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--workers", type=int, default=1, help="loader worker processes (per rank in training)")
    ap.add_argument("--batches", type=int, default=30, help="timed loader batches")
    ap.add_argument("--warmup", type=int, default=3, help="untimed loader batches / training steps first")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="rounds (loader, train) per objective")
    ap.add_argument("--samples", type=int, default=1024, help="synthetic samples in the shards")
    add_common_args(ap)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    os.environ.update({k: v for k, v in bench_env().items() if k in ("OMP_NUM_THREADS", "DS_ACCELERATOR",
                                                                     "TOKENIZERS_PARALLELISM")})
    from mlip_ds.model.towers import load_model_config
    image_size = load_model_config(args.model)["preprocess"]["image_size"]
    work, tmp = work_dir(args.work, "bench_loader_")
    shards = make_synthetic_shards(work / "shards", args.samples, image_size, samples_per_shard=max(16, args.samples // 8))
    objectives = [o for o in args.objectives.split(",") if o]
    begun = begin(args)
    cmds = {}

    def run(o: str, i: int) -> tuple[float, dict]:
        """One round of one objective: the loader alone, then a training run."""
        rate = loader_rate(o, shards, args.model, args.batch_size, args.batches, args.warmup, args.workers)
        out = work / f"train-{o}-{i}"
        cmds[o] = ours_cmd(o, shards, out, model=args.model, batch_size=args.batch_size,
                           steps=args.warmup + args.steps, ranks=args.ranks, workers=args.workers)
        run_logged(cmds[o], work / f"train-{o}-{i}.log", args.timeout)
        trained = ours_rates(out, args.warmup)
        print(f"  {o} round {i + 1}: loader {rate:.1f} samples/s, train {median(trained['rates']):.1f} samples/s "
              f"(global), load {load_avg()}", file=sys.stderr, flush=True)
        return rate, trained

    results = in_rounds(objectives, args.repeats, run)
    loader = {o: [rate for rate, _ in results[o]] for o in objectives}
    train = {o: [trained for _, trained in results[o]] for o in objectives}
    load_end = load_avg()
    rows = []
    for o in objectives:
        lr = median(loader[o])
        per_rank = median(median(r["rates"]) for r in train[o]) / args.ranks
        rows.append([o, f"{lr:.1f}", " / ".join(f"{x:.1f}" for x in loader[o]), f"{per_rank:.1f}",
                     f"{per_rank * args.ranks:.1f}", f"{lr / per_rank:.2f}",
                     f"{100 * median(r['data_wait'] for r in train[o]):.0f}%"])
    print(machine_line(begun, load_end))
    print(f"model {args.model}, batch {args.batch_size} per rank, {args.workers} loader worker(s), "
          f"{args.samples} synthetic samples at {image_size} px; loader: {args.batches} batches after {args.warmup}, "
          f"alone; training: {args.ranks} ranks, ZeRO-2, fp32, median per-step rate of {args.steps} steps after "
          f"{args.warmup}; {args.repeats} round(s), medians")
    print(table(["objective", "loader samples/s", "loader runs", "step samples/s per rank",
                 "step samples/s (all ranks)", "loader / step", "data wait in training"], rows))
    print("commands:")
    print(f"  loader: {show([sys.executable, str(Path(__file__).resolve())] + (argv if argv is not None else sys.argv[1:]))}")
    for o in objectives:
        print(f"  train {o}: OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu {show(cmds[o])}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
