"""The exported image encoder as a multi-scale backbone for detection and segmentation.

* ``load_visual(export_dir, random_init)`` -> the open_clip vision tower of an mlip-ds export
  (``mlip_ds.export.load_model``; the text tower is dropped) and its preprocessing.
* ``build_encoder(visual, freeze)`` -> ``EncoderFeatures``: images in [0, 1] (B, 3, H, W) ->
  a list of raw feature maps, with ``strides`` and ``channels``. It normalises with the export's
  mean/std itself, so every head takes plain [0, 1] images.

  - ViT (open_clip ``VisionTransformer``): one map, the last block's patch tokens after ``ln_post``
    (what ``output_tokens=True`` returns), at stride = patch size. Inputs whose grid differs from the
    pretraining grid get a bicubically interpolated positional embedding.
  - ResNet (open_clip ``ModifiedResNet``): the stem before its average pool (stride 2, ``width``
    channels) and ``layer1..layer4`` (strides 4, 8, 16, 32). BatchNorm statistics stay frozen (eval
    mode) even when fine-tuning (detectron2's FrozenBN practice: detection batches are small).
  - ``freeze=True``: no encoder parameter trains and the encoder runs under ``torch.no_grad``.

* ``DetectionBackbone(encoder, out_channels)``: what torchvision's detectors take (an
  ``out_channels`` attribute, an ``OrderedDict`` of maps named "0", "1", ... from fine to coarse).
  ViT: a ViTDet simple feature pyramid from the single stride-p map (deconvolutions up, max-pool
  down, then 1x1 + 3x3 convs with channel LayerNorm) to the strides of (4, 8, 16, 32) that leave at
  least 2x2 cells at the image size. ResNet: a torchvision ``FeaturePyramidNetwork`` over
  ``layer1..layer4`` (the same stride filter).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_STRIDES = (4, 8, 16, 32)


class BackboneError(ValueError):
    """An encoder that cannot be used as a backbone (unknown tower type, bad stride, ...)."""


def load_visual(export_dir: str, random_init: bool = False, seed: int = 0):
    """Return (vision tower, preprocess dict {image_size, mean, std}) of an mlip-ds export."""
    from mlip_ds.export import load_model

    model, meta = load_model(export_dir, random_init=random_init, seed=seed)
    visual = model.visual
    del model
    return visual, dict(meta["preprocess"])


def tower_kind(visual: nn.Module) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    raise BackboneError(f"unsupported vision tower {type(visual).__name__}: expected open_clip "
                        "VisionTransformer or ModifiedResNet")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (ViTDet's norm in the pyramid)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _interp_pos_embed(pos: torch.Tensor, grid0: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(1 + g0h*g0w, C) -> (1 + gh*gw, C), bicubic on the patch part; the class position is kept."""
    cls, patch = pos[:1], pos[1:]
    c = patch.shape[-1]
    patch = patch.reshape(1, grid0[0], grid0[1], c).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(-1, c)], 0)


