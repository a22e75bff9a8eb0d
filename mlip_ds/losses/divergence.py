"""Divergence loss: the cross terms InfoNCE(image, text_div) + InfoNCE(image_div, text) (MLIP sec. 1).

The divergence (EMA) features add one more positive per sample and a second pool of negatives at no
extra backward cost: they are gathered without gradient, while the online features are gathered with
gradient and each rank scores its own rows (open_clip's ``local_loss + gather_with_grad``), exactly as
in ``global_contrast.py``, so 2 ranks give the loss and gradients of 1 rank holding the global batch.
"""
from __future__ import annotations

import torch
from open_clip.loss import gather_features

from mlip_ds.losses.global_contrast import dist_info, info_nce


def divergence_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                    image_div: torch.Tensor, text_div: torch.Tensor,
                    logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE(image, text_div) + InfoNCE(image_div, text) over the global batch.

    All four inputs are L2-normalised local rows (B, D); ``image_div``/``text_div`` come from the EMA
    encoders on the other augmented view and are detached here. ``logit_scale`` is 1/temperature.
    """
    image_div, text_div = image_div.detach(), text_div.detach()
    rank, world_size = dist_info()
    if world_size == 1:
        return (info_nce(image_features, text_div, logit_scale)
                + info_nce(image_div, text_features, logit_scale))
    all_image, all_text = gather_features(image_features, text_features, local_loss=True,
                                          gather_with_grad=True, rank=rank, world_size=world_size)
    all_image_div, all_text_div = gather_features(image_div, text_div, local_loss=True,
                                                  gather_with_grad=False, rank=rank, world_size=world_size)
    offset = rank * image_features.shape[0]
    return (info_nce(image_features, text_div, logit_scale, all_image, all_text_div, offset=offset)
            + info_nce(image_div, text_features, logit_scale, all_image_div, all_text, offset=offset))
