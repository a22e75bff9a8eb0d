"""Image transforms: grayscale radiograph (PIL) -> normalized 3-channel tensor.

Radiographs are stored as 8-bit grayscale; the towers take 3 channels, so the gray plane is
repeated (as MGCA and GLoRIA do) after resizing.
"""
from __future__ import annotations

from torchvision import transforms as T

# open_clip's defaults; a chest-X-ray-specific mean/std is a config value, not a constant here.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def train_transform(image_size: int, mean=CLIP_MEAN, std=CLIP_STD, scale=(0.6, 1.0)):
    """Random resized crop + small affine + contrast jitter, the usual CXR pretraining augmentation."""
    return T.Compose([
        T.Grayscale(num_output_channels=3),
        T.RandomResizedCrop(image_size, scale=scale, ratio=(0.9, 1.1), antialias=True),
        T.RandomAffine(degrees=5, translate=(0.03, 0.03)),
        T.ColorJitter(brightness=0.2, contrast=0.2),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """Deterministic resize of the short side + center crop."""
    return T.Compose([
        T.Grayscale(num_output_channels=3),
        T.Resize(image_size, antialias=True),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
