#!/usr/bin/env python
"""The MLIP ablation in one command: CLIP, each MLIP term added alone to CLIP, and full MLIP, trained
with equal steps, seeds and data by the real DeepSpeed trainer, exported, linear-probed, tabled.

    python tools/ablate.py --train-shards data/pretrain --probe-train data/probe_train \
        --probe-test data/probe_test --out runs/ablation --steps 300 --seeds 0
    # several probe tasks, each NAME=TRAIN,TEST (e.g. the real-image benchmark of tools/real_pairs.py)
    python tools/ablate.py --train-shards B/shards/pretrain \
        --probe pneumonia=B/probe/pneumonia/train,B/probe/pneumonia/test \
        --probe bacteria_virus=B/probe/bacteria_virus/train,B/probe/bacteria_virus/test --out runs/realbench \
        --steps 324 --variants clip,mlip --fractions 0.01,0.1,1.0 --probe-seeds 0,1,2,3,4,5,6,7,8,9

Writes OUT/ablation.json, OUT/ablation.md and OUT/ablation.png; each run lives in
OUT/runs/<variant>/seed<k>/. Rerunning the same command continues where it stopped: finished
(variant, seed) runs are skipped, an interrupted training resumes from its last checkpoint.
The logic is in mlip_ds/ablation.py; docs/ablation.md has the measured table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlip_ds.ablation import DEFAULT_VARIANTS, AblationError, Settings, parse_probe_spec, run_all


def _list(s: str, typ, flag: str) -> tuple:
    try:
        out = tuple(typ(x.strip()) for x in s.split(",") if x.strip())
    except ValueError as e:
        raise AblationError(f"{flag}: cannot parse {s!r} ({e})") from e
    if not out:
        raise AblationError(f"{flag}: empty list")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/ablate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-shards", required=True, help="pretraining shard folder (tools/make_shards.py)")
    p.add_argument("--probe-train", default="", help="labelled data the probe trains on (shard folder, CSV, tree)")
    p.add_argument("--probe-test", default="", help="labelled data the probe is scored on")
    p.add_argument("--probe", action="append", default=[], metavar="NAME=TRAIN,TEST",
                   help="a probe task (repeat for several): every encoder is probed on each, with the same "
                        "fractions and seeds; the tables give per task AUC and the paired Δ vs CLIP ± SE. "
                        "With or instead of --probe-train/--probe-test")
    p.add_argument("--out", required=True, help="output folder (rerun with the same one to resume)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps of every variant")
    p.add_argument("--seeds", default="0", help="pretraining seeds, each variant runs once per seed (default 0)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="clip, mlip, +term[+term] (added to CLIP), mlip-term[-term] (removed from MLIP); terms: "
                        "global, divergence, local, category, itm, swap, fn (false-negative fix) "
                        f"(default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (deepspeed --num_gpus; default 2)")
    p.add_argument("--model", default="tiny", help="model config (default tiny)")
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch per rank (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=1, help="data-loader workers per rank (default 1)")
    p.add_argument("--samples-per-epoch", type=int, default=0, help="default: the shards' manifest count")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (resume granularity)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--heads", default="auto", choices=["auto", "tiny", "default"],
                   help="MLIP head sizes: auto/default = the trainer's own (sized to the towers, K from the "
                        "global batch: what --objective mlip gives a user); tiny = the flags of the 2026-11 "
                        "tables (local 64, 128 prototypes, Tucker 16/16/8 -> 64)")
    p.add_argument("--deepspeed-config", default="ds_configs/zero2.json")
    p.add_argument("--fractions", default="0.01,0.1", help="probe label fractions (default 0.01,0.1)")
    p.add_argument("--probe-seeds", default="0,1,2", help="probe subsampling seeds (default 0,1,2)")
    p.add_argument("--probe-workers", type=int, default=1)
    p.add_argument("--no-random-baseline", action="store_true", help="skip the random-init probe row")
    p.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="an extra train.py argument for every variant (repeat; e.g. --train-arg=--lambda-swap "
                        "--train-arg=0.5)")
    return p


def settings_from_args(a: argparse.Namespace) -> Settings:
    return Settings(train_shards=a.train_shards, probe_train=a.probe_train, probe_test=a.probe_test, out=a.out,
                    steps=a.steps, seeds=_list(a.seeds, int, "--seeds"),
                    variants=_list(a.variants, str, "--variants"), ranks=a.ranks, model=a.model,
                    batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps, workers=a.workers,
                    samples_per_epoch=a.samples_per_epoch, save_every=a.save_every, log_every=a.log_every,
                    heads=a.heads, ds_config=a.deepspeed_config, fractions=_list(a.fractions, float, "--fractions"),
                    probe_seeds=_list(a.probe_seeds, int, "--probe-seeds"), probe_workers=a.probe_workers,
                    random_baseline=not a.no_random_baseline, extra_train_args=tuple(a.train_arg),
                    probe_tasks=tuple(parse_probe_spec(x) for x in a.probe))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = settings_from_args(args)
        run_all(s, log=lambda msg: print(msg, flush=True))
    except AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue", file=sys.stderr)
        return 130
    print((Path(args.out) / "ablation.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
