"""Segmentation over the pretrained encoder: U-Net decoder (ResNet) or SETR-PUP head (ViT).

* ResNet encoders (``UNetDecoder``): from the stride-32 map up, five blocks of (2x nearest upsample,
  concatenate the encoder map of that stride if there is one: 16, 8, 4, 2; then two 3x3 conv + BN +
  ReLU), so the last block is at full resolution; a 3x3 conv gives the logits.
* ViT encoders (``PUPHead``, SETR's progressive upsampling): from the stride-p patch-token map,
  log2(p) stages of (3x3 conv + BN + ReLU, 2x bilinear upsample), then a 1x1 conv.
* Loss (``bce_dice_loss``): binary cross-entropy on the logits + soft Dice loss
  (1 - (2 sum(p g) + 1) / (sum(p) + sum(g) + 1), pooled over the batch so empty masks are fine).
* Metrics (``segmentation_metrics``) on masks thresholded at probability 0.5, per test image:
  ``dice`` = mean per-image Dice with empty prediction + empty ground truth = 1 (the SIIM-ACR
  convention), ``iou`` likewise; ``dice_positive`` = mean Dice over images with a lesion;
  ``dice_global`` / ``iou_global`` = pooled over all test pixels. The first is the table's number.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlip_ds.downstream.backbones import BackboneError, EncoderFeatures


def _conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNetDecoder(nn.Module):
    def __init__(self, channels: Sequence[int], strides: Sequence[int],
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)):
        super().__init__()
        self.strides = list(strides)
        top = int(math.log2(self.strides[-1]))
        if len(decoder_channels) != top:
            raise BackboneError(f"U-Net needs {top} decoder widths for an encoder of stride {self.strides[-1]}, "
                                f"got {list(decoder_channels)}")
        self.blocks = nn.ModuleList()
        self.skip_index = []
        cin = channels[-1]
        for i, cout in enumerate(decoder_channels):
            stride = self.strides[-1] // 2 ** (i + 1)
            j = self.strides.index(stride) if stride in self.strides else None
            self.skip_index.append(j)
            skip_c = channels[j] if j is not None else 0
            self.blocks.append(nn.Sequential(_conv_bn_relu(cin + skip_c, cout), _conv_bn_relu(cout, cout)))
            cin = cout
        self.head = nn.Conv2d(cin, 1, 3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, j in zip(self.blocks, self.skip_index):
            if j is not None:
                x = F.interpolate(x, size=feats[j].shape[-2:], mode="nearest")
                x = torch.cat([x, feats[j]], 1)
            else:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(x)
        return self.head(x)


class PUPHead(nn.Module):
    def __init__(self, in_channels: int, patch_size: int, channels: int = 256):
        super().__init__()
        n_up = int(round(math.log2(patch_size)))
        if 2 ** n_up != patch_size:
            raise BackboneError(f"SETR-PUP needs a power-of-two patch size, got {patch_size}")
        layers: list[nn.Module] = []
        cin = in_channels
        for _ in range(n_up):
            layers += [_conv_bn_relu(cin, channels), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            cin = channels
        self.up = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.up(feats[-1]))


class SegmentationModel(nn.Module):
    """Encoder + head; images (B, 3, H, W) in [0, 1] -> logits (B, 1, H, W)."""

    def __init__(self, encoder: EncoderFeatures, decoder_channels: Sequence[int] | int | None = None):
        super().__init__()
        self.encoder = encoder
        if encoder.kind == "vit":
            ch = decoder_channels if isinstance(decoder_channels, int) else \
                (decoder_channels[0] if decoder_channels else 256)
            self.decoder = PUPHead(encoder.channels[-1], encoder.patch_size, int(ch))
            self.head_name = "setr-pup"
        else:
            if isinstance(decoder_channels, int):
                n = int(math.log2(encoder.strides[-1]))
                decoder_channels = [max(8, decoder_channels // 2 ** i) for i in range(n)]
            self.decoder = UNetDecoder(encoder.channels, encoder.strides, decoder_channels or (256, 128, 64, 32, 16))
            self.head_name = "unet"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.encoder(x))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    return 1.0 - (2.0 * inter + smooth) / (p.sum() + target.sum() + smooth)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)


def segmentation_loss(model: nn.Module, batch: list, device) -> torch.Tensor:
    x = torch.stack([b["image"] for b in batch]).to(device)
    y = torch.stack([b["mask"] for b in batch]).to(device)
    return bce_dice_loss(model(x), y)


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int = 16, device="cpu") -> np.ndarray:
    """Foreground probabilities (N, H, W) float32 for every dataset item."""
    model.eval().to(device)
    out = []
    for i in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[j]["image"] for j in range(i, min(len(dataset), i + batch_size))]).to(device)
        out.append(torch.sigmoid(model(x))[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1), np.float32)


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks; both empty -> (1, 1)."""
    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    inter = float(np.logical_and(p, g).sum())
    ps, gs = float(p.sum()), float(g.sum())
    if ps + gs == 0:
        return 1.0, 1.0
    return 2 * inter / (ps + gs), inter / (ps + gs - inter)


def segmentation_metrics(probs: np.ndarray, gts: np.ndarray, threshold: float = 0.5) -> dict:
    """Metrics of the module docstring over (N, H, W) probabilities and binary ground truth."""
    probs, gts = np.asarray(probs), np.asarray(gts) > 0
    if probs.shape != gts.shape:
        raise ValueError(f"prediction shape {probs.shape} != ground-truth shape {gts.shape}")
    pred = probs >= threshold
    di = np.array([dice_iou(p, g) for p, g in zip(pred, gts)]).reshape(-1, 2)
    pos = gts.reshape(len(gts), -1).any(1)
    inter = float(np.logical_and(pred, gts).sum())
    ps, gs = float(pred.sum()), float(gts.sum())
    return {"dice": float(di[:, 0].mean()) if len(di) else None,
            "iou": float(di[:, 1].mean()) if len(di) else None,
            "dice_positive": float(di[pos, 0].mean()) if pos.any() else None,
            "dice_global": 2 * inter / (ps + gs) if ps + gs else 1.0,
            "iou_global": inter / (ps + gs - inter) if ps + gs else 1.0,
            "n_images": int(len(gts)), "n_positive": int(pos.sum()), "threshold": threshold}


def ground_truth(dataset) -> np.ndarray:
    if not len(dataset):
        return np.zeros((0, 1, 1), np.float32)
    return np.stack([dataset[j]["mask"][0].numpy() for j in range(len(dataset))])
