"""Plots people would rather look at than tables (PNG, matplotlib's headless Agg backend)."""
from __future__ import annotations

import os
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
