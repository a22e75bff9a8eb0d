"""Image-text matching with hard negatives (MLIP sec. 4, ALBEF's sampling).

For every image one negative report, and for every report one negative image, is drawn from the
softmax of the (detached) global similarities of the local batch, so that confusable pairs are
preferred. The positive is never drawn, and samples of the same knowledge category are excluded
while another candidate exists (they are likely false negatives, cf. ``category_mask``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mlip_ds.losses.category import category_mask


def sample_hard_negatives(logits: torch.Tensor, cats: torch.Tensor | None = None, offset: int = 0,
                          generator: torch.Generator | None = None, match: str = "exact") -> torch.Tensor:
    """(B,) indices into the N columns of ``logits`` (B, N): one negative per row.

    Row i's positive is column ``offset + i``. Negatives are drawn from softmax(logits) restricted to
    the allowed columns: never the positive, and no column with the same knowledge category as row i
    (``cats`` (N, C) multi-hot of the candidates; the rows are ``cats[offset:offset + B]``) unless no
    other candidate is left for that row. Needs N >= 2.
    """
    b, n = logits.shape
    if n < 2:
        raise ValueError("sample_hard_negatives needs at least 2 candidates per row")
    allowed = torch.ones(b, n, dtype=torch.bool, device=logits.device)
    allowed.diagonal(offset).fill_(False)  # in place on the device: no CPU scalar copied (a sync on CUDA)
    if cats is not None:
        if cats.shape[0] != n:
            raise ValueError(f"cats must describe the {n} candidate columns, got {cats.shape[0]} rows")
        same = category_mask(cats[offset:offset + b], cats, offset=offset, match=match)
        strict = allowed & ~same
        allowed = torch.where(strict.any(dim=1, keepdim=True), strict, allowed)
    probs = F.softmax(logits.detach().float().masked_fill(~allowed, float("-inf")), dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def itm_batch(image: torch.Tensor, text: torch.Tensor, knowledge: torch.Tensor, logits_per_image: torch.Tensor,
              cats: torch.Tensor | None = None, generator: torch.Generator | None = None, match: str = "exact"):
    """Build the 3B ITM pairs of the local batch: (v_i, t_i, k_i) positives, (v_i, t_j, k_j) with a hard
    negative report j per image, (v_j, t_i, k_i) with a hard negative image j per report.

    ``knowledge`` (B, Dk) travels with its report. ``logits_per_image`` (B, B) local image->text
    similarities. ``match`` is the false-negative rule of the run (``--false-negative-match``): the
    same pairs that the global term does not treat as negatives are not drawn here either.
    Returns (v, t, k, labels) with labels 1 for the first B rows, 0 for the rest.
    """
    neg_text = sample_hard_negatives(logits_per_image, cats, generator=generator, match=match)
    neg_image = sample_hard_negatives(logits_per_image.T, cats, generator=generator, match=match)
    v = torch.cat([image, image, image[neg_image]])
    t = torch.cat([text, text[neg_text], text])
    k = torch.cat([knowledge, knowledge[neg_text], knowledge])
    b = image.shape[0]
    labels = (torch.arange(3 * b, device=image.device) < b).long()  # built on the device: no host copy
    return v, t, k, labels


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the ITM head's (3B, 2) logits against the matched/unmatched labels."""
    return F.cross_entropy(logits.float(), labels)
