"""Divergence encoders: EMA copies of the online towers (MLIP sec. 1, our reading of "dynamically updated").

The copies follow the online weights, θd <- m·θd + (1-m)·θ, with m rising on a cosine schedule from
0.99 to 0.999, and never receive gradients: they only supply an extra, slowly diverging view of each
sample for the divergence loss (``mlip_ds/losses/divergence.py``).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_ema_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter frozen (requires_grad False).

    The copy keeps the online module's train/eval mode; keep it outside the DeepSpeed engine so the
    optimizer never sees its parameters.
    """
    ema = copy.deepcopy(module)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, m: float) -> None:
    """θd <- m·θd + (1-m)·θ for every parameter; buffers (e.g. BatchNorm statistics) are copied.

    Both modules must have the same structure (``make_ema_copy`` of ``online``). Parameters are
    matched by name so a mismatch fails loudly instead of mixing unrelated tensors.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got {m}")
    online_params = dict(online.named_parameters())
    ema_params = dict(ema.named_parameters())
    if online_params.keys() != ema_params.keys():
        raise ValueError("ema_update: the EMA copy and the online module have different parameters")
    targets = list(ema_params.values())
    # One multi-tensor kernel (as timm's ModelEmaV3) instead of two launches per parameter: on a GPU,
    # about a thousand launches per MLIP step at ViT-B + BERT-base. Online bf16 weights are cast to
    # the fp32 EMA first.
    sources = [online_params[name].detach().to(t.dtype) for name, t in ema_params.items()]
    torch._foreach_lerp_(targets, sources, 1.0 - m)
    online_buffers = dict(online.named_buffers())
    for name, b_ema in ema.named_buffers():
        b_ema.copy_(online_buffers[name])


def momentum_schedule(step: int, total: int, m0: float = 0.99, m1: float = 0.999) -> float:
    """Cosine rise from ``m0`` at step 0 to ``m1`` at step ``total`` (BYOL's schedule); clamped outside."""
    if total <= 0:
        return m1
    t = min(max(step / total, 0.0), 1.0)
    return m1 - (m1 - m0) * 0.5 * (1.0 + math.cos(math.pi * t))
