"""Full fine-tuning of the image encoder on a labelled set (the reference the linear probe is read against).

Protocol (what the numbers mean):

* Model: the export's image tower (pre-projection features for ViTs, as in the probe) + one
  linear head (one logit per label; one per class for a multi-class folder tree), all parameters
  trained. A ``random:`` encoder trains the same architecture from random weights.
* Optimiser: AdamW (``--lr`` for the encoder, ``--head-lr`` for the head, ``--weight-decay`` on
  matrices only), linear warm-up over the first 10% of steps, then cosine decay to 0. Steps =
  max(``--epochs`` x ceil(n_subsample / batch), ``--min-steps``), so the 1% runs still take a
  few steps. Loss: binary cross-entropy per label (masked labels left out) or cross-entropy.
  No early stopping, no validation split: a fixed schedule, the last weights are tested.
* Images are decoded once, resized (short side) and centre-cropped to the export's image size and
  kept in memory as uint8 (N x S x S bytes: 224 px is 50 KB an image). Training augmentation:
  random resized crop (scale 0.6-1), small affine, brightness/contrast jitter (``--no-augment``
  turns it off); testing: none.
* Fractions: 100% uses every training sample; a smaller fraction draws ``round(f x N)`` samples
  (seeded). Multi-label: a label left without a positive (or negative) gets one drawn in (noted);
  single-label: stratified as in the probe, at least one sample per class. Every (fraction, seed)
  pair is trained from the export's weights, 100% included (the seed also changes the head's
  init, the order and the augmentation, so 100% has a real std, unlike the probe's).
* Metric, summary and files follow the linear probe: ROC AUC per label and their mean (accuracy
  for a multi-class tree), mean ± std over seeds; ``finetune.json`` (every run, its loss curve and
  hyperparameters), ``finetune.md``, ``finetune.png`` (label efficiency), and the test scores of
  the first seed at the largest fraction (``scores_<encoder>.npz``: ``scores`` (sigmoid/softmax),
  ``logits`` (what the metrics use), ``labels`` or ``targets``; ``roc_<encoder>.png``).

CLI: ``python -m mlip_ds.eval.finetune --encoder NAME=EXPORT_DIR --train-data PATH --test-data PATH
[...]`` (``--help``). Missing inputs exit with code 2 and the path named.
``--save-classifier DIR`` also keeps one calibrated classifier (one more run on the training data
minus a calibration split; ``mlip_ds/eval/classifier.py``) that ``python -m mlip_ds.eval.predict`` runs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mlip_ds.eval.common import (DEFAULT_FRACTIONS, DEFAULT_SEEDS, EvalError, add_labelled_data_args,
                                 eval_main, fraction_count, fraction_key, mean_std, parse_labelled_data_args,
                                 stratified_subsample, write_json_and_markdown)
from mlip_ds.eval.linear_probe import format_markdown
from mlip_ds.eval.zero_shot import safe_name


# ---------------------------------------------------------------------------------------------
# data in memory


def cache_transform(image_size: int):
    """PIL radiograph -> uint8 (1, S, S): resize the short side, centre crop (no normalisation)."""
    from torchvision import transforms as T

    return T.Compose([T.Grayscale(num_output_channels=1), T.Resize(image_size, antialias=True),
                      T.CenterCrop(image_size), T.PILToTensor()])


def load_into_memory(dataset, batch_size: int = 64, workers: int = 0, progress: bool = False):
    """-> (images uint8 (N, 1, S, S), labels float32 (N, L), skipped list) of a labelled dataset."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from mlip_ds.eval.datasets import Skipped, collate_labelled

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_labelled)
    images, labels, skipped = [], [], []
    with tqdm(desc="loading images", unit="img", disable=not progress, leave=False) as bar:
        for x, y, sk in loader:
            skipped += [s for s in sk if isinstance(s, Skipped)]
            if x is not None:
                images.append(x)
                labels.append(y)
                bar.update(len(x))
    if not images:
        where = getattr(dataset, "spec", None) or getattr(dataset, "csv_path", None) or getattr(dataset, "root", "")
        raise EvalError(f"no readable samples in {where} ({len(skipped)} skipped as corrupt)")
    return torch.cat(images).to(torch.uint8), torch.cat(labels).float(), skipped


