"""Frozen feature extraction for the linear probe.

``extract_features(encoder, dataset_or_loader, ...)`` runs the image encoder once over a labelled
dataset (``mlip_ds.eval.datasets``) in eval mode under ``torch.no_grad`` and returns numpy arrays
``features (N, D)`` float32 and ``labels (N, L)`` float32 (NaN = masked label), in dataset order.
Corrupt samples are dropped and counted (see ``datasets.Skipped``).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mlip_ds.eval.datasets import Skipped, collate_labelled


def _as_features(out) -> torch.Tensor:
    """Accept a (B, D) tensor, or a tuple/list whose first item is one, or a dict with one of the usual keys."""
    if isinstance(out, dict):
        for k in ("image_features", "features", "pooler_output", "embeds"):
            if k in out:
                out = out[k]
                break
        else:
            raise TypeError(f"encoder returned a dict without image features (keys {sorted(out)})")
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out) or out.ndim != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"encoder must return features of shape (B, D); got {shape}")
    return out


def extract_features(encoder: torch.nn.Module, dataset_or_loader, batch_size: int = 64, num_workers: int = 0,
                     device: str | torch.device = "cpu", desc: str = "features", progress: bool = True,
                     return_info: bool = False):
    """Encode every image of a labelled dataset (or a DataLoader over one) with a frozen encoder.

    Returns ``(features, labels)``; with ``return_info=True`` also a dict
    ``{"num_samples", "num_skipped", "skipped": [Skipped, ...]}``. When a dataset is passed, its
    ``skipped`` list is replaced by the complete list collected from the batches (so it is right
    with DataLoader workers too). A DataLoader passed in should use ``collate_labelled`` (plain
    ``(images, labels)`` batches work as well).
    """
    device = torch.device(device)
    if isinstance(dataset_or_loader, DataLoader):
        loader, dataset = dataset_or_loader, dataset_or_loader.dataset
    else:
        dataset = dataset_or_loader
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=collate_labelled, pin_memory=device.type == "cuda",
                            persistent_workers=False)
    total = getattr(dataset, "num_samples_hint", None)
    if total is None:
        try:
            total = len(dataset)
        except TypeError:
            total = None

    was_training = encoder.training
    encoder.eval()
    encoder.to(device)
    feats, labels, skipped = [], [], []
    n_seen = 0
    try:
        with torch.no_grad(), tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for batch in loader:
                if len(batch) == 3:
                    images, y, batch_skipped = batch
                else:
                    (images, y), batch_skipped = batch, []
                skipped.extend(s for s in batch_skipped if isinstance(s, Skipped))
                n_seen += len(batch_skipped)
                if images is not None:
                    f = _as_features(encoder(images.to(device, non_blocking=True)))
                    feats.append(f.float().cpu().numpy())
                    labels.append(np.asarray(y, dtype=np.float32).reshape(len(f), -1))
                    n_seen += len(f)
                bar.update(n_seen - bar.n)
    finally:
        encoder.train(was_training)

    if not feats:
        where = getattr(dataset, "spec", None) or getattr(dataset, "csv_path", None) or getattr(dataset, "root", "")
        raise ValueError(f"no readable samples in {where or 'the dataset'} ({len(skipped)} skipped as corrupt)")
    features = np.concatenate(feats, 0).astype(np.float32, copy=False)
    label_arr = np.concatenate(labels, 0).astype(np.float32, copy=False)
    if skipped:
        warnings.warn(f"{desc}: skipped {len(skipped)} corrupt sample(s) of {n_seen} "
                      f"(first: {skipped[0].source} key {skipped[0].key})", RuntimeWarning, stacklevel=2)
    if dataset is not None and hasattr(dataset, "skipped"):
        dataset.skipped = list(skipped)
    if return_info:
        return features, label_arr, {"num_samples": len(features), "num_skipped": len(skipped), "skipped": skipped}
    return features, label_arr
