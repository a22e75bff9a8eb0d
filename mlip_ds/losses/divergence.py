"""Divergence loss (MLIP sec. 1): the cross terms InfoNCE(image, text_div) + InfoNCE(image_div, text),
and (our choice, ``divergence_image``) InfoNCE(image, image_div).

The divergence (EMA) features add one more positive per sample and a second pool of negatives at no
extra backward cost: they are gathered without gradient, while the online features are gathered with
gradient and each rank scores its own rows (open_clip's ``local_loss + gather_with_grad``), exactly as
in ``global_contrast.py``, so 2 ranks give the loss and gradients of 1 rank holding the global batch.

False negatives: the cross terms are image-report contrasts like the global term, so the same
knowledge-category rule applies (``cats``, ``mode``, ``match``: same-category pairs are not
negatives). The image-image term is instance discrimination (two views of one radiograph against
the other radiographs): it keeps what tells images apart even where no report does, so it takes no
category mask and its own temperature.
"""
from __future__ import annotations

import torch

from mlip_ds.losses.category import category_mask, gather_categories, pair_info_nce
from mlip_ds.losses.global_contrast import dist_info, global_rows


def divergence_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                    image_div: torch.Tensor, text_div: torch.Tensor,
                    logit_scale: torch.Tensor, cats: torch.Tensor | None = None, mode: str = "off",
                    soft_weight: float = 0.5, match: str = "exact",
                    image_image_scale: float | torch.Tensor | None = None,
                    image_image_weight: float = 1.0, neg_weight: float = 0.0,
                    image_ssl: torch.Tensor | None = None, image_ssl_div: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE(image, text_div) + InfoNCE(image_div, text) [+ InfoNCE(image, image_div)] over the
    global batch.

    All four inputs are L2-normalised local rows (B, D); ``image_div``/``text_div`` come from the EMA
    encoders on the other augmented view and are detached here. ``logit_scale`` is 1/temperature.
    ``cats`` (B, C), ``mode`` ('off', 'drop', 'soft') and ``neg_weight``: the false-negative rule of the
    global term.
    ``image_image_scale``: 1/temperature of the image-image term, weighted by ``image_image_weight``;
    None leaves it out. ``image_ssl``/``image_ssl_div``: the image-image term's own embeddings (a
    separate head, ``--image-head``) instead of ``image_features``/``image_div``.
    """
    image_div, text_div = image_div.detach(), text_div.detach()
    rank, _ = dist_info()
    offset = rank * image_features.shape[0]
    all_image, all_text = global_rows(image_features, text_features, with_grad=True)
    all_image_div, all_text_div = global_rows(image_div, text_div, with_grad=False)
    mask = None
    if mode != "off" and cats is not None:
        mask = category_mask(cats, gather_categories(cats), offset=offset, match=match)
    loss = (pair_info_nce(image_features, text_div, all_image, all_text_div, logit_scale, offset, mask, mode,
                          soft_weight, neg_weight)
            + pair_info_nce(image_div, text_features, all_image_div, all_text, logit_scale, offset, mask, mode,
                            soft_weight, neg_weight))
    if image_image_scale is not None:
        if image_ssl is not None:
            image_div = image_ssl_div.detach()
            all_image, all_image_div = global_rows(image_ssl, image_div, with_grad=True)
            image_features, all_image_div = image_ssl, all_image_div.detach()
        loss = loss + image_image_weight * pair_info_nce(image_features, image_div, all_image, all_image_div,
                                                         image_image_scale, offset)
    return loss