def vit_patch_tokens(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens of an open_clip VisionTransformer as a (B, width, H/p, W/p) map.

    The same computation as ``visual.output_tokens = True`` (tokens after ``ln_post``, class token
    dropped), plus positional-embedding interpolation when the grid differs from pretraining.
    """
    if getattr(visual, "attn_pool", None) is not None:
        raise BackboneError("ViT towers with attentional pooling are not supported as backbones")
    b = x.shape[0]
    x = visual.conv1(x)
    gh, gw = x.shape[-2:]
    c = x.shape[1]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding
    grid0 = tuple(visual.grid_size)
    if (gh, gw) != grid0:
        pos = _interp_pos_embed(pos, grid0, (gh, gw))
    x = x + pos.to(x.dtype)
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    if not getattr(visual, "final_ln_after_pool", False):
        x = visual.ln_post(x)
    tokens = x[:, 1:]
    return tokens.transpose(1, 2).reshape(b, c, gh, gw)


class EncoderFeatures(nn.Module):
    """Vision tower -> list of raw feature maps (see the module docstring).

    Attributes: ``kind`` ("vit" | "resnet"), ``strides`` and ``channels`` (one per map),
    ``frozen``, ``patch_size`` (ViT only).
    """

    def __init__(self, visual: nn.Module, freeze: bool = True, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD

        self.visual = visual
        self.kind = tower_kind(visual)
        self.frozen = bool(freeze)
        self.register_buffer("mean", torch.tensor(list(mean or CLIP_MEAN), dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(list(std or CLIP_STD), dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        # the pooling/projection heads are never used downstream
        if self.kind == "vit":
            p = visual.patch_size
            self.patch_size = int(p[0] if isinstance(p, (tuple, list)) else p)
            self.strides = [self.patch_size]
            self.channels = [int(visual.conv1.out_channels)]
        else:
            self.patch_size = None
            width = int(visual.conv1.out_channels) * 2
            self.strides = [2, 4, 8, 16, 32]
            self.channels = [width, width * 4, width * 8, width * 16, width * 32]
        for prm in self.visual.parameters():
            prm.requires_grad = not self.frozen
        self._unused_frozen()

    def _unused_frozen(self):
        """Parameters no output depends on (ViT proj, ResNet attnpool) never train."""
        if self.kind == "vit":
            if isinstance(getattr(self.visual, "proj", None), nn.Parameter):
                self.visual.proj.requires_grad = False
        elif getattr(self.visual, "attnpool", None) is not None:
            for prm in self.visual.attnpool.parameters():
                prm.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.visual.eval()
        else:
            for m in self.visual.modules():  # BatchNorm statistics stay frozen (FrozenBN practice)
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def trainable_parameters(self):
        return [p for p in self.visual.parameters() if p.requires_grad]

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        if self.kind == "vit":
            return [vit_patch_tokens(self.visual, x)]
        v = self.visual
        x = v.act1(v.bn1(v.conv1(x)))
        x = v.act2(v.bn2(v.conv2(x)))
        s2 = v.act3(v.bn3(v.conv3(x)))
        x1 = v.layer1(v.avgpool(s2))
        x2 = v.layer2(x1)
        x3 = v.layer3(x2)
        x4 = v.layer4(x3)
        return [s2, x1, x2, x3, x4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.frozen:
            with torch.no_grad():
                return [f.detach() for f in self._forward(x)]
        return self._forward(x)


def build_encoder(visual: nn.Module, freeze: bool = True, preprocess: dict | None = None) -> EncoderFeatures:
    pre = preprocess or {}
    return EncoderFeatures(visual, freeze=freeze, mean=pre.get("mean"), std=pre.get("std"))


def pyramid_strides(image_size: int, strides: Sequence[int] = DEFAULT_STRIDES, min_cells: int = 2) -> list[int]:
    """The strides of ``strides`` that leave at least ``min_cells`` x ``min_cells`` cells."""
    out = [int(s) for s in strides if image_size // int(s) >= min_cells]
    if not out:
        raise BackboneError(f"image size {image_size} is too small for any stride of {list(strides)}")
    return out


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one stride-``in_stride`` map to ``strides``."""

    def __init__(self, in_channels: int, in_stride: int, strides: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.strides = [int(s) for s in strides]
        self.stages = nn.ModuleList()
        for s in self.strides:
            layers: list[nn.Module] = []
            dim = in_channels
            if s < in_stride:
                ratio = in_stride / s
                n_up = int(round(math.log2(ratio)))
                if 2 ** n_up != ratio:
                    raise BackboneError(f"stride {s} is not a power-of-two fraction of the patch size {in_stride}")
                for i in range(n_up):
                    nxt = max(dim // 2, 16)
                    layers.append(nn.ConvTranspose2d(dim, nxt, kernel_size=2, stride=2))
                    if i < n_up - 1:
                        layers += [LayerNorm2d(nxt), nn.GELU()]
                    dim = nxt
            elif s > in_stride:
                ratio = s / in_stride
                if ratio != int(ratio) or 2 ** int(round(math.log2(ratio))) != ratio:
                    raise BackboneError(f"stride {s} is not a power-of-two multiple of the patch size {in_stride}")
                layers.append(nn.MaxPool2d(kernel_size=int(ratio), stride=int(ratio)))
            layers += [nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((str(i), stage(x)) for i, stage in enumerate(self.stages))


class DetectionBackbone(nn.Module):
    """Encoder + neck with ``out_channels`` and named maps, for torchvision detectors."""

    def __init__(self, encoder: EncoderFeatures, image_size: int, out_channels: int = 256,
                 strides: Sequence[int] = DEFAULT_STRIDES):
        super().__init__()
        self.encoder = encoder
        self.out_channels = int(out_channels)
        self.strides = pyramid_strides(image_size, strides)
        if encoder.kind == "vit":
            self.neck = SimpleFeaturePyramid(encoder.channels[0], encoder.strides[0], self.strides, out_channels)
            self._take = None
        else:
            from torchvision.ops import FeaturePyramidNetwork

            self._take = [encoder.strides.index(s) for s in self.strides if s in encoder.strides]
            if len(self._take) != len(self.strides):
                raise BackboneError(f"ResNet strides {encoder.strides} do not cover {self.strides}")
            self.neck = FeaturePyramidNetwork([encoder.channels[i] for i in self._take], out_channels)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.encoder(x)
        if self._take is None:
            return self.neck(feats[0])
        return self.neck(OrderedDict((str(j), feats[i]) for j, i in enumerate(self._take)))
