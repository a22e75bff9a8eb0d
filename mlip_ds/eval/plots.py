"""Evaluation plots (PNG, matplotlib's headless Agg backend).

* ``plot_label_efficiency`` mean metric over labels vs the fraction of training labels, one line per
                            encoder (linear_probe and finetune draw it).
* ``plot_roc_curves``       ROC curve per label from scores (zero-shot, fine-tuning, a probe).
* ``plot_embedding_map``    2-D map of image embeddings (t-SNE; UMAP if ``umap-learn`` is
                            installed; PCA) coloured by label.
* ``read_tb_scalars`` + ``plot_training_curves``  training curves from TensorBoard event files
                            (``loss/*``, ``lr``, ``temperature``, ``perf/*``); ``tools/plot_training.py``
                            is the command line.
* ``plot_grounding``        token-to-patch attention heatmaps over the radiograph, one panel per
                            report word (MLIP's ``token_patch_attn`` output: (T, P) over a square
                            patch grid, rows = the report tokens after [CLS]).

CLI (also ``mlip-eval plots ...``): ``python -m mlip_ds.eval.plots roc --scores scores_<model>.npz --out roc.png``
and ``python -m mlip_ds.eval.plots embedding (--model EXPORT --data PATH | --features FILE.npz) --out map.png``.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import math
import os
import sys
from typing import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mlip_ds.eval.common import as_columns, print_path_or_error  # noqa: E402

SPECIAL_TOKENS = {"[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "<s>", "</s>", "<pad>", "<unk>", "<|endoftext|>",
                  "<|startoftext|>"}
PUNCTUATION = set(".,;:!?()[]{}-'\"/")


def _save(fig, path: str, dpi: int = 120) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# label efficiency


def plot_label_efficiency(results_by_encoder: Mapping[str, dict], path: str,
                          title: str = "Linear probe: label efficiency") -> str:
    """Mean metric over labels vs the fraction of training labels, one line per encoder (± std over
    seeds); the probe and fine-tuning both draw it."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    metric = "AUC"
    for name, result in results_by_encoder.items():
        metric = result.get("metric", "auc").upper()
        points = []
        for frac in result["fractions"]:
            key = f"{float(frac):g}"
            s = result["summary"].get(key, {}).get("mean_over_labels", {})
            if s.get("mean") is not None:
                points.append((100 * float(frac), s["mean"], s.get("std") or 0.0))
        if points:
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training labels used (%)")
    ax.set_ylabel(f"mean {metric} over labels")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# ROC curves


