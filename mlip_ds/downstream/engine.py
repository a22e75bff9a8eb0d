"""The plain-torch training loop shared by the detection and segmentation heads.

``fit(model, dataset, loss_fn, ...)``: AdamW (the head at ``lr``, a fine-tuned encoder at
``lr * encoder_lr_scale``; no weight decay on norms and biases), linear warm-up over the first 5%
of the steps then cosine decay to 0, gradient clipping, seeded shuffling. Length: ``epochs``
passes over the (label-fraction) training set, raised to ``min_steps`` (small fractions would
otherwise get a handful of steps) and capped by ``max_steps``. A non-finite loss skips its step
(counted); ``max_bad_steps`` in a row stop the run with an error.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn


class TrainingError(RuntimeError):
    pass


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def param_groups(model: nn.Module, encoder: nn.Module | None, lr: float, weight_decay: float,
                 encoder_lr_scale: float) -> list:
    enc_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_enc = id(p) in enc_ids
        no_wd = p.ndim <= 1 or name.endswith(".bias")
        key = (is_enc, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * (encoder_lr_scale if is_enc else 1.0),
                           "weight_decay": 0.0 if no_wd else weight_decay, "name": f"{'encoder' if is_enc else 'head'}"
                                                                                   f"{'/no_wd' if no_wd else ''}"}
        groups[key]["params"].append(p)
    return list(groups.values())


def num_steps(n_items: int, batch_size: int, epochs: int, min_steps: int = 0, max_steps: int | None = None) -> int:
    steps = max(int(epochs) * math.ceil(n_items / batch_size), int(min_steps))
    if max_steps:
        steps = min(steps, int(max_steps))
    return max(steps, 1)


def fit(model: nn.Module, dataset, loss_fn: Callable, *, encoder: nn.Module | None = None, epochs: int = 50,
        batch_size: int = 8, lr: float = 2e-4, weight_decay: float = 1e-4, encoder_lr_scale: float = 0.1,
        min_steps: int = 0, max_steps: int | None = None, grad_clip: float = 10.0, seed: int = 0,
        device: str | torch.device = "cpu", workers: int = 0, collate_fn=None, max_bad_steps: int = 5,
        progress: bool = False, desc: str = "train") -> dict:
    """Train ``model`` in place; ``loss_fn(model, batch, device) -> scalar tensor``. Returns a log."""
    device = torch.device(device)
    model.to(device)
    steps = num_steps(len(dataset), batch_size, epochs, min_steps, max_steps)
    groups = param_groups(model, encoder, lr, weight_decay, encoder_lr_scale)
    if not groups:
        raise TrainingError("no trainable parameters")
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    base = [g["lr"] for g in groups]
    warm = max(1, int(0.05 * steps))
    gen = torch.Generator().manual_seed(int(seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen,
                                         num_workers=workers, collate_fn=collate_fn, drop_last=False,
                                         persistent_workers=False)
    losses: list[float] = []
    bad = skipped = 0
    t0 = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            if step >= steps:
                break
            if step < warm:
                f = (step + 1) / warm
            else:
                f = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * f
            loss = loss_fn(model, batch, device)
            if not torch.isfinite(loss):
                opt.zero_grad(set_to_none=True)
                bad += 1
                skipped += 1
                if bad >= max_bad_steps:
                    raise TrainingError(f"{bad} non-finite losses in a row at step {step}; lower --lr")
                step += 1
                continue
            bad = 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    k = max(1, min(10, len(losses) // 5 or 1))
    return {"steps": steps, "nonfinite_skipped": skipped, "seconds": round(time.time() - t0, 2),
            "loss_first": float(sum(losses[:k]) / k) if losses else None,
            "loss_last": float(sum(losses[-k:]) / k) if losses else None,
            "losses": [round(v, 5) for v in losses[:: max(1, len(losses) // 200)]]}
