"""Detection / segmentation transfer of exported encoders at 1% / 10% / 100% of the labels.

``python tools/transfer.py detect|segment --encoder NAME=EXPORT_DIR [--encoder NAME=random:EXPORT_DIR]
--data KIND:PATH [--test-data KIND:PATH] --fractions 0.01,0.1,1.0 --seeds 0,1,2 [--freeze|--finetune]
[--epochs N] --out DIR``

Protocol (what the numbers mean):

* Data: ``--data`` (kinds in ``mlip_ds.downstream.datasets``). The test set is the layout's own
  (Object-CXR ``dev.csv``, a ``split`` column, ``train/``+``test/`` folders), or ``--test-data``, or
  else a seeded split (``--test-fraction``, ``--split-seed``) stratified by lesion presence, so
  images without lesions stay in the test set. ``--max-test N`` evaluates a seeded stratified subset.
  Images are squashed to the encoder's input size (``--image-size``, default the export's).
* Per encoder x fraction x seed: a seeded stratified subset of the training images
  (``round(fraction * n)``, >= 1 image with and without lesions), a fresh head (seeded), the
  encoder frozen (``--freeze``, default, MGCA/MLIP's protocol) or fine-tuned (``--finetune``, its
  lr scaled by ``--encoder-lr-scale``), trained for ``--epochs`` passes (at least ``--min-steps``
  steps, at most ``--max-steps``), no validation-based selection, then scored once on the test set.
  Every seed is trained, also at 100% (the training itself is stochastic).
* Random-init encoders (``NAME=random:EXPORT_DIR``) have the export's architecture with weights
  drawn with ``--random-init-seed`` (the same for every run).
* Detection: mAP over IoU 0.4:0.05:0.75 and AP50 (``detection.evaluate``). Segmentation: per-image
  Dice (table), IoU, Dice on images with lesions, pooled Dice (``segmentation.segmentation_metrics``).
* Summary: mean ± sample std (ddof=1, 0 for one seed) over seeds.

Writes ``<task>.json`` (settings, data counts, every run with its training log and metrics, the
summaries), ``<task>.md`` (printed too) and ``overlays/<task>_<encoder>_<fraction>.png`` (first seed).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
from typing import Sequence

import numpy as np

TASKS = ("detect", "segment")
METRICS = {"detect": (("map", "mAP (IoU 0.4:0.05:0.75)"), ("ap50", "AP50")),
           "segment": (("dice", "Dice (per image)"), ("iou", "IoU (per image)"),
                       ("dice_positive", "Dice on images with lesions"), ("dice_global", "Dice (pooled pixels)"))}


class TransferError(RuntimeError):
    """A user-facing error (bad path, bad argument); main() prints it and exits 2."""


def fraction_key(f: float) -> str:
    return f"{float(f):g}"


def mean_std(values: Sequence) -> dict:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": None, "std": None, "n_seeds": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n_seeds": len(v)}


def _csv(s: str, typ, what: str) -> list:
    try:
        out = [typ(x.strip()) for x in str(s).split(",") if x.strip()]
    except ValueError as exn:
        raise TransferError(f"{what}: cannot parse {s!r} ({exn})") from None
    if not out:
        raise TransferError(f"{what}: empty list")
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---------------------------------------------------------------------------------------------
# data


def prepare_data(args) -> dict:
    from mlip_ds.downstream.datasets import DataError, describe, open_data, split_records

    try:
        src = open_data(args.data, finding=args.finding, rle_mode=args.rle)
        notes = list(src.notes)
        if args.test_data:
            test_src = open_data(args.test_data, finding=args.finding, rle_mode=args.rle)
            train, test = src.train, test_src.train + (test_src.test or [])
            notes += test_src.notes
            if src.test:
                notes.append(f"--data's own test split ({len(src.test)} images) is not used: --test-data is given")
            how = f"--test-data {args.test_data}"
        elif src.test is not None:
            train, test, how = src.train, src.test, "the layout's test split"
        else:
            train, test = split_records(src.train, args.test_fraction, args.split_seed)
            how = (f"seeded split ({args.test_fraction:g} of the images, split seed {args.split_seed}, "
                   "stratified by lesion)")
    except DataError as exn:
        raise TransferError(str(exn)) from None
    if args.max_test and len(test) > args.max_test:
        from mlip_ds.downstream.datasets import fraction_indices

        idx = fraction_indices(test, args.max_test / len(test), args.split_seed)
        test = [test[i] for i in idx]
        how += f"; evaluated on a stratified subset of {len(test)} (--max-test)"
    if not train or not test:
        raise TransferError(f"need training and test images, got {len(train)} / {len(test)}")
    if not any(r.positive for r in train):
        raise TransferError("no training image has a lesion: nothing to learn")
    if not any(r.positive for r in test):
        raise TransferError("no test image has a lesion: the metrics are undefined")
    return {"kind": src.kind, "class_names": src.class_names, "train": train, "test": test, "test_from": how,
            "notes": notes, "train_counts": describe(train), "test_counts": describe(test)}


# ---------------------------------------------------------------------------------------------
# one run


def build_task_model(task: str, encoder, image_size: int, num_classes: int, args):
    if task == "detect":
        from mlip_ds.downstream.detection import build_detector

        model = build_detector(encoder, image_size, num_classes, detector=args.detector, anchor_sizes=args.anchor_sizes,
                               fpn_channels=args.fpn_channels, box_head_dim=args.box_head_dim)
        if args.detector == "faster_rcnn":
            model.roi_heads.fg_bg_sampler.batch_size_per_image = args.roi_batch
        return model
    from mlip_ds.downstream.segmentation import SegmentationModel

    return SegmentationModel(encoder, args.decoder_channels)


def run_one(task, visual, pre, image_size, data, train_ds, test_ds, gts, idx, seed, args, device):
    import torch

    from mlip_ds.downstream.backbones import build_encoder
    from mlip_ds.downstream.datasets import collate
    from mlip_ds.downstream.engine import fit

    torch.manual_seed(seed)
    encoder = build_encoder(copy.deepcopy(visual), freeze=not args.finetune, preprocess=pre)
    model = build_task_model(task, encoder, image_size, len(data["class_names"]), args)
    if task == "detect":
        from mlip_ds.downstream.detection import detection_loss as loss_fn
    else:
        from mlip_ds.downstream.segmentation import segmentation_loss as loss_fn
    sub = torch.utils.data.Subset(train_ds, [int(i) for i in idx])
    log = fit(model, sub, loss_fn, encoder=encoder, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
              weight_decay=args.weight_decay, encoder_lr_scale=args.encoder_lr_scale, min_steps=args.min_steps,
              max_steps=args.max_steps, seed=seed, device=device, workers=args.workers, collate_fn=collate,
              progress=not args.no_progress, desc=f"{task} seed {seed}")
    t0 = time.time()
    if task == "detect":
        from mlip_ds.downstream.detection import evaluate, predict

        preds = predict(model, test_ds, batch_size=max(args.batch_size, 16), device=device)
        metrics = evaluate(preds, gts)
    else:
        from mlip_ds.downstream.segmentation import predict, segmentation_metrics

        preds = predict(model, test_ds, batch_size=max(args.batch_size, 16), device=device)
        metrics = segmentation_metrics(preds, gts, threshold=args.threshold)
    metrics["eval_seconds"] = round(time.time() - t0, 2)
    extra = {"anchor_sizes": getattr(model, "anchor_sizes", None), "strides": getattr(model, "strides", None),
             "head": getattr(model, "head_name", None) or args.detector,
             "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad))}
    del model, encoder
    return log, metrics, preds, extra


# ---------------------------------------------------------------------------------------------
# reports


def _fmt(ms: dict | None, digits: int) -> str:
    if not ms or ms.get("mean") is None:
        return "n/a"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def format_markdown(report: dict, digits: int = 3) -> str:
    task = report["task"]
    s = report["settings"]
    encs = list(report["encoders"])
    heads = {e: f"{report['encoders'][e]['kind']}"
                + (f" + {report['encoders'][e]['runs'][0]['model']['head']}" if report["encoders"][e]["runs"] else "")
             for e in encs}
    if task == "detect":
        head = "Faster R-CNN" if s.get("detector") == "faster_rcnn" else "RetinaNet"
    else:
        head = "U-Net / SETR-PUP"
    encs = list(report["encoders"])
    fracs = report["fractions"]
    n_seeds = sorted({len(report["seeds"])})
    d = report["data"]
    lines = [f"**{'Detection' if task == 'detect' else 'Segmentation'} transfer** ({head} over a "
             f"{'fine-tuned' if s['finetune'] else 'frozen'} encoder; data {s['data']}"
             + (f", finding {s['finding']}" if d["kind"] == "synthetic" else "") + f"): mean ± std over "
             f"{'/'.join(map(str, n_seeds))} seed(s); columns = fraction of the {d['train_counts']['images']} "
             f"training images ({d['train_counts']['positive']} with lesions) whose labels are used. "
             f"Test: {d['test_counts']['images']} images ({d['test_counts']['positive']} with lesions), "
             f"{d['test_from']}.", ""]
    for key, title in METRICS[task]:
        lines.append(f"{title}")
        lines.append("")
        lines.append("| encoder | " + " | ".join(f"{f * 100:g}% labels" for f in fracs) + " |")
        lines.append("|---|" + "---:|" * len(fracs))
        for e in encs:
            summ = report["encoders"][e]["summary"]
            lines.append(f"| {e} | " + " | ".join(_fmt(summ[fraction_key(f)].get(key), digits) for f in fracs) + " |")
        lines.append("")
    sizes = []
    for f in fracs:
        runs = [r for e in encs for r in report["encoders"][e]["runs"] if r["fraction"] == f]
        if runs:
            sizes.append(f"{f * 100:g}%: {runs[0]['n_train']} images ({runs[0]['n_train_positive']} with lesions), "
                         f"{runs[0]['train']['steps']} steps")
    lines.append("Training sets: " + "; ".join(sizes) + ".")
    rnd = {e: " (random init)" if report["encoders"][e]["random_init"] else "" for e in encs}
    lines.append("Encoders: " + "; ".join(f"{e}: {heads[e]}{rnd[e]}" for e in encs) + ".")
    if report.get("notes"):
        lines.append("")
        lines.append("Notes:")
        lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _clean(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    return o


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/transfer.py",
        description="Detection / segmentation transfer of exported image encoders at several label fractions.")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--encoder", action="append", required=True, metavar="NAME=[random:]EXPORT_DIR",
                   help="an encoder (repeatable); 'random:' = the export's architecture, random weights")
    p.add_argument("--data", required=True, metavar="KIND:PATH",
                   help="rsna | object-cxr | boxes-csv | siim | mask-folder | synthetic, ':' and a path")
    p.add_argument("--test-data", default=None, metavar="KIND:PATH", help="a separate test set (else the "
                   "layout's own test split, else a seeded split of --data)")
    p.add_argument("--test-fraction", type=float, default=0.15, help="test share of the seeded split (default 0.15)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--max-test", type=int, default=None, help="evaluate on a stratified subset of N test images")
    p.add_argument("--finding", default="any", help="synthetic data: a finding name or 'any' (default)")
    p.add_argument("--rle", default="relative", choices=["relative", "standard"],
                   help="SIIM RLE flavour: relative offsets (train-rle.csv, default) or 1-based absolute starts")
    p.add_argument("--fractions", default="0.01,0.1,1.0")
    p.add_argument("--seeds", default="0,1,2")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--freeze", dest="finetune", action="store_false", help="freeze the encoder (default)")
    g.add_argument("--finetune", dest="finetune", action="store_true", help="fine-tune the encoder too")
    p.set_defaults(finetune=False)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--min-steps", type=int, default=0, help="train at least this many steps (small fractions)")
    p.add_argument("--max-steps", type=int, default=None, help="train at most this many steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4, help="head learning rate (AdamW, cosine; default 5e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--encoder-lr-scale", type=float, default=0.1, help="--finetune: encoder lr = lr x this")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the export's)")
    p.add_argument("--detector", default="faster_rcnn", choices=["faster_rcnn", "retinanet"])
    p.add_argument("--anchor-sizes", default=None, help="one anchor size (px) per pyramid level, fine to coarse "
                   "(default 8 x stride x image_size / 256)")
    p.add_argument("--fpn-channels", type=int, default=256)
    p.add_argument("--box-head-dim", type=int, default=1024, help="Faster R-CNN box head width")
    p.add_argument("--roi-batch", type=int, default=128, help="Faster R-CNN RoIs sampled per image in training")
    p.add_argument("--decoder-channels", type=int, default=None,
                   help="segmentation: SETR-PUP width / first U-Net width, halved per block (default 256)")
    p.add_argument("--threshold", type=float, default=0.5, help="segmentation: probability threshold")
    p.add_argument("--num-overlays", type=int, default=6, help="test images per overlay PNG (0: none)")
    p.add_argument("--overlay-score", type=float, default=0.5, help="detection overlays: boxes with this score")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="decode images every time (low memory)")
    p.add_argument("--random-init-seed", type=int, default=0)
    p.add_argument("--out", default="runs/transfer")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--no-progress", action="store_true")
    return p


def run_cli(args) -> tuple[dict, str]:
    import torch

    from mlip_ds.downstream.backbones import BackboneError, load_visual, tower_kind
    from mlip_ds.downstream.datasets import TransferDataset, describe, fraction_indices
    from mlip_ds.downstream.engine import TrainingError, resolve_device
    from mlip_ds.eval.common import EvalError, parse_encoder_spec

    task = args.task
    try:
        encoders = [parse_encoder_spec(s) for s in args.encoder]
    except EvalError as exn:
        raise TransferError(str(exn)) from None
    names = [e[0] for e in encoders]
    if len(set(names)) != len(names):
        raise TransferError(f"duplicate encoder names: {names}")
    for name, path, _ in encoders:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise TransferError(f"export dir of encoder '{name}' not found or not an export: {path}")
    fractions = _csv(args.fractions, float, "--fractions")
    if any(not 0 < f <= 1 for f in fractions):
        raise TransferError(f"--fractions must be in (0, 1], got {fractions}")
    seeds = _csv(args.seeds, int, "--seeds")
    args.anchor_sizes = _csv(args.anchor_sizes, float, "--anchor-sizes") if args.anchor_sizes else None
    if args.finding != "any":
        from mlip_ds.data.schema import FINDINGS
        if args.finding not in FINDINGS:
            raise TransferError(f"--finding must be 'any' or one of {list(FINDINGS)}")
    device = resolve_device(args.device)
    data = prepare_data(args)
    os.makedirs(os.path.join(args.out, "overlays"), exist_ok=True)
    print(f"[transfer] {task}: {data['train_counts']} train, {data['test_counts']} test ({data['test_from']})",
          file=sys.stderr)

    datasets: dict = {}
    report = {"task": task, "fractions": fractions, "seeds": seeds, "data": {
        k: data[k] for k in ("kind", "class_names", "train_counts", "test_counts", "test_from")},
        "settings": {k: v for k, v in vars(args).items() if k not in ("encoder",)}, "encoders": {},
        "notes": list(data["notes"]), "overlays": []}
    report["settings"]["device"] = str(device)
    train_pos = [r.positive for r in data["train"]]
    test_pos = [r.positive for r in data["test"]]
    t_start = time.time()
    for name, path, random_init in encoders:
        try:
            visual, pre = load_visual(path, random_init=random_init, seed=args.random_init_seed)
            kind = tower_kind(visual)
        except (FileNotFoundError, BackboneError, KeyError) as exn:
            raise TransferError(f"cannot load encoder '{name}' from {path}: {exn}") from None
        image_size = int(args.image_size or pre.get("image_size") or 224)
        if kind == "vit":
            p = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
            if image_size % int(p):
                raise TransferError(f"--image-size {image_size} is not a multiple of the ViT patch size {p}")
        if image_size not in datasets:
            tr = TransferDataset(data["train"], task, image_size, cache=not args.no_cache)
            te = TransferDataset(data["test"], task, image_size, cache=not args.no_cache)
            if task == "detect":
                from mlip_ds.downstream.detection import ground_truth
            else:
                from mlip_ds.downstream.segmentation import ground_truth
            datasets[image_size] = (tr, te, ground_truth(te))
        train_ds, test_ds, gts = datasets[image_size]
        print(f"[transfer] encoder '{name}': {kind}, {'random init, architecture of ' if random_init else ''}{path}, "
              f"{image_size} px, {'fine-tuned' if args.finetune else 'frozen'}", file=sys.stderr)
        runs = []
        examples = pick_examples_for(test_pos, args.num_overlays)
        for f in fractions:
            for seed in seeds:
                idx = fraction_indices(data["train"], f, seed)
                try:
                    log, metrics, preds, extra = run_one(task, visual, pre, image_size, data, train_ds, test_ds, gts,
                                                         idx, seed, args, device)
                except (BackboneError, TrainingError, ValueError) as exn:
                    raise TransferError(f"encoder '{name}', fraction {f:g}, seed {seed}: {exn}") from None
                sub = [data["train"][i] for i in idx]
                run = {"fraction": f, "seed": seed, "n_train": len(idx),
                       "n_train_positive": int(sum(train_pos[i] for i in idx)), "train_counts": describe(sub),
                       "train": log, "metrics": metrics, "model": extra}
                runs.append(run)
                key = METRICS[task][0][0]
                print(f"[transfer]   {name} {f * 100:g}% seed {seed}: {key} {metrics.get(key)} "
                      f"({log['steps']} steps, loss {log['loss_first']} -> {log['loss_last']}, {log['seconds']} s)",
                      file=sys.stderr)
                if seed == seeds[0] and examples:
                    report["overlays"].append(write_overlay(task, args, name, f, seed, test_ds, gts, preds, examples))
        summary = {}
        for f in fractions:
            rs = [r for r in runs if r["fraction"] == f]
            summary[fraction_key(f)] = {k: mean_std([r["metrics"].get(k) for r in rs]) for k, _ in METRICS[task]}
            if task == "segment":
                summary[fraction_key(f)]["iou_global"] = mean_std([r["metrics"].get("iou_global") for r in rs])
        report["encoders"][name] = {"export_dir": path, "random_init": random_init, "kind": kind,
                                    "random_init_seed": args.random_init_seed if random_init else None,
                                    "image_size": image_size, "preprocess": pre, "runs": runs, "summary": summary}
        del visual
    report["seconds"] = round(time.time() - t_start, 1)
    md = format_markdown(report, args.digits)
    with open(os.path.join(args.out, f"{task}.json"), "w") as fh:
        json.dump(_clean(report), fh, indent=2, default=str)
    with open(os.path.join(args.out, f"{task}.md"), "w") as fh:
        fh.write(md)
    return report, md


def pick_examples_for(test_pos, k):
    from mlip_ds.downstream.plots import pick_examples

    return pick_examples(test_pos, k) if k and k > 0 else []


def write_overlay(task, args, name, f, seed, test_ds, gts, preds, examples) -> str:
    from mlip_ds.downstream import plots

    path = os.path.join(args.out, "overlays", f"{task}_{_safe(name)}_{fraction_key(f)}.png")
    items = [test_ds[i] for i in examples]
    images = [it["image"][0].numpy() for it in items]
    ids = [it["id"] for it in items]
    title = f"{name}, {f * 100:g}% labels, seed {seed}"
    if task == "detect":
        plots.detection_overlay(path, images, [gts[i] for i in examples], [preds[i] for i in examples], ids, title,
                                score_thresh=args.overlay_score)
    else:
        plots.segmentation_overlay(path, images, [gts[i] for i in examples], [preds[i] for i in examples], ids, title,
                                   threshold=args.threshold)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report, md = run_cli(args)
    except TransferError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(md)
    print(f"[transfer] wrote {os.path.join(args.out, args.task + '.json')}, {args.task}.md and "
          f"{len(report['overlays'])} overlay PNG(s) in {args.out} ({report['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
