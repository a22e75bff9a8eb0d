"""Proxy-task heads on the Tucker-fused vector (MLIP sec. 4): image-text matching and text swapping.

Both are binary classifiers (two logits, cross-entropy), kept tiny so that the towers and the fusion
do the work; the samplers and losses live in ``losses/itm.py`` and ``losses/swap.py``.
"""
from __future__ import annotations

import torch
from torch import nn


class BinaryHead(nn.Module):
    """LayerNorm -> Linear(in_dim, 2): logits for (negative, positive)."""

    def __init__(self, in_dim: int, hidden: int = 0):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        if hidden:
            layers += [nn.Linear(in_dim, hidden), nn.GELU()]
        layers.append(nn.Linear(hidden or in_dim, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ITMHead(BinaryHead):
    """Matched (1) / unmatched (0) image-report pair."""


class SwapHead(BinaryHead):
    """Swapped (1) / original (0) report for this image."""