class Augment:
    """Per-sample train augmentation on uint8 (1, S, S) tensors (the pretraining recipe's, milder)."""

    def __init__(self, image_size: int, scale=(0.6, 1.0)):
        from torchvision import transforms as T

        self.t = T.Compose([T.RandomResizedCrop(image_size, scale=scale, ratio=(0.9, 1.1), antialias=True),
                            T.RandomAffine(degrees=5, translate=(0.03, 0.03)),
                            T.ColorJitter(brightness=0.2, contrast=0.2)])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.t(x) for x in batch])


def _mean_std_of(preprocess: dict):
    from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD

    return tuple(preprocess.get("mean") or CLIP_MEAN), tuple(preprocess.get("std") or CLIP_STD)


def to_input(batch_u8: torch.Tensor, mean, std, device) -> torch.Tensor:
    """uint8 (B, 1, S, S) -> normalised float (B, 3, S, S) on ``device``."""
    x = batch_u8.to(device).float().div_(255.0).expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------------------------------------
# subsampling


def subsample(labels: np.ndarray, fraction: float, seed: int, task: str) -> tuple[np.ndarray, str | None]:
    """Training indices for one (fraction, seed) (see the module docstring); (indices, note)."""
    y = np.asarray(labels)
    n = len(y)
    if fraction >= 1.0:
        return np.arange(n), None
    if task == "multiclass" or (task == "binary_single" and y.shape[1] == 1):
        idx, note = stratified_subsample(y[:, 0].astype(np.int64), fraction, seed)
        if idx is None:
            idx, note = np.sort(np.random.default_rng(seed).choice(n, max(1, fraction_count(fraction, n)),
                                                                   replace=False)), note
        return idx, note
    rng = np.random.default_rng(seed)
    k = max(1, fraction_count(fraction, n))
    idx = set(rng.choice(n, k, replace=False).tolist())
    added = []
    for j in range(y.shape[1]):
        col = y[:, j]
        for value in (1.0, 0.0):
            have = [i for i in idx if col[i] == value]
            pool = np.flatnonzero(col == value)
            if not have and len(pool):
                idx.add(int(rng.choice(pool)))
                added.append(j)
    note = None
    if added:
        note = (f"{fraction_key(fraction)} of {n} = {k} sample(s); {len(set(added))} label(s) got one "
                "positive/negative drawn in")
    return np.array(sorted(idx)), note


# ---------------------------------------------------------------------------------------------
# one run


class FineTuneModel(nn.Module):
    def __init__(self, encoder: nn.Module, feature_dim: int, num_outputs: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_outputs)

    def forward(self, x):
        f = self.encoder(x)
        if isinstance(f, (tuple, list)):
            f = f[0]
        return self.head(f.float())


def _lr_lambda(total: int, warmup: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))
    return f


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mask = ~torch.isnan(y)
    if not mask.any():
        return logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits[mask], y[mask])


