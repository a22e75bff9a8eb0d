"""Image transforms: grayscale radiograph (PIL) -> normalized 3-channel tensor.

Radiographs are stored as 8-bit grayscale; the towers take 3 channels, so the gray plane is
repeated (as MGCA and GLoRIA do). The geometric and intensity augmentations run on the single gray
plane and the plane is repeated only at the end, as a view: the same pixels as converting to RGB
first (R = G = B, and PIL's contrast uses the gray mean either way), at about half the CPU cost in
the loader workers, which share the cores with the training ranks.
"""
from __future__ import annotations

import torch
from torchvision import transforms as T

# open_clip's defaults; a chest-X-ray-specific mean/std is a config value, not a constant here.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RepeatGray:
    """(1, H, W) -> (3, H, W) view of the same plane (a class, not a lambda: workers may pickle it)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(3, -1, -1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def train_transform(image_size: int, mean=CLIP_MEAN, std=CLIP_STD, scale=(0.6, 1.0), intensity_jitter: float = 0.0):
    """Random resized crop + small affine, and brightness/contrast jitter when ``intensity_jitter`` > 0.

    No jitter by default (as MoCo-CXR): in a radiograph the gray levels are signal. On real X-rays
    a jitter of 0.2 (ConVIRT's choice) cost MLIP 0.02-0.03 AUC on a property no report names, which
    the image's gray-level histogram alone predicts well (docs/ablation.md, "Gray levels"): the
    image-image term learns to ignore exactly what the jitter varies."""
    return T.Compose([
        T.Grayscale(num_output_channels=1),
        T.RandomResizedCrop(image_size, scale=scale, ratio=(0.9, 1.1), antialias=True),
        T.RandomAffine(degrees=5, translate=(0.03, 0.03)),
        *([T.ColorJitter(brightness=intensity_jitter, contrast=intensity_jitter)] if intensity_jitter > 0 else []),
        T.ToTensor(),
        RepeatGray(),
        T.Normalize(mean, std),
    ])


def eval_transform(image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """Deterministic resize of the short side + center crop."""
    return T.Compose([
        T.Grayscale(num_output_channels=1),
        T.Resize(image_size, antialias=True),
        T.CenterCrop(image_size),
        T.ToTensor(),
        RepeatGray(),
        T.Normalize(mean, std),
    ])
