"""PNG overlays of predictions vs ground truth for a few test images (matplotlib, Agg)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pick_examples(positive: Sequence[bool], k: int = 6) -> list[int]:
    """Up to ``k`` test indices: images with lesions first (in test order), then one or two without."""
    pos = [i for i, p in enumerate(positive) if p]
    neg = [i for i, p in enumerate(positive) if not p]
    n_neg = min(len(neg), 1 if k <= 4 else 2)
    chosen = pos[: max(0, k - n_neg)]
    chosen += neg[: k - len(chosen)]
    return chosen


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = min(n, 3) or 1
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return plt, fig, list(axes.flat)


def detection_overlay(path: str, images: Sequence[np.ndarray], gts: Sequence[dict], preds: Sequence[dict],
                      ids: Sequence[str], title: str, score_thresh: float = 0.5, max_boxes: int = 5) -> str:
    """Ground truth in green, predictions with score >= ``score_thresh`` (at most ``max_boxes``,
    else the single best one, dashed) in red with their scores."""
    from matplotlib.patches import Rectangle

    plt, fig, axes = _figure(len(images))
    for ax, img, g, p, name in zip(axes, images, gts, preds, ids):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        for b in np.asarray(g["boxes"]).reshape(-1, 4):
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.5))
        s = np.asarray(p["scores"]).reshape(-1)
        order = np.argsort(-s, kind="mergesort")
        keep = [i for i in order if s[i] >= score_thresh][:max_boxes]
        dashed = False
        if not keep and len(order):
            keep, dashed = [order[0]], True
        for i in keep:
            b = np.asarray(p["boxes"])[i]
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="red", lw=1.2,
                                   ls="--" if dashed else "-"))
            ax.text(b[0], b[1], f"{s[i]:.2f}", color="red", fontsize=7, va="bottom")
        ax.set_title(f"{name}\n{len(np.asarray(g['boxes']).reshape(-1, 4))} gt, "
                     f"{int((s >= score_thresh).sum())} pred >= {score_thresh:g}", fontsize=8)
    fig.suptitle(f"{title}\ngreen: ground truth, red: prediction (dashed: best box below threshold)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def segmentation_overlay(path: str, images: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                         probs: Sequence[np.ndarray], ids: Sequence[str], title: str, threshold: float = 0.5) -> str:
    """Predicted mask (prob >= threshold) as a red tint, ground-truth outline in green."""
    from matplotlib.colors import ListedColormap

    from mlip_ds.downstream.segmentation import dice_iou

    plt, fig, axes = _figure(len(images))
    for ax, img, g, p, name in zip(axes, images, gts, probs, ids):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        pred = np.asarray(p) >= threshold
        ax.imshow(np.ma.masked_where(~pred, pred.astype(float)), cmap=ListedColormap(["red"]), alpha=0.4,
                  vmin=0, vmax=1)
        if np.asarray(g).any() and (~np.asarray(g).astype(bool)).any():
            ax.contour(np.asarray(g).astype(float), levels=[0.5], colors="lime", linewidths=1.2)
        d, _ = dice_iou(pred, g)
        ax.set_title(f"{name}\nDice {d:.2f} ({int(np.asarray(g).sum())} gt px)", fontsize=8)
    fig.suptitle(f"{title}\ngreen outline: ground truth, red: prediction", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