def train_one(encoder: nn.Module, preprocess: dict, X: torch.Tensor, Y: torch.Tensor, multiclass: bool,
              num_outputs: int, epochs: int = 10, min_steps: int = 100, batch_size: int = 32, lr: float = 1e-4,
              head_lr: float = 1e-3, weight_decay: float = 0.05, augment: bool = True, seed: int = 0,
              device="cpu", max_steps: int | None = None, amp: bool = False, progress: bool = False) -> dict:
    """Fine-tune ``encoder`` + a new linear head on (X uint8, Y); returns {"model", "losses", "steps"}."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    mean, std = _mean_std_of(preprocess)
    size = int(preprocess["image_size"])
    encoder.to(device).eval()
    with torch.no_grad():
        dim = encoder(to_input(X[:1], mean, std, device))
        dim = (dim[0] if isinstance(dim, (tuple, list)) else dim).shape[-1]
    model = FineTuneModel(encoder, int(dim), num_outputs).to(device)
    decay = [p for n, p in model.encoder.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.encoder.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": [model.head.weight], "lr": head_lr, "weight_decay": weight_decay},
        {"params": [model.head.bias], "lr": head_lr, "weight_decay": 0.0}])
    n = len(X)
    per_epoch = math.ceil(n / batch_size)
    total = max(epochs * per_epoch, min_steps)
    if max_steps:
        total = min(total, max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, total // 10)))
    aug = Augment(size) if augment else None
    losses = []
    order = np.array([], dtype=np.int64)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    with tqdm(total=total, desc="fine-tune", unit="step", disable=not progress, leave=False) as bar:
        for step in range(total):
            if len(order) < min(batch_size, n):
                order = np.concatenate([order, rng.permutation(n)])
            idx, order = order[:batch_size], order[batch_size:]
            xb = X[idx]
            if aug is not None:
                xb = aug(xb)
            xb = to_input(xb, mean, std, device)
            yb = Y[idx].to(device)
            with autocast:
                logits = model(xb).float()
            loss = (nn.functional.cross_entropy(logits, yb[:, 0].long()) if multiclass else masked_bce(logits, yb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
    model.eval()
    return {"model": model, "losses": losses, "steps": total, "feature_dim": int(dim)}


@torch.no_grad()
def predict(model: nn.Module, X: torch.Tensor, preprocess: dict, multiclass: bool, batch_size: int = 128,
            device="cpu") -> np.ndarray:
    """Logits (N, outputs), float64: per label, or log-softmax over classes (metrics use these;
    ``probabilities`` turns them into sigmoid / softmax scores)."""
    model.eval().to(device)
    out = []
    for i in range(0, len(X), batch_size):
        logits = model(to_input(X[i:i + batch_size], *_mean_std_of(preprocess), device)).double()
        out.append((logits.log_softmax(-1) if multiclass else logits).cpu().numpy())
    return np.concatenate(out, 0)


def probabilities(logits: np.ndarray, multiclass: bool) -> np.ndarray:
    from scipy.special import expit

    return np.exp(logits) if multiclass else expit(logits)


def score_metrics(scores: np.ndarray, Y: np.ndarray, label_names: Sequence[str], multiclass: bool) -> dict:
    """{label: AUC or None} (binary labels), or {"class": accuracy} (multi-class)."""
    from sklearn.metrics import roc_auc_score

    if multiclass:
        return {label_names[0]: float((scores.argmax(1) == Y[:, 0].astype(np.int64)).mean())}
    out = {}
    for j, name in enumerate(label_names):
        ok = ~np.isnan(Y[:, j])
        y = Y[ok, j]
        out[name] = float(roc_auc_score(y, scores[ok, j])) if len(np.unique(y)) == 2 else None
    return out


# ---------------------------------------------------------------------------------------------
# the sweep over fractions x seeds


def run_finetune(export_dir: str, Xtr: torch.Tensor, Ytr: torch.Tensor, Xte: torch.Tensor, Yte: torch.Tensor,
                 label_names: Sequence[str], task: str = "binary", class_names: Sequence[str] | None = None,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, seeds: Sequence[int] = DEFAULT_SEEDS,
                 random_init: bool = False, random_init_seed: int = 0, device="cpu", progress: bool = False,
                 single_label_binary: bool = False, **train_kw) -> tuple[dict, dict]:
    """Fine-tune at every (fraction, seed); returns (a ``run_probe``-shaped result, test score arrays
    of the first seed at the largest fraction)."""
    from mlip_ds.export import load_image_encoder

    t0 = time.time()
    multiclass = task == "multiclass"
    label_names = list(label_names)[:1] if multiclass else list(label_names)
    num_outputs = len(class_names) if multiclass else len(label_names)
    Ytr_np, Yte_np = Ytr.numpy(), Yte.numpy()
    rows, runs, notes = [], [], []
    best_arrays = None
    fractions = [float(f) for f in fractions]
    for f in fractions:
        for seed in seeds:
            idx, sub_note = subsample(Ytr_np, f, seed, "multiclass" if multiclass else
                                      ("binary_single" if single_label_binary else "multilabel"))
            if sub_note and sub_note not in notes:
                notes.append(sub_note)
            encoder, pre = load_image_encoder(export_dir, random_init=random_init, seed=random_init_seed)
            t1 = time.time()
            out = train_one(encoder, pre, Xtr[idx], Ytr[idx], multiclass, num_outputs, seed=seed, device=device,
                            progress=progress, **train_kw)
            scores = predict(out["model"], Xte, pre, multiclass, device=device)
            metrics = score_metrics(scores, Yte_np, label_names, multiclass)
            losses = out["losses"]
            w = max(1, min(5, len(losses) // 4))
            runs.append({"fraction": f, "seed": seed, "n_train": int(len(idx)), "steps": out["steps"],
                         "loss_start": float(np.mean(losses[:w])), "loss_end": float(np.mean(losses[-w:])),
                         "losses": [round(x, 5) for x in losses], "seconds": round(time.time() - t1, 2),
                         "note": sub_note})
            for name in label_names:
                m = metrics.get(name)
                rows.append({"fraction": f, "seed": seed, "label": name, "metric": m, "n_train": int(len(idx)),
                             "note": sub_note if m is not None else "test or training labels hold one class"})
            if f == max(fractions) and seed == seeds[0]:
                best_arrays = {"scores": probabilities(scores, multiclass), "logits": scores, "label_names": np.array(
                    list(class_names) if multiclass else label_names)}
                if multiclass:
                    best_arrays["targets"] = Yte_np[:, 0].astype(np.int64)
                else:
                    best_arrays["labels"] = Yte_np
            del out, encoder
    for name in label_names:
        if all(r["metric"] is None for r in rows if r["label"] == name):
            notes.append(f"{name}: n/a at every fraction (one class in the test or training labels)")
    summary = {}
    for f in fractions:
        fk = fraction_key(f)
        per_label = {n: mean_std([r["metric"] for r in rows if r["fraction"] == f and r["label"] == n])
                     for n in label_names}
        per_seed_means, n_used = [], []
        for s in seeds:
            vals = [r["metric"] for r in rows if r["fraction"] == f and r["seed"] == s and r["metric"] is not None]
            per_seed_means.append(float(np.mean(vals)) if vals else None)
            n_used.append(len(vals))
        mean = mean_std(per_seed_means)
        mean["n_labels"] = n_used
        summary[fk] = {"per_label": per_label, "mean_over_labels": mean}
    result = {
        "task": task, "metric": "accuracy" if multiclass else "auc", "label_names": label_names,
        "class_names": list(class_names) if class_names is not None else None,
        "fractions": fractions, "seeds": [int(s) for s in seeds],
        "n_train": int(len(Xtr)), "n_test": int(len(Xte)),
        "train_positives": ({n: int(np.nansum(Ytr_np[:, j] == 1)) for j, n in enumerate(label_names)}
                            if not multiclass else None),
        "test_positives": ({n: int(np.nansum(Yte_np[:, j] == 1)) for j, n in enumerate(label_names)}
                           if not multiclass else None),
        "per_seed": rows, "runs": runs, "summary": summary, "notes": notes,
        "hyperparameters": {k: v for k, v in train_kw.items()}, "seconds": round(time.time() - t0, 2),
    }
    return result, best_arrays


def write_reports(results_by_encoder: dict, out_dir: str, extra: dict | None = None, digits: int = 3):
    """finetune.json + finetune.md (the probe's table, titled "Full fine-tuning")."""
    md = format_markdown(results_by_encoder, digits=digits, title="Full fine-tuning")
    payload = dict(extra or {})
    payload["encoders"] = results_by_encoder
    json_path, md_path = write_json_and_markdown(out_dir, "finetune", payload, md)
    return json_path, md_path, md


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlip_ds.eval.finetune",
        description="Full fine-tuning of exported image encoders (linear head + unfrozen encoder) at "
                    "1/10/100%% of the training labels; the reference for the linear probe.")
    add_labelled_data_args(p, "fine-tune")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--min-steps", type=int, default=100, help="at least this many steps per run (small fractions)")
    p.add_argument("--max-steps", type=int, default=0, help="at most this many steps per run (0 = no cap)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4, help="encoder learning rate")
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for decoding the images once")
    p.add_argument("--device", default="auto")
    p.add_argument("--random-init-seed", type=int, default=0)
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--no-progress", action="store_true")
    from mlip_ds.eval.classifier import add_classifier_args
    add_classifier_args(p)
    return p


def run_cli(args):
    from mlip_ds.eval.datasets import DataPathError, open_labelled_dataset
    from mlip_ds.eval.zero_shot import resolve_device
    from mlip_ds.export import read_export_config

    encoders, fractions, seeds, labels = parse_labelled_data_args(args)
    for name, path, _ in encoders:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise EvalError(f"export dir of encoder '{name}' not found or not an export (no config.json): {path}")
    device = resolve_device(args.device)
    from mlip_ds.eval.classifier import check_classifier_args
    check_classifier_args(args, EvalError)
    train_kw = dict(epochs=args.epochs, min_steps=args.min_steps, batch_size=args.batch_size, lr=args.lr,
                    head_lr=args.head_lr, weight_decay=args.weight_decay, augment=not args.no_augment,
                    max_steps=args.max_steps or None, amp=args.amp)
    cache: dict[int, tuple] = {}
    results, arrays = {}, {}
    for name, path, random_init in encoders:
        size = int(read_export_config(path)["preprocess"]["image_size"])
        if size not in cache:
            try:
                tr = open_labelled_dataset(args.train_data, cache_transform(size), labels, args.uncertain,
                                           args.missing, args.train_split)
                te = open_labelled_dataset(args.test_data, cache_transform(size),
                                           tr.label_names if tr.class_names is None else None, args.uncertain,
                                           args.missing, args.test_split, class_names=tr.class_names)
            except (DataPathError, ValueError) as exn:
                raise EvalError(str(exn)) from exn
            if te.task != tr.task or list(te.label_names) != list(tr.label_names):
                raise EvalError(f"train and test data disagree: train {tr.task} {tr.label_names}, "
                                f"test {te.task} {te.label_names}")
            Xtr, Ytr, sk_tr = load_into_memory(tr, workers=args.workers, progress=not args.no_progress)
            Xte, Yte, sk_te = load_into_memory(te, workers=args.workers, progress=not args.no_progress)
            cache[size] = (tr, Xtr, Ytr, Xte, Yte, sk_tr, sk_te)
        tr, Xtr, Ytr, Xte, Yte, sk_tr, sk_te = cache[size]
        print(f"[finetune] encoder '{name}': {'random init, architecture of ' if random_init else ''}{path} "
              f"({len(Xtr)} train / {len(Xte)} test images)", file=sys.stderr)
        res, arr = run_finetune(path, Xtr, Ytr, Xte, Yte, tr.label_names, task=tr.task,
                                class_names=tr.class_names if tr.task == "multiclass" else None,
                                fractions=fractions, seeds=seeds, random_init=random_init,
                                random_init_seed=args.random_init_seed, device=device,
                                progress=not args.no_progress, single_label_binary=tr.class_names is not None,
                                **train_kw)
        res["encoder"] = {"export_dir": path, "random_init": random_init, "skipped_train": len(sk_tr),
                          "skipped_test": len(sk_te),
                          "skipped_examples": [s._asdict() for s in (sk_tr + sk_te)[:20]]}
        if sk_tr or sk_te:
            res["notes"].append(f"skipped corrupt samples: {len(sk_tr)} train, {len(sk_te)} test")
        if getattr(args, "save_classifier", None):
            from mlip_ds.eval.classifier import classifier_dir, save_finetune_classifier
            kept = save_finetune_classifier(
                classifier_dir(args.save_classifier, name, len(encoders)), args, export_dir=path, Xtr=Xtr, Ytr=Ytr,
                Xte=Xte, Yte=Yte, label_names=tr.label_names, task=tr.task,
                class_names=tr.class_names if tr.task == "multiclass" else None, random_init=random_init,
                random_init_seed=args.random_init_seed, seed=seeds[0], device=device, train_kw=train_kw)
            res["classifier"] = {k: kept[k] for k in ("path", "thresholds", "notes")}
            print(f"[finetune] encoder '{name}': classifier saved to {kept['path']}\n{kept['markdown']}",
                  file=sys.stderr)
        results[name], arrays[name] = res, arr
    info = {"train_data": args.train_data, "test_data": args.test_data, "uncertain": args.uncertain,
            "missing": args.missing, "fractions": fractions, "seeds": seeds, "device": device, **train_kw}
    json_path, md_path, md = write_reports(results, args.out, info, args.digits)
    for name, arr in arrays.items():
        np.savez_compressed(os.path.join(args.out, f"scores_{safe_name(name)}.npz"), **arr)
    if not args.no_plots:
        from mlip_ds.eval.plots import plot_label_efficiency, plot_roc_curves

        plot_label_efficiency(results, os.path.join(args.out, "finetune.png"),
                              title="Full fine-tuning: label efficiency")
        for name, arr in arrays.items():
            if "labels" in arr:
                plot_roc_curves(arr["logits"], arr["labels"], [str(x) for x in arr["label_names"]],
                                os.path.join(args.out, f"roc_{safe_name(name)}.png"),
                                title=f"Fine-tuned ROC ({name}, {fraction_key(max(fractions))} of labels, "
                                      f"seed {seeds[0]})")
    return results, json_path, md_path, md


def main(argv: Sequence[str] | None = None) -> int:
    return eval_main("finetune", build_parser, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