def plot_roc_curves(scores, labels, label_names: Sequence[str], path: str, title: str | None = None) -> str:
    """One ROC curve per label (AUC in the legend). ``scores``/``labels`` (N, L); NaN labels are
    masked; a label with one class only is listed as "n/a" and not drawn."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, labels = as_columns(scores, labels)
    if scores.shape != labels.shape or scores.shape[1] != len(label_names):
        raise ValueError(f"scores {scores.shape}, labels {labels.shape} and {len(label_names)} label names disagree")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cmap = plt.get_cmap("tab10" if len(label_names) <= 10 else "tab20")
    skipped = []
    for j, name in enumerate(label_names):
        ok = ~np.isnan(labels[:, j])
        y = labels[ok, j]
        if len(np.unique(y)) < 2:
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(y, scores[ok, j])
        auc = roc_auc_score(y, scores[ok, j])
        ax.plot(fpr, tpr, color=cmap(j % cmap.N), lw=1.5, label=f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="chance (0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC curves")
    if skipped:
        ax.text(0.98, 0.02, "n/a (one class): " + ", ".join(skipped), ha="right", va="bottom", fontsize=7,
                transform=ax.transAxes)
    ax.legend(fontsize=7, loc="lower right" if not skipped else "center right")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# 2-D embedding map


def label_categories(labels, label_names: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
                     normal_label: str = "no_finding") -> list[str]:
    """A colour category per sample: the class name (single-label), else the one positive finding,
    "no finding" (none positive), or "multiple" (two or more)."""
    labels = np.asarray(labels)
    if labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1 and class_names is not None):
        idx = labels.reshape(-1).astype(int)
        names = list(class_names) if class_names is not None else None
        return [names[i] if names else str(i) for i in idx]
    names = list(label_names) if label_names is not None else [str(j) for j in range(labels.shape[1])]
    out = []
    for row in labels:
        pos = [n for n, v in zip(names, row) if v == 1 and n != normal_label]
        out.append("no finding" if not pos else pos[0] if len(pos) == 1 else "multiple")
    return out


def embed_2d(features, method: str = "tsne", seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """(N, D) -> (N, 2) with t-SNE (default), UMAP (needs umap-learn) or PCA."""
    X = np.asarray(features, dtype=np.float32)
    if X.ndim != 2 or len(X) < 3:
        raise ValueError(f"need (N >= 3, D) features, got {X.shape}")
    if method == "pca":
        from sklearn.decomposition import PCA
        return PCA(n_components=2, random_state=seed).fit_transform(X)
    if method == "umap":
        try:
            import umap  # noqa: F401
        except ImportError as exn:
            raise ValueError("method 'umap' needs umap-learn (pip install umap-learn); use 'tsne'") from exn
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(X)
    if method == "tsne":
        from sklearn.manifold import TSNE
        p = perplexity if perplexity is not None else float(min(30.0, max(2.0, (len(X) - 1) / 3)))
        p = min(p, len(X) - 1.0)
        return TSNE(n_components=2, perplexity=p, init="pca", random_state=seed).fit_transform(X)
    raise ValueError(f"method must be 'tsne', 'umap' or 'pca', got {method!r}")


def plot_embedding_map(features, labels, path: str, label_names: Sequence[str] | None = None,
                       class_names: Sequence[str] | None = None, method: str = "tsne", seed: int = 0,
                       max_points: int = 3000, title: str | None = None) -> str:
    """2-D map (t-SNE/UMAP/PCA) of ``features`` (N, D), one colour per ``label_categories`` value.
    At most ``max_points`` samples (a seeded random subset) are drawn."""
    X = np.asarray(features, dtype=np.float32)
    Y = np.asarray(labels)
    if len(X) != len(Y):
        raise ValueError(f"{len(X)} features but {len(Y)} labels")
    if len(X) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(X), max_points, replace=False))
        X, Y = X[keep], Y[keep]
    cats = label_categories(Y, label_names, class_names)
    xy = embed_2d(X, method, seed)
    order = sorted(set(cats), key=lambda c: (c in ("multiple", "no finding"), c))
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for i, c in enumerate(order):
        m = np.array([x == c for x in cats])
        color = "0.75" if c == "no finding" else "0.35" if c == "multiple" else cmap(i % cmap.N)
        ax.scatter(xy[m, 0], xy[m, 1], s=9, alpha=0.8, color=color, label=f"{c} ({int(m.sum())})", linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"Image embeddings ({method.upper() if method != 'tsne' else 't-SNE'}, {len(X)} samples)")
    ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# training curves from TensorBoard


def find_event_files(path: str) -> list[str]:
    """Event files under a run dir (its ``tb/``), a TensorBoard log dir, or one event file."""
    p = str(path)
    if os.path.isfile(p):
        return [p]
    if not os.path.isdir(p):
        raise FileNotFoundError(f"training log path not found: {p}")
    files = sorted(glob.glob(os.path.join(p, "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files (events.out.tfevents.*) under {p}")
    return files


def read_tb_scalars(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} of every scalar in the event files under ``path``. A step written
    twice (a run resumed after a kill) keeps its last value by wall time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: dict[str, dict[int, tuple[float, float]]] = {}
    for f in find_event_files(path):
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            d = events.setdefault(tag, {})
            for e in acc.Scalars(tag):
                if e.step not in d or e.wall_time >= d[e.step][0]:
                    d[e.step] = (e.wall_time, e.value)
    out = {}
    for tag, d in sorted(events.items()):
        steps = np.array(sorted(d), dtype=np.int64)
        out[tag] = (steps, np.array([d[s][1] for s in steps], dtype=np.float64))
    return out


DEFAULT_CURVE_PANELS = ("loss/*", "lr", "temperature", "perf/*")


def _smooth(v: np.ndarray, weight: float) -> np.ndarray:
    if weight <= 0 or len(v) < 2:
        return v
    out, last = np.empty_like(v), v[0]
    for i, x in enumerate(v):
        last = weight * last + (1 - weight) * x
        out[i] = last
    return out


def plot_training_curves(runs: Mapping[str, Mapping[str, tuple]] | Mapping[str, tuple], path: str,
                         panels: Sequence[str] = DEFAULT_CURVE_PANELS, smooth: float = 0.0,
                         title: str | None = None) -> str:
    """Training curves: a panel per pattern group (``loss/*`` all losses in one panel; ``perf/*``
    a panel per tag, their units differ; ``lr``; ``temperature``). ``runs``: {run name: {tag:
    (steps, values)}} (several runs are overlaid) or one run's ``read_tb_scalars`` result.
    ``smooth``: TensorBoard-style exponential smoothing weight in [0, 1) for losses."""
    if runs and all(isinstance(v, tuple) for v in runs.values()):
        runs = {"run": runs}
    tags = sorted({t for r in runs.values() for t in r})
    groups: list[tuple[str, list[str]]] = []
    for pat in panels:
        matched = [t for t in tags if fnmatch.fnmatch(t, pat)]
        if not matched:
            continue
        if pat.startswith("loss"):
            groups.append((pat, matched))
        else:
            groups += [(t, [t]) for t in matched]
    if not groups:
        raise ValueError(f"none of the panels {list(panels)} match the logged tags {tags}")
    n = len(groups)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.2 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    multi = len(runs) > 1
    for ax, (name, group_tags) in zip(axes.flat, groups):
        k = 0
        for ri, (run, scalars) in enumerate(runs.items()):
            for tag in group_tags:
                if tag not in scalars:
                    continue
                steps, values = scalars[tag]
                v = _smooth(np.asarray(values, float), smooth) if tag.startswith("loss") else values
                label = (f"{run}: " if multi else "") + (tag.split("/", 1)[-1] if len(group_tags) > 1 else run)
                ax.plot(steps, v, lw=1.3, color=cmap(k % 10), label=label)
                if smooth > 0 and tag.startswith("loss"):
                    ax.plot(steps, values, lw=0.6, alpha=0.25, color=cmap(k % 10))
                k += 1
        ax.set_title(name.replace("/*", "") if name.endswith("/*") else name, fontsize=10)
        ax.set_xlabel("step")
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(True, alpha=0.3)
        if k > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# token-to-patch grounding heatmaps


def tokens_for_attention(tokenizer, text: str) -> list[str]:
    """Token strings aligned with the rows of MLIP's ``token_patch_attn`` for ``text``: the
    tokenizer's ids after [CLS] (length context_length - 1, padding included)."""
    ids = tokenizer([text])[0].tolist()
    hf = getattr(tokenizer, "tokenizer", tokenizer)
    return list(hf.convert_ids_to_tokens(ids[1:]))


def _grid(p: int) -> tuple[int, bool]:
    """(side, drop_first): P = side^2, or side^2 + 1 with a class token first."""
    side = int(round(math.sqrt(p)))
    if side * side == p:
        return side, False
    side = int(round(math.sqrt(p - 1)))
    if p > 1 and side * side == p - 1:
        return side, True
    raise ValueError(f"{p} patches do not form a square grid (nor a square grid + a class token)")


def _image_array(image) -> np.ndarray:
    """PIL image / (H, W) / (H, W, C) / (C, H, W) array or tensor -> float (H, W) or (H, W, 3) in [0, 1]."""
    try:
        import torch
        if isinstance(image, torch.Tensor):
            image = image.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("L") if hasattr(image, "convert") else image)
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3:
        a = a.mean(-1) if np.allclose(a[..., :1], a, atol=1e-3 * max(1.0, np.abs(a).max())) else a
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    t = torch.as_tensor(m, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def grounding_entries(attn, tokens: Sequence[str], words: Sequence[str] | None = None,
                      token_indices: Sequence[int] | None = None, merge_wordpieces: bool = True,
                      max_tokens: int = 12) -> list[tuple[str, np.ndarray]]:
    """(word, (P,) map) pairs to draw: special tokens, padding and punctuation dropped; WordPiece
    continuations (``##x``) merged into their word (maps averaged); ``words`` keeps the words that
    occur in any of the given words/phrases (case-insensitive); ``token_indices`` picks raw rows."""
    A = np.asarray(attn.detach().float().cpu().numpy() if hasattr(attn, "detach") else attn, dtype=np.float64)
    if A.ndim != 2:
        raise ValueError(f"attention must be (T, P), got shape {A.shape}")
    if len(tokens) != A.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but the attention map has {A.shape[0]} rows")
    if token_indices is not None:
        return [(str(tokens[i]), A[i]) for i in token_indices][:max_tokens]
    entries: list[list] = []
    for tok, row in zip(tokens, A):
        tok = str(tok)
        if tok in SPECIAL_TOKENS or not tok.strip():
            continue
        if merge_wordpieces and tok.startswith("##") and entries:
            entries[-1][0] += tok[2:]
            entries[-1][1].append(row)
            continue
        entries.append([tok, [row]])
    out = [(w, np.mean(rows, axis=0)) for w, rows in entries if w not in PUNCTUATION]
    if words:
        wanted = {x.casefold() for phrase in words for x in str(phrase).replace("-", " ").split()}
        out = [(w, m) for w, m in out if w.casefold() in wanted]
    seen: dict[str, int] = {}
    named = []
    for w, m in out:  # a repeated word gets "#2", "#3", ... (its later mentions)
        seen[w] = seen.get(w, 0) + 1
        named.append((w if seen[w] == 1 else f"{w} #{seen[w]}", m))
    return named[:max_tokens]


def plot_grounding(image, attn, tokens: Sequence[str], path: str, words: Sequence[str] | None = None,
                   token_indices: Sequence[int] | None = None, merge_wordpieces: bool = True, max_tokens: int = 12,
                   cols: int = 4, alpha: float = 0.5, normalize: str = "each", title: str | None = None,
                   cmap: str = "jet") -> str:
    """Token-to-patch attention heatmaps drawn over the radiograph.

    ``image``: the radiograph (PIL, array or tensor, any range; shown in gray). ``attn``: (T, P)
    attention of each report token over the P patches of a square grid (a leading class-token
    column is dropped when P = side^2 + 1), e.g. one row of MLIP's ``token_patch_attn``.
    ``tokens``: the T token strings (``tokens_for_attention``). Panels: the image, the mean map of
    the shown words, then one per word (``grounding_entries``). ``normalize``: "each" stretches
    every map to its own [min, max]; "shared" uses one range for all (compare strengths).
    """
    entries = grounding_entries(attn, tokens, words, token_indices, merge_wordpieces, max_tokens)
    if not entries:
        raise ValueError("no tokens to draw (all special/punctuation, or none of `words` in the report)")
    P = entries[0][1].shape[0]
    side, drop_first = _grid(P)
    img = _image_array(image)
    size = img.shape[:2]
    maps = [(w, _upsample((m[1:] if drop_first else m).reshape(side, side), size)) for w, m in entries]
    mean_map = ("mean of shown words", np.mean([m for _, m in maps], axis=0))
    panels = [("image", None)] + ([mean_map] if len(maps) > 1 else []) + maps
    if normalize not in ("each", "shared"):
        raise ValueError(f"normalize must be 'each' or 'shared', got {normalize!r}")
    lo = min(float(m.min()) for _, m in maps)
    hi = max(float(m.max()) for _, m in maps)
    cols = max(1, min(cols, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.75 * rows), squeeze=False)
    for ax, (name, m) in zip(axes.flat, panels):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        if m is not None:
            a, b = (float(m.min()), float(m.max())) if normalize == "each" else (lo, hi)
            ax.imshow((m - a) / (b - a) if b > a else np.zeros_like(m), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# CLI


def _cmd_roc(args) -> str:
    if not os.path.isfile(args.scores):
        raise FileNotFoundError(f"--scores not found: {args.scores}")
    z = np.load(args.scores, allow_pickle=False)
    key = next((k for k in (f"logits_{args.mode}", f"scores_{args.mode}", "logits", "scores") if k in z), "scores")
    if key not in z:
        raise ValueError(f"{args.scores} holds no '{key}' array (has {list(z.keys())})")
    names = [str(x) for x in z["label_names"]]
    scores = z[key]
    if "labels" in z:
        labels = z["labels"]
    else:  # single-label: one-vs-rest per class
        t = z["targets"].astype(int)
        labels = np.stack([(t == i).astype(np.float32) for i in range(len(names))], 1)
    return plot_roc_curves(scores, labels, names, args.out, title=args.title)


def _cmd_embedding(args) -> str:
    if args.features:
        if not os.path.isfile(args.features):
            raise FileNotFoundError(f"--features not found: {args.features}")
        z = np.load(args.features, allow_pickle=False)
        X = z["test_features"] if "test_features" in z else z["features"]
        Y = z["test_labels"] if "test_labels" in z else z["labels"]
        names = [str(x) for x in z["label_names"]]
        return plot_embedding_map(X, Y, args.out, label_names=names, method=args.method, seed=args.seed,
                                  max_points=args.max_points)
    if not (args.model and args.data):
        raise ValueError("give --features FILE.npz, or --model EXPORT_DIR and --data PATH")
    from mlip_ds.eval.datasets import open_labelled_dataset
    from mlip_ds.eval.features import extract_features
    from mlip_ds.eval.zero_shot import ImageEmbedder, eval_transform_for, load_export

    for p in (args.data,):
        if "{" not in p and not os.path.exists(p):
            raise FileNotFoundError(f"--data not found: {p}")
    loaded = load_export(args.model)
    ds = open_labelled_dataset(args.data, transform=eval_transform_for(loaded.preprocess))
    X, Y = extract_features(ImageEmbedder(loaded.model), ds, progress=False)
    return plot_embedding_map(X, Y if ds.class_names is None or ds.task == "multiclass" else Y[:, 0], args.out,
                              label_names=ds.label_names,
                              class_names=ds.class_names if ds.task == "multiclass" else
                              ([c for c in ds.class_names if c != ds.positive_class] + [ds.positive_class]
                               if ds.class_names else None),
                              method=args.method, seed=args.seed, max_points=args.max_points)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlip_ds.eval.plots", description="Evaluation plots (PNG).")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("roc", help="ROC curves from scores_<model>.npz (zero_shot / finetune)")
    r.add_argument("--scores", required=True)
    r.add_argument("--mode", default="negation", help="zero-shot scores: negation (default) or softmax")
    r.add_argument("--title", default=None)
    r.add_argument("--out", required=True)
    e = sub.add_parser("embedding", help="2-D map of image embeddings coloured by label")
    e.add_argument("--features", default=None, help="features_<encoder>.npz of linear_probe --save-features")
    e.add_argument("--model", default=None, help="[NAME=]EXPORT_DIR (joint-space image embeddings)")
    e.add_argument("--data", default=None, help="shard dir / .csv / class-folder tree")
    e.add_argument("--method", default="tsne", choices=["tsne", "umap", "pca"])
    e.add_argument("--max-points", type=int, default=3000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return print_path_or_error(lambda: _cmd_roc(args) if args.cmd == "roc" else _cmd_embedding(args))


if __name__ == "__main__":
    sys.exit(main())
