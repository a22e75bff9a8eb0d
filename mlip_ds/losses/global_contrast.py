"""Global image-report contrast: symmetric InfoNCE with a learned temperature, gathered across ranks.

Follows open_clip's ``local_loss + gather_with_grad`` scheme: every rank gathers all features with
gradients (``torch.distributed.nn.all_gather``) and computes the loss for its own rows only, so the
mean of the per-rank losses equals the loss of one rank holding the whole global batch, and the
averaged gradients match too (tests/test_global_contrast.py checks both).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import gather_features


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def info_nce(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
             all_image_features: torch.Tensor | None = None, all_text_features: torch.Tensor | None = None,
             offset: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE of local rows against a (possibly gathered) pool.

    Row i of the local batch is positive with column ``offset + i`` of the pool. Features are
    expected L2-normalised; ``logit_scale`` is exp'ed already (1 / temperature).
    """
    all_image_features = image_features if all_image_features is None else all_image_features
    all_text_features = text_features if all_text_features is None else all_text_features
    logits_per_image = logit_scale * image_features @ all_text_features.T
    logits_per_text = logit_scale * text_features @ all_image_features.T
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def global_rows(a: torch.Tensor, b: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' rows of two local (B, D) tensors, open_clip's gather (``with_grad``: the gradient
    flows back to each rank's own rows); on one rank the tensors themselves."""
    rank, world_size = dist_info()
    if world_size == 1:
        return a, b
    return gather_features(a, b, local_loss=True, gather_with_grad=with_grad, rank=rank, world_size=world_size)


def global_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                            logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE over the global batch (all ranks); each rank returns the loss of its own rows."""
    all_image, all_text = global_rows(image_features, text_features)
    return info_nce(image_features, text_features, logit_scale, all_image, all_text,
                    offset=dist_info()[0] * image_features.shape[0])
